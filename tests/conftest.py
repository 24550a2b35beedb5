"""Shared fixtures. The service tests run against real servers started once per session:
a Redis-compatible server, SeaweedFS's S3 gateway and a Ray Serve application (CPU)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
