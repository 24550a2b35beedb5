"""docker-compose.yml and the monitoring configuration, validated offline."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT.parent / "shared" / "schemas"
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)


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


def test_only_the_api_port_is_published_and_secrets_are_required():
    published = {name: svc.get("ports") for name, svc in COMPOSE["services"].items() if svc.get("ports")}
    assert published == {"undiffuse": ["8000:8000"], "undiffuse-cpu": ["8000:8000"]}
    for var in ("UNDIFFUSE_API_KEYS", "S3_ACCESS_KEY", "S3_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(r"\$\{" + var + r":\?[^}]+\}", COMPOSE_TEXT), var


def test_gpu_reserved_with_a_cpu_profile_and_persistent_redis():
    gpu, cpu = COMPOSE["services"]["undiffuse"], COMPOSE["services"]["undiffuse-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    redis = COMPOSE["services"]["redis"]
    assert "--appendonly" in redis["command"] and any(v.endswith(":/data") for v in redis["volumes"])
    assert "mc mb --ignore-existing local/undiffuse" in " ".join(COMPOSE["services"]["minio"]["command"])


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
