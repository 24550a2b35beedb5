"""Layer rules: the import-linter contracts in pyproject.toml, and the same rules observed at
run time (importing the HTTP layer, the job store and the workers loads no torch; the API client
and the CLI's service commands run where torch, numpy, Pillow and safetensors are not installed,
on what `pip install undiffuse` brings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    declared = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert re.search(rf"Contracts: {declared} kept, 0 broken", proc.stdout), proc.stdout


def test_http_layer_jobs_and_workers_load_no_torch():
    code = (
        "import sys\n"
        "import service.api.fastapi_app, service.jobs.lifecycle, service.jobs.queue, worker.consumer\n"
        "import service.models, service.autoscaling\n"
        "sys.exit('torch' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


# Run where only some packages exist: a finder in front of every other refuses any top-level
# module outside `allowed` (the standard library, undiffuse, and the distributions pyproject's
# dependencies install), as a machine with nothing else installed would; optional imports
# (httpx's CLI, httpcore's HTTP/2) fail as they would there. Then the client, and the CLI's
# service commands through to a request, which goes to a closed port (exit 3: unreachable).
_ON_BASE_DEPENDENCIES = """
import json, sys
allowed = set(json.loads(sys.argv[1])) | set(sys.stdlib_module_names) | {"undiffuse"}

class OnlyAllowed:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)
        return None

sys.meta_path.insert(0, OnlyAllowed())
import undiffuse
from undiffuse.client import AsyncClient, Client, Job, JobEvent, WaitTimeout
from undiffuse.cli import main
codes = [main([*command, "--url", "http://127.0.0.1:9", "--api-key", "k"])
         for command in (["models"], ["jobs", "list"], ["submit", "--class", "1,2"], ["webhook-secret"])]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


def _closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install, with what they require in turn (installed ones)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(req.name) or []
        except PackageNotFoundError:
            continue
        for need in map(Requirement, needs):
            if need.marker is None or need.marker.evaluate({"extra": ""}):
                todo.append(need)
    return seen


@pytest.mark.slow
def test_the_client_and_the_service_commands_run_on_the_base_dependencies_alone():
    """`pip install undiffuse` (no extra) is enough for them, and brings no torch."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib

    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = _closure(base)
    assert not {"torch", "numpy", "pillow", "safetensors"} & installed
    modules = sorted(
        module
        for module, dists in packages_distributions().items()
        if {canonicalize_name(d) for d in dists} & installed
    )
    assert {"httpx", "httpx_sse", "stamina", "tqdm"} <= set(modules)
    proc = subprocess.run(
        [sys.executable, "-c", _ON_BASE_DEPENDENCIES, json.dumps(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"codes": [3, 3, 3, 3], "torch": False}, proc.stderr  # each reached for the service
