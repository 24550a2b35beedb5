"""Model configuration, and the one reader of model folders. No torch here.

The HTTP layer validates requests against what a model folder says (image size, classes,
timesteps, prediction type) without loading a network, and the core builds the network from
the same description, so the two can never disagree about a model.

Two folder layouts are understood:

    undiffuse   config.json        {"format": "undiffuse", "version": 1, "unet": {...},
                                    "schedule": {...}, "prediction_type": "epsilon" | "v",
                                    "class_names": [...] | null,
                                    "guidance_interval": [low, high] | null}
                model.safetensors  the EMA weights (what gets served)

    diffusers   config.json        {"_class_name": "UNet2DModel", ...}   (google/ddpm-cifar10-32)
                diffusion_pytorch_model.safetensors (a pickled .bin is refused: loading one runs code)
                scheduler_config.json, or ../scheduler/scheduler_config.json (inside a pipeline)

    pipeline    model_index.json   {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
                unet/, scheduler/  the network and the schedule, each a diffusers folder

    latent      model_index.json   {"_class_name": "LDMPipeline" | "DiTPipeline", ..., "id2label": {...}}
    pipeline    unet/ or transformer/  the denoiser, on latents (UNet2DModel; DiTTransformer2DModel)
                vqvae/ or vae/     the decoder from latents to images (VQModel; AutoencoderKL)
                scheduler/         the schedule

A latent model's ModelSpec describes the image the user gets (`image_size`, `channels`: the
decoder's output) and, in `latent`, the latents the engine denoises and how they are decoded.

A diffusers schedule is reproduced only where undiffuse computes exactly what diffusers does:
the scheduler classes in SCHEDULERS, the beta schedules in BETA_SCHEDULES, the prediction types
in DIFFUSERS_PREDICTION, `clip_sample` (range 1) and dynamic `thresholding` (`Thresholding`) as
configured. Anything else (a consistency model's scheduler, trained betas, zero-terminal-SNR
rescaling, a scheduler's learned variances) is refused when the folder is read, naming the file and the field, because sampling it
with the wrong process writes plausible-looking garbage. A network without any scheduler config
is refused too: its schedule is unknown. A DiT's learned-variance output channels are dropped, as
DiTPipeline drops them (its scheduler samples with fixed variances).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

PredictionType = Literal["epsilon", "v", "sample"]
ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
ModelFormat = Literal["undiffuse", "diffusers"]

CONFIG_FILE = "config.json"
PIPELINE_FILE = "model_index.json"
SCHEDULER_FILE = "scheduler_config.json"
WEIGHTS_FILE = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model folder or checkpoint that is missing, truncated or inconsistent; names the file."""


@dataclass(frozen=True)
class ScheduleConfig:
    """What is saved in a checkpoint to rebuild the noise schedule exactly
    (`undiffuse.schedule.NoiseSchedule.from_config`)."""

    kind: ScheduleKind = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4  # linear and scaled_linear only
    beta_end: float = 0.02  # linear and scaled_linear only
    cosine_s: float = 0.008  # cosine only
    max_beta: float = 0.999  # cosine only

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(f"unknown schedule kind {self.kind!r}; expected 'linear', 'scaled_linear' or 'cosine'")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")


