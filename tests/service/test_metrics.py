"""The Prometheus endpoint, scraped for real."""

from __future__ import annotations

import time

import pytest

from tests.service.conftest import sample_names, sample_sum, scrape, wait_for, wait_for_status, wait_idle

pytestmark = pytest.mark.integration


def test_every_denoising_step_is_recorded_with_its_batch_size(api, stack):
    wait_idle(stack)  # nothing else may be sampled meanwhile
    time.sleep(1.5)  # and the last export of earlier work is in
    name = "ray_undiffuse_denoise_step_seconds_count"
    before = sample_sum(scrape(stack), name, model="mnist", sampler="ddim")
    batches_before = sample_sum(scrape(stack), "ray_undiffuse_sampler_batch_images_count", model="mnist")
    rows_before = sample_sum(scrape(stack), "ray_undiffuse_sampler_batch_images_sum", model="mnist")
    jobs_before = sample_sum(scrape(stack), "ray_undiffuse_jobs_total", status="succeeded")
    gaps_before = sample_sum(scrape(stack), "ray_undiffuse_engine_step_gap_seconds_count")
    # 3 images fit one shard (shard_size 4) and the stack is otherwise idle: 7 steps of 3 rows
    job = api.post("/v1/jobs", json={"num_images": 3, "steps": 7, "class_label": 6}).json()
    assert wait_for_status(api, job["id"], {"succeeded"})["status"] == "succeeded"

    # each replica process exports on its own timer: wait until all three have reported
    def settled():
        text = scrape(stack)
        done = (
            sample_sum(text, "ray_undiffuse_jobs_total", status="succeeded") >= jobs_before + 1
            and sample_sum(text, "ray_undiffuse_sampler_batch_images_count", model="mnist") > batches_before
            and sample_sum(text, name, model="mnist", sampler="ddim") > before
        )
        return text if done else None

    wait_for(settled, 30, 0.5, "metrics to be exported")
    time.sleep(2)  # a further export round: counts must not grow past the job's steps
    text = scrape(stack)
    assert sample_sum(text, name, model="mnist", sampler="ddim") - before == 7
    assert sample_sum(text, "ray_undiffuse_sampler_batch_images_count", model="mnist") - batches_before == 7
    assert sample_sum(text, "ray_undiffuse_sampler_batch_images_sum", model="mnist") - rows_before == 7 * 3
    # the host time between consecutive steps: 6 between the 7, none before the first (it was idle)
    assert sample_sum(text, "ray_undiffuse_engine_step_gap_seconds_count") - gaps_before == 6
    for metric in (
        "ray_undiffuse_job_duration_seconds_bucket",
        "ray_undiffuse_queue_wait_seconds_bucket",
        "ray_undiffuse_images_generated_total",
        "ray_undiffuse_queue_depth_shards",
    ):
        assert metric in sample_names(text), metric
    # no job ids in labels
    assert not any(job["id"] in v for f in text for smp in f.samples for v in smp.labels.values())
