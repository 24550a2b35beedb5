"""The Prometheus endpoint, scraped for real."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.service.conftest import wait_for, wait_for_status, wait_idle

pytestmark = pytest.mark.integration


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(stack) -> str:
    return httpx.get(stack.metrics_url, timeout=10).text


def test_step_histogram_grows_by_steps_times_batches(api, stack):
    wait_idle(stack)  # nothing else may be sampled meanwhile
    time.sleep(1.5)  # and the last export of earlier work is in
    name = "ray_undiffuse_denoise_step_seconds_count"
    before = _sum(_scrape(stack), name, model="mnist", sampler="ddim")
    batches_before = _sum(_scrape(stack), "ray_undiffuse_sampler_batch_images_count", model="mnist")
    jobs_before = _sum(_scrape(stack), "ray_undiffuse_jobs_total", status="succeeded")
    # 3 images fit one shard (shard_size 4) and the stack is otherwise idle: one batch of 7 steps
    job = api.post("/v1/jobs", json={"num_images": 3, "steps": 7, "class_label": 6}).json()
    assert wait_for_status(api, job["id"], {"succeeded"})["status"] == "succeeded"

    # each replica process exports on its own timer: wait until all three have reported
    def settled():
        text = _scrape(stack)
        done = (
            _sum(text, "ray_undiffuse_jobs_total", status="succeeded") >= jobs_before + 1
            and _sum(text, "ray_undiffuse_sampler_batch_images_count", model="mnist") > batches_before
            and _sum(text, name, model="mnist", sampler="ddim") > before
        )
        return text if done else None

    wait_for(settled, 30, 0.5, "metrics to be exported")
    time.sleep(2)  # a further export round: counts must not grow past steps x batches
    text = _scrape(stack)
    batches = _sum(text, "ray_undiffuse_sampler_batch_images_count", model="mnist") - batches_before
    assert batches == 1
    assert _sum(text, name, model="mnist", sampler="ddim") - before == 7 * batches
    for metric in (
        "ray_undiffuse_job_duration_seconds_bucket",
        "ray_undiffuse_queue_wait_seconds_bucket",
        "ray_undiffuse_images_generated_total",
        "ray_undiffuse_queue_depth_shards",
    ):
        assert re.search(rf"^{metric}[{{ ]", text, re.M), metric
    # no job ids in labels
    assert job["id"] not in text