@dataclass(frozen=True)
class UNetConfig:
    """The architecture of `undiffuse.unet.UNet`, saved in every checkpoint."""

    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.1
    num_classes: int | None = None
    norm_groups: int = 8

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by the down-sampling factor {factor}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"channels {self.base_channels * m} not divisible by norm_groups")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown UNet config fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("channel_mult", "attention_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """An undiffuse model: network, schedule, what the network predicts, class names, and the
    noise levels where classifier-free guidance applies (`guidance_interval`: guidance acts
    where low < sigma_t <= high, sigma_t = sqrt((1 - a_bar_t) / a_bar_t); None: every step).
    """

    unet: UNetConfig
    schedule: ScheduleConfig
    prediction_type: PredictionType = "epsilon"
    class_names: tuple[str, ...] | None = None
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_guidance_interval(self.guidance_interval)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "undiffuse",
            "version": FORMAT_VERSION,
            "unet": self.unet.to_dict(),
            "schedule": asdict(self.schedule),
            "prediction_type": self.prediction_type,
            "class_names": list(self.class_names) if self.class_names else None,
            "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if d.get("format") != "undiffuse" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not an undiffuse v{FORMAT_VERSION} config (format/version fields)")
        if d.get("prediction_type") not in ("epsilon", "v"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {d.get('prediction_type')!r}")
        names = d.get("class_names")
        interval = d.get("guidance_interval")
        return cls(
            unet=UNetConfig.from_dict(d["unet"]),
            schedule=ScheduleConfig(**d["schedule"]),
            prediction_type=d["prediction_type"],
            class_names=tuple(names) if names else None,
            guidance_interval=_interval_from_json(interval),
        )


def _interval_from_json(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"guidance_interval must be [low, high] (two numbers) or null, got {value!r}")
    return (float(value[0]), float(value[1]))


def check_guidance_interval(interval: tuple[float, float] | None) -> None:
    """A ValueError unless interval is None or two finite noise levels 0 <= low < high (None,
    not an infinite bound, means every step)."""
    if interval is None:
        return
    if len(interval) != 2 or not all(math.isfinite(v) for v in interval) or not 0 <= interval[0] < interval[1]:
        raise ValueError(f"guidance_interval must be [low, high] with 0 <= low < high, finite, got {list(interval)}")


DenoiserClass = Literal["UNet2DModel", "DiTTransformer2DModel"]
DecoderClass = Literal["VQModel", "AutoencoderKL"]


@dataclass(frozen=True)
class LatentSpec:
    """The latent side of a latent-diffusion pipeline: the engine denoises [channels, size, size]
    latents with the `denoiser` (in ModelSpec.network_path), and the `decoder` (in decoder_path)
    turns latents / scaling_factor into images `upsampling` times larger, as LDMPipeline and
    DiTPipeline do. learned_sigma: the denoiser also outputs variance channels (out_channels =
    2 x channels), which are dropped: the first `channels` are the noise prediction."""

    denoiser: DenoiserClass
    decoder: DecoderClass
    decoder_path: Path
    channels: int
    size: int
    upsampling: int
    scaling_factor: float
    learned_sigma: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


@dataclass(frozen=True)
class Thresholding:
    """Dynamic thresholding of x̂₀ (Saharia et al. 2022, "Imagen", Sec. 2.3), as diffusers'
    DDPM, DDIM and DPM-Solver++ schedulers apply it with `thresholding: true`: for each image,
    s = the `ratio` quantile of |x̂₀| over all of its values, clamped to [1, max_value], and
    x̂₀ <- clamp(x̂₀, -s, s) / s. It replaces clip_sample where both are set, as in diffusers.
    From scheduler_config.json's `dynamic_thresholding_ratio` and `sample_max_value`."""

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.ratio}")
        if not self.max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1 with thresholding, got {self.max_value}")


