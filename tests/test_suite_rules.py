"""The suite's own rules (tests/conftest.py), tried on a small suite in a child pytest: in CI a
skip is a failure unless the test is marked gpu, and a test that asks for a server is an
integration test, never in the fast tier."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs pytest in child processes

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
import pytest

@pytest.fixture(scope="session")
def redis_server():
    raise AssertionError("the fast tier must not start a server")

def test_plain():
    pass

def test_lacks_a_tool():
    pytest.skip("kubectl not installed")

@pytest.mark.gpu
def test_on_a_gpu():
    pytest.skip("needs a CUDA device")

@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False

def test_needs_redis(redis_server):
    pass
"""


def _pytest(tmp_path: Path, ci: str | None, *args: str) -> dict[str, str]:
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_small.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n  gpu\n  integration\n  slow\n  fast\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return dict(re.findall(r"^test_small\.py::(\w+) (PASSED|FAILED|SKIPPED|XFAIL|ERROR)", out, re.M))


def test_outside_ci_a_missing_tool_is_a_skip_and_the_fast_tier_starts_no_server(tmp_path):
    assert _pytest(tmp_path, None, "-m", "fast") == {
        "test_plain": "PASSED",
        "test_lacks_a_tool": "SKIPPED",
        "test_on_a_gpu": "SKIPPED",
        "test_known_failure": "XFAIL",
    }  # and test_needs_redis, which asks for a server, is not in it


def test_in_ci_only_a_gpu_test_may_skip_and_a_test_that_asks_for_a_server_is_integration(tmp_path):
    assert _pytest(tmp_path, "true", "-m", "not integration") == {
        "test_plain": "PASSED",
        "test_lacks_a_tool": "FAILED",
        "test_on_a_gpu": "SKIPPED",
        "test_known_failure": "XFAIL",
    }
    assert _pytest(tmp_path, "true", "-m", "integration") == {"test_needs_redis": "ERROR"}  # its server "starts"
