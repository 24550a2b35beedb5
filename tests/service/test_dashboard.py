"""The Grafana dashboard queries only metric names the running service really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.service.conftest import enqueue_unrunnable_job, sample_names, scrape, wait_for, wait_for_status

pytestmark = pytest.mark.integration
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "undiffuse.json"


def _base(name: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", name)


def test_dashboard_metrics_exist_in_a_scrape(api, stack):
    panels = json.loads(DASHBOARD.read_text())["panels"]
    wanted = {_base(m) for p in panels for t in p["targets"] for m in re.findall(r"\bray_[a-z_]+", t["expr"])}
    assert len(wanted) >= 6
    # exercise every path once: a job that succeeds and one whose shard fails and is retried
    # submitted together, so the Denoiser may batch them: the bad shard must not fail the good one
    bad = enqueue_unrunnable_job(stack)
    ok = api.post("/v1/jobs", json={"num_images": 2, "steps": 3, "class_label": 9}).json()["id"]
    wait_for_status(api, ok, {"succeeded"})
    wait_for_status(api, bad, {"failed"})

    def exported():
        names = {_base(name) for name in sample_names(scrape(stack)) if name.startswith("ray_")}
        return names if wanted <= names else None

    names = wait_for(exported, 30, 1.0, "every dashboard metric to be exported")
    assert wanted <= names
