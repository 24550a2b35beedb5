"""The sampler registry: every sampler the project offers, by name. No torch here.

The HTTP API's allowed `sampler` values, the CLI's `--sampler` choices and the service's
denoiser all derive from `SAMPLERS`, so a new sampler is one class (a `undiffuse.samplers.Sampler`
subclass) plus one entry below. Entries name their class by import path, so reading the registry
(as the torch-free HTTP layer does) never imports torch; `make_sampler` imports the class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from undiffuse.config import Thresholding
    from undiffuse.samplers import Sampler
    from undiffuse.schedule import NoiseSchedule


@dataclass(frozen=True)
class SamplerEntry:
    """name: the public name; target: "module:Class"; options: the keyword options the class
    takes (and the service passes through from a job's parameters); summary: one line for
    help texts; clips: whether the sampler clips x̂₀ as a model's `clip_sample` says (diffusers'
    DDPM and DDIM schedulers do; DPM-Solver++ has no such setting)."""

    name: str
    target: str
    options: tuple[str, ...]
    summary: str
    clips: bool = False

    def select(self, options: dict[str, Any]) -> dict[str, Any]:
        """The subset of options this sampler takes (a job's eta means nothing to DDPM)."""
        return {k: v for k, v in options.items() if k in self.options}


SAMPLERS: dict[str, SamplerEntry] = {
    e.name: e
    for e in (
        SamplerEntry(
            "ddpm",
            "undiffuse.samplers:DDPMSampler",
            ("variance",),
            "DDPM ancestral sampling (Ho et al. 2020)",
            clips=True,
        ),
        SamplerEntry(
            "ddim",
            "undiffuse.samplers:DDIMSampler",
            ("eta",),
            "DDIM, eta = 0 deterministic (Song et al. 2021)",
            clips=True,
        ),
        SamplerEntry(
            "dpmpp_2m",
            "undiffuse.samplers:DPMSolverPP2MSampler",
            (),
            "DPM-Solver++(2M), deterministic, good in 10-20 steps (Lu et al. 2022)",
        ),
        SamplerEntry(
            "dpmpp_2m_logsnr",
            "undiffuse.samplers:DPMSolverPP2MLogSNRSampler",
            (),
            "DPM-Solver++(2M) on steps uniform in log-SNR: the demo model's best unguided 10-step images",
        ),
    )
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  # "ddpm" | "ddim" | "dpmpp_2m" | ..., from the registry
DEFAULT_SAMPLER = "ddim"


def sampler_entry(name: str) -> SamplerEntry:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLER_NAMES)}") from None


def sampler_class(name: str) -> type[Sampler]:
    module, _, attr = sampler_entry(name).target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    *,
    clip_sample: bool | None = None,
    thresholding: Thresholding | None = None,
    **options: Any,
) -> Sampler:
    """A sampler by registry name, e.g. make_sampler("ddim", schedule, eta=0.5).

    clip_sample: the model's own setting (`DiffusionModel.clip_sample`), applied by the samplers
    that have one (None: the sampler's default). thresholding: the model's dynamic thresholding
    of x̂₀, applied by every sampler (None: off). Options the sampler does not take raise (use
    `SamplerEntry.select` to filter a job's)."""
    entry = sampler_entry(name)
    unknown = set(options) - set(entry.options)
    if unknown:
        raise ValueError(f"sampler {name!r} takes no option(s) {sorted(unknown)}; it takes {list(entry.options)}")
    if entry.clips and clip_sample is not None:
        options["clip_x0"] = clip_sample
    if thresholding is not None:
        options["thresholding"] = thresholding
    return sampler_class(name)(schedule, **options)
