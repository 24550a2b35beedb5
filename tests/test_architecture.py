"""Layer rules: the import-linter contracts in pyproject.toml, and the same rule observed at
run time (importing the HTTP layer, the job store and the workers loads no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 kept, 0 broken" in proc.stdout


def test_http_layer_jobs_and_workers_load_no_torch():
    code = (
        "import sys\n"
        "import service.api.fastapi_app, service.jobs.lifecycle, service.jobs.queue, worker.consumer\n"
        "import service.models, service.autoscaling\n"
        "sys.exit('torch' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