@dataclass(frozen=True)
class ModelSpec:
    """What a model folder says about the model in it, read without loading any weights.

    `unet` is the undiffuse architecture (None for a diffusers folder, whose network diffusers
    builds from `raw`, read from `network_path`: the folder itself, or a pipeline's `unet/` or
    `transformer/`). `image_size` and `channels` describe the images the user gets; for a latent
    model (`latent` set) the samplers denoise `sample_shape`, the latents, which its decoder turns
    into those images.
    `schedule` and `prediction_type` are what the model was trained with, so the HTTP layer
    validates `steps` against the schedule the sampler will actually run. `clip_sample`: whether
    DDPM and DDIM clip x̂₀ to [-1, 1] (as the folder's scheduler says; None: the samplers' own
    default, which clips). `thresholding`: dynamic thresholding of x̂₀ instead (None: off).
    """

    path: Path
    format: ModelFormat
    image_size: int
    channels: int
    num_classes: int | None
    schedule: ScheduleConfig
    prediction_type: PredictionType
    class_names: tuple[str, ...] | None = None
    guidance_interval: tuple[float, float] | None = None
    unet: UNetConfig | None = None
    clip_sample: bool | None = None
    thresholding: Thresholding | None = None
    network_path: Path | None = None
    latent: LatentSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the samplers denoise: the latents of a latent model, else the image."""
        return self.latent.shape if self.latent else self.image_shape

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance can run: a class-conditional network with a "no class"
        input (undiffuse's UNet, trained with dropped labels; DiT's null class). A diffusers
        UNet2DModel's class embedding has a row per class and none for "no class"."""
        if self.num_classes is None:
            return False
        return self.format == "undiffuse" or (self.latent is not None and self.latent.denoiser != "UNet2DModel")

    def model_config(self) -> ModelConfig:
        """The undiffuse ModelConfig (undiffuse folders only)."""
        if self.unet is None:
            raise CheckpointError(f"{self.path}: a diffusers folder has no undiffuse ModelConfig")
        return ModelConfig(self.unet, self.schedule, self.prediction_type, self.class_names, self.guidance_interval)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path, or a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_model_folder(folder: str | Path) -> ModelSpec:
    """Describe the undiffuse model, diffusers network or diffusers pipeline in folder;
    CheckpointError, naming the file and the reason, if it is none of them or not one undiffuse
    samples correctly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    if (folder / PIPELINE_FILE).is_file():
        return _pipeline_spec(folder)
    raw = read_json(folder / CONFIG_FILE)
    if "_class_name" in raw:
        return _diffusers_spec(folder, raw)
    try:
        config = ModelConfig.from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid config ({e})") from e
    return ModelSpec(
        path=folder,
        format="undiffuse",
        image_size=config.unet.image_size,
        channels=config.unet.in_channels,
        num_classes=config.unet.num_classes,
        schedule=config.schedule,
        prediction_type=config.prediction_type,
        class_names=config.class_names,
        guidance_interval=config.guidance_interval,
        unet=config.unet,
        raw=raw,
    )


PIPELINES = ("DDPMPipeline", "DDIMPipeline")
"""Pipelines whose parts undiffuse serves: a pixel-space UNet2DModel and its scheduler."""
LATENT_PIPELINES: dict[str, tuple[str, str]] = {"LDMPipeline": ("unet", "vqvae"), "DiTPipeline": ("transformer", "vae")}
"""Latent pipelines undiffuse serves, with their denoiser's and decoder's folders."""
LATENT_PARTS = ("vae", "vqvae", "transformer")
DECODERS: dict[str, DecoderClass] = {"vqvae": "VQModel", "vae": "AutoencoderKL"}
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
"""facebook/DiT-XL-2-256 names its transformer Transformer2DModel; diffusers loads it as DiT."""
DEFAULT_SCALING = 0.18215  # VQModel's and AutoencoderKL's default scaling_factor in diffusers


def _pipeline_spec(folder: Path) -> ModelSpec:
    """A diffusers pipeline folder (model_index.json): its `unet/` with its `scheduler/`, and
    for a latent pipeline its decoder."""
    index_path = folder / PIPELINE_FILE
    index = read_json(index_path)
    name = index.get("_class_name")
    if name in LATENT_PIPELINES:
        return _latent_spec(folder, index, name)
    latent = [part for part in LATENT_PARTS if part in index]
    if latent:
        raise CheckpointError(
            f"{index_path}: a latent pipeline ({name!r} with {', '.join(latent)}) that undiffuse does not serve "
            f"(it serves {', '.join(LATENT_PIPELINES)})"
        )
    if name not in PIPELINES:
        raise CheckpointError(
            f"{index_path}: _class_name {name!r} is not a pipeline undiffuse serves "
            f"({', '.join(PIPELINES + tuple(LATENT_PIPELINES))})"
        )
    _require_parts(folder, index, ("unet", "scheduler"))
    spec = _diffusers_spec(folder / "unet", read_json(folder / "unet" / CONFIG_FILE))
    return replace(spec, path=folder, raw={**spec.raw, "pipeline": index})


def _require_parts(folder: Path, index: dict[str, Any], parts: tuple[str, ...]) -> None:
    for part in parts:
        if part not in index or not (folder / part).is_dir():
            raise CheckpointError(f"{folder / PIPELINE_FILE}: the pipeline has no {part}/ folder")


def _latent_spec(folder: Path, index: dict[str, Any], pipeline: str) -> ModelSpec:
    """An LDMPipeline (UNet2DModel on VQ latents) or a DiTPipeline (class-conditional
    DiTTransformer2DModel on KL latents): the denoiser, its schedule and the decoder."""
    denoiser_part, decoder_part = LATENT_PIPELINES[pipeline]
    _require_parts(folder, index, (denoiser_part, decoder_part, "scheduler"))
    net_dir, dec_dir = folder / denoiser_part, folder / decoder_part
    net = read_json(net_dir / CONFIG_FILE)
    scheduler = diffusers_scheduler(net_dir)
    _require_safetensors(net_dir)
    _require_safetensors(dec_dir)
    if pipeline == "LDMPipeline":
        denoiser, channels, size, num_classes, learned_sigma = _ldm_unet(net, net_dir / CONFIG_FILE)
    else:
        denoiser, channels, size, num_classes, learned_sigma = _dit_transformer(net, net_dir / CONFIG_FILE)
    decoder = DECODERS[decoder_part]
    image_channels, upsampling, scaling = _decoder(
        read_json(dec_dir / CONFIG_FILE), dec_dir / CONFIG_FILE, decoder, channels
    )
    return ModelSpec(
        path=folder,
        format="diffusers",
        image_size=size * upsampling,
        channels=image_channels,
        num_classes=num_classes,
        schedule=scheduler.schedule,
        prediction_type=scheduler.prediction_type,
        class_names=_class_names(index, folder / PIPELINE_FILE, num_classes),
        clip_sample=scheduler.clip_sample,
        thresholding=scheduler.thresholding,
        network_path=net_dir,
        latent=LatentSpec(denoiser, decoder, dec_dir, channels, size, upsampling, scaling, learned_sigma),
        raw={**net, "pipeline": index},
    )


def _positive(cfg: dict[str, Any], path: Path, key: str, default: Any = None) -> int:
    """cfg[key] (or the first of a list, as diffusers allows for sample_size) as a positive int."""
    value = cfg.get(key, default)
    value = value[0] if isinstance(value, (list, tuple)) and value else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: {key} {cfg.get(key, default)!r} must be a positive integer")
    return value


def _ldm_unet(net: dict[str, Any], path: Path) -> tuple[DenoiserClass, int, int, int | None, bool]:
    """(class, latent channels, latent size, classes, learned sigma) of an LDMPipeline's unet/."""
    if net.get("_class_name") != "UNet2DModel":
        raise CheckpointError(f"{path}: _class_name {net.get('_class_name')!r} is not UNet2DModel")
    if net.get("num_class_embeds") is not None:
        raise CheckpointError(f"{path}: num_class_embeds {net['num_class_embeds']!r}: an LDMPipeline is unconditional")
    channels = _positive(net, path, "in_channels", 4)
    out_channels = _positive(net, path, "out_channels", channels)
    if out_channels != channels:
        raise CheckpointError(f"{path}: out_channels {out_channels} != in_channels {channels}")
    return "UNet2DModel", channels, _positive(net, path, "sample_size"), None, False


