"""Structured logs: with log_encoding JSON (the test stack's), one job can be followed through
the Ingress, the Worker and the Denoiser by its id (the `job` field) in the replicas' JSON log lines, with
its owner (never the key), shard, attempt and durations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.api_keys import digest
from tests.service.conftest import KEY_A, wait_for, wait_for_status

pytestmark = pytest.mark.integration


def _serve_log_lines() -> list[dict]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    lines = []
    for path in logs.glob("replica_undiffuse_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines


def test_one_job_can_be_followed_through_every_deployment(api, stack):
    job = api.post("/v1/jobs", json={"num_images": 6, "class_label": 4, "steps": 3}).json()
    wait_for_status(api, job["id"], {"succeeded"})
    owner = digest(KEY_A)[:24]  # a plain key's owner id (service.api_keys)

    def of_job() -> list[dict]:
        return [r for r in _serve_log_lines() if r.get("job") == job["id"]]

    # the Worker logs the job's success right after the transition; the file may lag a moment
    lines = wait_for(lambda: (got := of_job()) and any(r.get("status") == "succeeded" for r in got) and got, 30)
    by_deployment = {r["deployment"] for r in lines}
    assert by_deployment == {"undiffuse_Ingress", "undiffuse_Worker", "undiffuse_Denoiser"}, by_deployment
    assert all(r["owner"] == owner for r in lines)
    queued = [r for r in lines if r.get("status") == "queued"]
    assert len(queued) == 1 and queued[0]["deployment"] == "undiffuse_Ingress" and queued[0]["images"] == 6

    shards = 6 // stack.settings.shard_size + (6 % stack.settings.shard_size > 0)
    done = [r for r in lines if r["deployment"] == "undiffuse_Worker" and "sample_ms" in r]
    assert sorted(r["shard"] for r in done) == list(range(shards))
    for r in done:
        assert r["attempt"] >= 1 and r["duration_ms"] >= r["sample_ms"] > 0 and r["upload_ms"] >= 0
    sampled = [r for r in lines if r["deployment"] == "undiffuse_Denoiser"]
    assert sorted(r["shard"] for r in sampled) == list(range(shards)) and all(r["duration_ms"] > 0 for r in sampled)
    succeeded = [r for r in lines if r.get("status") == "succeeded"]
    assert len(succeeded) == 1 and succeeded[0]["duration_ms"] > 0

    # the API key itself is in no log line of any replica
    assert not any(KEY_A in json.dumps(r) for r in _serve_log_lines())
