"""The fault drills at CI size (python -m bench.drills --short; docs/reliability.md): 100 jobs under
Worker and Denoiser kill -9s, Redis killed and restarted from its AOF, S3 down for 20 s, and 100
hostile requests, then every job's images counted and decoded.

The drill runs as a child process with a stack and a Ray of its own (the session's `stack`
fixture may hold a Ray in this process), so it needs no fixture; it takes about 3 minutes on
2 cores. Each outcome of its JSON report is asserted here on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def drill(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("drills") / "drills.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray, not the session's
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.drills", "--short", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    print(f"python -m bench.drills --short: exit {proc.returncode}, wall {time.monotonic() - started:.0f} s")
    print(proc.stdout[proc.stdout.find("# fault drills") :])  # the table (Ray's notices of the kills come before)
    assert out.exists(), f"no JSON report; exit {proc.returncode}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    result["exit_code"] = proc.returncode
    return result


def test_every_job_was_accepted_and_succeeded(drill):
    v = drill["verification"]
    # phase 1, phases 2 and 3, and one job per client submitted while S3 was down
    assert v["jobs"] == 100 + 2 * drill["config"]["outage_jobs"] + drill["config"]["clients"]
    assert v["not_accepted"] == [] and v["accepted"] == v["jobs"]
    assert v["succeeded"] == v["accepted"], v["problems"]
    assert v["failed"] == 0, v["problems"]
    assert v["lost"] == 0 and v["unfinished"] == 0, v["problems"]


def test_every_image_is_in_the_bucket_exactly_once_and_decodes(drill):
    v = drill["verification"]
    assert v["images_expected"] > 0
    assert v["images_present"] == v["images_expected"] and v["images_missing"] == 0, v["problems"]
    assert v["objects_extra"] == 0 and v["objects_of_unknown_jobs"] == 0
    assert v["results_duplicated"] == 0 and v["results_wrong"] == 0, v["problems"]
    assert v["pngs_decoded"] == v["images_present"] and v["pngs_bad"] == 0
    # every succeeded job has its manifest.json, and it vouches for the images as stored
    assert v["manifests"] == v["succeeded"] and v["manifests_missing"] == 0 and v["manifests_wrong"] == 0


def test_every_replica_kill_was_recovered_from(drill):
    kills = drill["load_with_kills"]["kills"]
    assert sorted(k["kind"] for k in kills) == ["Denoiser"] * 2 + ["Worker"] * 2
    for k in kills:
        assert "error" not in k, k
        assert k["replacement_running_s"] is not None and k["recovery_s"] is not None, k
        assert k["recovery_s"] >= k["replacement_running_s"] > 0, k
        if k["kind"] == "Worker" and k["orphaned_shards"]:  # the shards its consumer held were reclaimed
            assert k["orphans_reclaimed_s"] is not None, k


def test_redis_gap_answers_503_with_retry_after_and_nothing_else_fails(drill):
    r, calls = drill["redis"], drill["http"]
    assert r["api_back_s"] is not None  # the API answered 2xx again after the restart
    assert any(s.startswith("503") for s in r["gap_responses"]), r  # the gap was seen, as 503s
    assert r["gap_503_without_retry_after"] == 0
    assert calls["5xx_other_than_503_in_gap"] == 0, calls["examples"]
    assert calls["5xx_outside_redis_gap"] == 0, calls["examples"]
    assert calls["429_or_503_without_retry_after"] == 0
    assert calls["no_answer"] == 0, calls["examples"]


def test_s3_outage_keeps_accepting_jobs(drill):
    """Jobs are durably queued in Redis and the workers wait the outage out (docs/reliability.md)."""
    posts = drill["s3"]["outage_post_responses"]
    assert posts.get("202", 0) >= drill["config"]["clients"], posts  # the jobs submitted during the outage
    assert set(posts) <= {"200", "202"}, posts


def test_hostile_requests_get_no_5xx_and_no_cross_key_read(drill):
    h = drill["hostile"]
    assert h["requests"] == 100
    assert h["server_errors"] == []
    assert h["cross_key_reads"] == []


def test_the_drill_reports_every_target_met(drill):
    missed = [row for row in drill["targets"] if not row[3]]
    assert missed == [] and drill["ok"] is True and drill["exit_code"] == 0