def _dit_transformer(net: dict[str, Any], path: Path) -> tuple[DenoiserClass, int, int, int | None, bool]:
    """The same for a DiTPipeline's transformer/: class-conditional, maybe with learned variances."""
    if net.get("_class_name") not in DIT_CLASSES:
        raise CheckpointError(f"{path}: _class_name {net.get('_class_name')!r} is not a DiT ({', '.join(DIT_CLASSES)})")
    if net.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or net.get("patch_size") is None:
        raise CheckpointError(
            f"{path}: norm_type {net.get('norm_type')!r} / patch_size {net.get('patch_size')!r}: "
            "a DiT has norm_type 'ada_norm_zero' and a patch_size"
        )
    channels = _positive(net, path, "in_channels", 4)
    out_channels = net.get("out_channels") or channels
    if out_channels not in (channels, 2 * channels):
        raise CheckpointError(
            f"{path}: out_channels {out_channels!r} is neither in_channels {channels} nor twice it "
            "(noise plus learned variances)"
        )
    size = _positive(net, path, "sample_size", 32)
    num_classes = _positive(net, path, "num_embeds_ada_norm", 1000)
    return "DiTTransformer2DModel", channels, size, num_classes, out_channels == 2 * channels


def _decoder(dec: dict[str, Any], path: Path, decoder: DecoderClass, channels: int) -> tuple[int, int, float]:
    """(image channels, upsampling factor, scaling_factor) of a decoder that takes the
    denoiser's `channels`-channel latents."""
    if dec.get("_class_name") != decoder:
        raise CheckpointError(f"{path}: _class_name {dec.get('_class_name')!r} is not {decoder}")
    if decoder == "VQModel":  # the codebook's vectors are what the UNet denoises
        latent_channels = dec.get("vq_embed_dim") or _positive(dec, path, "latent_channels", 3)
    else:
        latent_channels = _positive(dec, path, "latent_channels", 4)
        if dec.get("shift_factor") not in (
            None,
            0,
            0.0,
        ):  # DiTPipeline never shifts: a latent space of another pipeline
            raise CheckpointError(f"{path}: shift_factor {dec['shift_factor']!r} is not supported (DiTPipeline)")
    if latent_channels != channels:
        raise CheckpointError(
            f"{path}: the decoder takes {latent_channels}-channel latents, the denoiser makes {channels}"
        )
    blocks = dec.get("block_out_channels", [64])
    if not isinstance(blocks, list) or not blocks:
        raise CheckpointError(f"{path}: block_out_channels {blocks!r} must be a non-empty list")
    image_channels = _positive(dec, path, "out_channels", 3)
    if image_channels not in (1, 3):
        raise CheckpointError(f"{path}: out_channels {image_channels} is not an image (1 or 3 channels)")
    scaling = dec.get("scaling_factor", DEFAULT_SCALING)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
        raise CheckpointError(f"{path}: scaling_factor {scaling!r} must be a positive number")
    return image_channels, 2 ** (len(blocks) - 1), float(scaling)  # every decoder block but the last doubles


