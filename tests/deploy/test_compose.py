"""docker-compose.yml and the monitoring configuration, validated offline."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT.parent / "shared" / "schemas"
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_validates_against_the_compose_spec():
    schema_path = SCHEMAS / "compose-spec.json"
    if not schema_path.is_file():
        pytest.skip("shared/schemas is not beside this checkout")
    jsonschema.validate(COMPOSE, json.loads(schema_path.read_text()))


def test_every_service_is_healthchecked_and_waits_for_healthy_dependencies():
    services = COMPOSE["services"]
    assert {"undiffuse", "undiffuse-cpu", "redis", "minio", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)


def test_only_the_api_and_s3_are_published_and_secrets_are_required():
    published = {name: svc.get("ports") for name, svc in COMPOSE["services"].items() if svc.get("ports")}
    assert published == {
        "undiffuse": ["8000:8000"],
        "undiffuse-cpu": ["8000:8000"],
        "minio": ["${S3_PUBLISH_ADDRESS:-127.0.0.1}:9000:9000"],  # loopback unless told otherwise
    }
    for var in ("UNDIFFUSE_API_KEYS", "S3_ACCESS_KEY", "S3_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(r"\$\{" + var + r":\?[^}]+\}", COMPOSE_TEXT), var


def _default(value: str) -> str:
    """`${VAR:-default}` -> default (compose's interpolation, for the defaults used here)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_presigned_urls_point_at_a_port_published_on_the_host():
    """The README's download step fetches each result's presigned URL from the host: its
    endpoint must be where MinIO's S3 API is published, by default."""
    env = COMPOSE["services"]["undiffuse"]["environment"]
    public = urlsplit(_default(env["UNDIFFUSE_S3_PUBLIC_ENDPOINT_URL"]))
    internal = urlsplit(env["UNDIFFUSE_S3_ENDPOINT_URL"])
    assert (internal.hostname, internal.port) == ("minio", 9000)
    host, host_port, container_port = _default(COMPOSE["services"]["minio"]["ports"][0]).rsplit(":", 2)
    assert int(container_port) == internal.port  # MinIO's S3 API (`minio server` listens on :9000)
    assert public.port == int(host_port) and public.hostname in ("localhost", host)
    assert host == "127.0.0.1"


def test_healthchecks_run_what_the_image_has_and_the_gpu_service_insists_on_cuda():
    installed = re.search(r"apt-get install[^\n]*", DOCKERFILE.replace("\\\n", " ")).group(0)
    for name in ("undiffuse", "undiffuse-cpu"):
        binary = COMPOSE["services"][name]["healthcheck"]["test"][1]
        assert re.search(rf"\b{binary}=", installed), f"{name}'s healthcheck runs {binary}, not in the image"
    assert COMPOSE["services"]["undiffuse"]["environment"]["UNDIFFUSE_DEVICE"] == "cuda"
    assert "UNDIFFUSE_DEVICE" not in COMPOSE["services"]["undiffuse-cpu"]["environment"]
    # the rest of the environment is shared (a YAML merge, not a copy that drifts)
    gpu_env = {k: v for k, v in COMPOSE["services"]["undiffuse"]["environment"].items() if k != "UNDIFFUSE_DEVICE"}
    assert gpu_env == COMPOSE["services"]["undiffuse-cpu"]["environment"]


def test_gpu_reserved_with_a_cpu_profile_and_persistent_redis():
    gpu, cpu = COMPOSE["services"]["undiffuse"], COMPOSE["services"]["undiffuse-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    redis = COMPOSE["services"]["redis"]
    assert "--appendonly" in redis["command"] and any(v.endswith(":/data") for v in redis["volumes"])
    assert "mc mb --ignore-existing local/undiffuse" in " ".join(COMPOSE["services"]["minio"]["command"])


def test_the_stack_says_which_environment_it_is():
    """The image defaults to production (fail closed); this stack serves hashed keys and real
    secrets, so it says production itself rather than lean on that default."""
    for name in ("undiffuse", "undiffuse-cpu"):
        assert COMPOSE["services"][name]["environment"]["UNDIFFUSE_ENVIRONMENT"] == "production", name
    assert re.search(r"^\s+UNDIFFUSE_ENVIRONMENT: production$", COMPOSE_TEXT, re.M)


def test_redis_is_the_patched_image_the_cluster_runs():
    """One Redis image for both stacks; k8s/base/redis.yaml's is checked for its CVE fixes
    (tests/deploy/test_k8s.py)."""
    k8s = yaml.safe_load_all((ROOT / "k8s" / "base" / "redis.yaml").read_text())
    (statefulset,) = [d for d in k8s if d and d["kind"] == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert COMPOSE["services"]["redis"]["image"] == container["image"]


def promtool() -> str | None:
    candidates = [
        shutil.which("promtool"),
        str(Path(sys.executable).parent.parent / "tools" / "usr" / "bin" / "promtool"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


def test_prometheus_config_passes_promtool():
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not available: dev.py fetches Debian's prometheus package where apt exists")
    proc = subprocess.run(
        [tool, "check", "config", "deploy/prometheus/prometheus.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_grafana_provisioning_points_at_the_dashboard():
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dash = json.loads((ROOT / "deploy/grafana/dashboards/undiffuse.json").read_text())
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for needed in (
        "denoising step latency",
        "queue depth",
        "jobs finished per second",
        "images per second",
        "failures",
    ):
        assert needed in titles
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert "histogram_quantile(0.5" in exprs and "histogram_quantile(0.95" in exprs
