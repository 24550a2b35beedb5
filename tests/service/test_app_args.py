"""The application builder's arguments (no servers needed)."""

import pytest
from pydantic import ValidationError

from service.app import AppArgs


def test_arguments_of_an_older_release_are_refused_not_ignored():
    with pytest.raises(ValidationError, match="sampler_num_gpus"):
        AppArgs(sampler_num_gpus=1)
    with pytest.raises(ValidationError, match="shards"):
        AppArgs(denoiser_autoscaling={"shards": 4})
    assert AppArgs(denoiser_num_gpus=1).denoiser_num_gpus == 1