def _class_names(index: dict[str, Any], path: Path, num_classes: int | None) -> tuple[str, ...] | None:
    """The pipeline's id2label ({"0": "tench, Tinca tinca", ...}) as class_names, or None."""
    id2label = index.get("id2label")
    if id2label is None or num_classes is None:
        return None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise CheckpointError(f"{path}: id2label must map class ids to names")
    names = {str(k): v for k, v in id2label.items()}
    missing = [i for i in range(num_classes) if str(i) not in names]
    if missing or len(names) != num_classes:
        raise CheckpointError(
            f"{path}: id2label names {len(names)} classes, the denoiser has {num_classes} (0..{num_classes - 1})"
        )
    return tuple(names[str(i)] for i in range(num_classes))


def _require_safetensors(folder: Path) -> None:
    if not (folder / DIFFUSERS_WEIGHTS).is_file():
        pickled = (folder / PICKLED_WEIGHTS).is_file()
        raise CheckpointError(
            f"{folder / DIFFUSERS_WEIGHTS}: missing"
            + (
                f" ({PICKLED_WEIGHTS} is a pickle, which undiffuse does not load: save it as safetensors)"
                if pickled
                else ""
            )
        )


def _diffusers_spec(folder: Path, raw: dict[str, Any]) -> ModelSpec:
    if raw.get("_class_name") != "UNet2DModel":
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: _class_name {raw.get('_class_name')!r} is not a network undiffuse "
            "serves (UNet2DModel)"
        )
    scheduler = diffusers_scheduler(folder)
    size = raw.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    try:
        image_size, channels = int(size), int(raw.get("in_channels", 3))
        out_channels = int(raw.get("out_channels", channels))
        num_classes = raw.get("num_class_embeds")
        num_classes = int(num_classes) if num_classes is not None else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid UNet2DModel config ({e})") from e
    if out_channels != channels:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: out_channels {out_channels} != in_channels {channels} "
            "(learned variances are not sampled by undiffuse)"
        )
    _require_safetensors(folder)
    return ModelSpec(
        path=folder,
        format="diffusers",
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        schedule=scheduler.schedule,
        prediction_type=scheduler.prediction_type,
        clip_sample=scheduler.clip_sample,
        thresholding=scheduler.thresholding,
        network_path=folder,
        raw=raw,
    )


SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
"""diffusers scheduler classes whose training schedule undiffuse reproduces exactly."""
CLIPPING_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
"""Those with `clip_sample` (default true); DPM-Solver++ has none."""
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DIFFUSERS_PREDICTION: dict[str, PredictionType] = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
FIXED_SETTINGS: dict[str, Any] = {"trained_betas": None, "rescale_betas_zero_snr": False}
"""Scheduler settings that change the noise process or the update, at the one value undiffuse reproduces."""


@dataclass(frozen=True)
class DiffusersScheduler:
    """What undiffuse takes from a diffusers scheduler_config.json."""

    schedule: ScheduleConfig
    prediction_type: PredictionType
    clip_sample: bool | None
    thresholding: Thresholding | None = None


