"""The sampler registry: names, options and construction."""

import pytest

from undiffuse import DDIMSampler, DDPMSampler, NoiseSchedule, Sampler
from undiffuse.registry import SAMPLER_NAMES, SAMPLERS, make_sampler, sampler_class, sampler_entry


def test_every_entry_builds_its_sampler_and_names_match():
    schedule = NoiseSchedule.linear(100)
    for name, entry in SAMPLERS.items():
        cls = sampler_class(name)
        assert issubclass(cls, Sampler) and cls.name == name == entry.name
        assert isinstance(make_sampler(name, schedule), cls)
    assert SAMPLER_NAMES == ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_logsnr")


def test_options_reach_the_sampler():
    schedule = NoiseSchedule.linear(100)
    ddim = make_sampler("ddim", schedule, eta=0.5)
    assert isinstance(ddim, DDIMSampler) and ddim.eta == 0.5 and ddim.needs_noise
    ddpm = make_sampler("ddpm", schedule, variance="fixed_large")
    assert isinstance(ddpm, DDPMSampler) and ddpm.variance == "fixed_large"


def test_select_keeps_only_the_options_a_sampler_takes():
    job = {"eta": 0.3}
    assert sampler_entry("ddim").select(job) == {"eta": 0.3}
    assert sampler_entry("ddpm").select(job) == {}


def test_unknown_names_and_options_are_errors():
    schedule = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; available: ddpm, ddim, dpmpp_2m, dpmpp_2m_logsnr"):
        make_sampler("euler", schedule)
    with pytest.raises(ValueError, match=r"sampler 'ddpm' takes no option\(s\) \['eta'\]"):
        make_sampler("ddpm", schedule, eta=0.5)
