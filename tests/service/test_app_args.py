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


def test_a_single_node_ray_always_has_the_cpus_the_replicas_reserve():
    from service.run import ray_cpus

    # Denoiser 1 + Worker 0.5 + Ingress 0.5: the whole default stack needs two Ray CPUs
    assert AppArgs().cpus_needed() == 2.0
    assert AppArgs(denoiser_replicas=2, worker_replicas=3).cpus_needed() == 2.0 + 1.5 + 0.5
    assert AppArgs(denoiser_autoscaling={"min_replicas": 0, "max_replicas": 4}).cpus_needed() == 2.0

    # a 1-core container: Ray must still fit the app; where Ray's own count suffices it is kept
    # (it honours a container's CPU limit, which os.cpu_count() does not)
    assert ray_cpus(AppArgs().cpus_needed(), detected=1.0) == 2
    assert ray_cpus(4.5, detected=2.0) == 5
    assert ray_cpus(AppArgs().cpus_needed(), detected=16.0) is None
    assert ray_cpus(AppArgs().cpus_needed(), detected=2.0) is None
    assert ray_cpus(2.0) in (None, 2)  # this machine's own detection