def diffusers_scheduler(folder: Path) -> DiffusersScheduler:
    """The schedule, prediction type and x̂₀ clipping of a diffusers network folder, from its
    scheduler_config.json or its pipeline's scheduler/ (see the module docstring)."""
    path = folder / SCHEDULER_FILE
    if not path.is_file():
        path = folder.parent / "scheduler" / SCHEDULER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no {SCHEDULER_FILE} beside the network nor in ../scheduler/, so the noise schedule it "
            f"was trained with is unknown; copy the pipeline's scheduler/{SCHEDULER_FILE} into the folder"
        )
    cfg = read_json(path)

    def refuse(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {name} {cfg.get(name)!r} {why}")

    _check_reproduced(cfg, refuse)
    kind = cfg.get("beta_schedule", "linear")
    try:
        steps = int(cfg.get("num_train_timesteps", 1000))
        if kind == "squaredcos_cap_v2":
            schedule = ScheduleConfig("cosine", steps)
        else:
            beta_start, beta_end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
            schedule = ScheduleConfig("linear" if kind == "linear" else "scaled_linear", steps, beta_start, beta_end)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid scheduler config ({e})") from e
    clip = cfg.get("clip_sample", True) if cfg["_class_name"] in CLIPPING_SCHEDULERS else None
    thresholding = None
    if cfg.get("thresholding", False):
        try:
            thresholding = Thresholding(
                float(cfg.get("dynamic_thresholding_ratio", 0.995)), float(cfg.get("sample_max_value", 1.0))
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid dynamic thresholding ({e})") from e
    return DiffusersScheduler(schedule, DIFFUSERS_PREDICTION[cfg.get("prediction_type", "epsilon")], clip, thresholding)


def _check_reproduced(cfg: dict[str, Any], refuse: Callable[[str, str], CheckpointError]) -> None:
    """Raise refuse(field, why) for the first setting undiffuse does not reproduce."""
    if cfg.get("_class_name") not in SCHEDULERS:
        raise refuse("_class_name", f"is not a scheduler undiffuse reproduces ({', '.join(SCHEDULERS)})")
    if cfg.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise refuse("beta_schedule", f"is not supported ({', '.join(BETA_SCHEDULES)})")
    if cfg.get("prediction_type", "epsilon") not in DIFFUSERS_PREDICTION:
        raise refuse("prediction_type", f"is not supported ({', '.join(DIFFUSERS_PREDICTION)})")
    for name, reproduced in FIXED_SETTINGS.items():
        if cfg.get(name, reproduced) != reproduced:
            raise refuse(name, f"is not supported (undiffuse reproduces {reproduced!r} only)")
    if not isinstance(cfg.get("thresholding", False), bool):
        raise refuse("thresholding", "must be true or false")
    if cfg.get("variance_type") in ("learned", "learned_range"):
        raise refuse("variance_type", "is not supported (learned variances)")
    if cfg["_class_name"] in CLIPPING_SCHEDULERS:
        if not isinstance(cfg.get("clip_sample", True), bool):
            raise refuse("clip_sample", "must be true or false")
        clips = cfg.get("clip_sample", True) and not cfg.get("thresholding", False)  # thresholding replaces it
        if clips and cfg.get("clip_sample_range", 1.0) != 1.0:
            raise refuse("clip_sample_range", "is not supported (undiffuse clips to [-1, 1])")


def weights_path(spec: ModelSpec) -> Path:
    """The safetensors file of the model's network."""
    if spec.format == "undiffuse":
        return spec.path / WEIGHTS_FILE
    return (spec.network_path or spec.path) / DIFFUSERS_WEIGHTS


def check_weights(spec: ModelSpec) -> None:
    """CheckpointError unless the model's safetensors files (the network's, and a latent model's
    decoder's) are whole: each header parses and each file is as long as its header says. Reads
    the headers only (no torch, no tensor data), so a truncated or foreign file is caught where
    the folder is listed, not when a replica loads it."""
    _check_safetensors(weights_path(spec))
    if spec.latent:
        _check_safetensors(spec.latent.decoder_path / DIFFUSERS_WEIGHTS)


def _check_safetensors(path: Path) -> None:
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    try:
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (tensor entry without data_offsets: {e})") from e
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise CheckpointError(
            f"{path}: truncated or padded safetensors file ({size} bytes, the header says {expected})"
        )
