"""UNDIFFUSE_DEVICE=cuda on a machine without a usable GPU: the Denoiser refuses to start, naming
why, instead of sampling on the CPU unnoticed (the gpu overlay sets cuda)."""

import pytest
import torch

from service.denoiser import Denoiser, pick_device
from service.settings import Settings


def test_a_replica_told_cuda_without_a_gpu_fails_to_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a no-op on a machine without CUDA
    settings = Settings(device="cuda", redis_url="redis://127.0.0.1:1/0")  # never reached
    with pytest.raises(RuntimeError, match=r"UNDIFFUSE_DEVICE=cuda, but .*(CPU build|no usable GPU)"):
        Denoiser.func_or_class(settings)


def test_auto_and_cpu_pick_what_exists():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto", torch).type == expected
    assert pick_device("cpu", torch).type == "cpu"


class _TorchWithoutGpu:
    """torch's device API as a CUDA build on a node without a GPU (driver missing) shows it."""

    __version__ = "2.13.0+cu130"
    device = torch.device

    class version:
        cuda = "13.0"

    class cuda:
        @staticmethod
        def is_available() -> bool:
            return False


def test_a_cuda_build_without_a_gpu_names_the_driver_and_the_gpu_request():
    with pytest.raises(RuntimeError, match=r"CUDA 13\.0\) finds no usable GPU.*driver.*nvidia\.com/gpu"):
        pick_device("cuda", _TorchWithoutGpu)
    assert pick_device("auto", _TorchWithoutGpu).type == "cpu"
