"""Prometheus metrics, recorded through Ray's metrics API so that every replica process reports
to its node's metrics agent, which Prometheus scrapes (port 8080 by default, see
docs/architecture.md). Ray prefixes each name with `ray_`: undiffuse_denoise_step_seconds is
scraped as ray_undiffuse_denoise_step_seconds. No job ids as labels.
"""

from __future__ import annotations

from functools import cache

from ray.util import metrics

STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
JOB_BUCKETS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@cache
def denoise_step_seconds() -> metrics.Histogram:
    return metrics.Histogram(
        "undiffuse_denoise_step_seconds",
        description="Time of one denoising step of the Denoiser's running batch (device time on a GPU).",
        boundaries=STEP_BUCKETS,
        tag_keys=("model", "sampler"),
    )


GAP_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]


@cache
def engine_step_gap_seconds() -> metrics.Histogram:
    return metrics.Histogram(
        "undiffuse_engine_step_gap_seconds",
        description="Host time from the end of one denoising step's call to the start of the next while "
        "work continues (reports, commands, and the replica's event loop holding the GIL): time a GPU "
        "waits for Python unless the queued steps outlast it.",
        boundaries=GAP_BUCKETS,
    )


@cache
def sampler_batch_images() -> metrics.Histogram:
    return metrics.Histogram(
        "undiffuse_sampler_batch_images",
        description="Rows (images, guidance twins included) advanced together by one denoising step: one "
        "network call, so its mean over max_batch is how full the engine runs.",
        boundaries=BATCH_BUCKETS,
        tag_keys=("model",),
    )


@cache
def job_duration_seconds() -> metrics.Histogram:
    return metrics.Histogram(
        "undiffuse_job_duration_seconds",
        description="From submission to the job's final status.",
        boundaries=JOB_BUCKETS,
        tag_keys=("status",),
    )


@cache
def queue_wait_seconds() -> metrics.Histogram:
    return metrics.Histogram(
        "undiffuse_queue_wait_seconds",
        description="From submission until a worker starts the job.",
        boundaries=JOB_BUCKETS,
    )


@cache
def jobs_total() -> metrics.Counter:
    return metrics.Counter("undiffuse_jobs_total", description="Jobs by final status.", tag_keys=("status",))


@cache
def images_generated_total() -> metrics.Counter:
    return metrics.Counter("undiffuse_images_generated_total", description="Images uploaded.", tag_keys=("model",))


@cache
def queue_depth() -> metrics.Gauge:
    return metrics.Gauge("undiffuse_queue_depth_shards", description="Shards waiting or in flight in the queue.")


@cache
def queue_backlog_cost() -> metrics.Gauge:
    return metrics.Gauge(
        "undiffuse_queue_backlog_row_steps",
        description="Cost of the shards waiting or in flight, in row-steps (images x steps, x2 with guidance).",
    )


@cache
def denoiser_throughput() -> metrics.Gauge:
    return metrics.Gauge(
        "undiffuse_denoiser_throughput_row_steps",
        description="Row-steps per second of a Denoiser replica's recent steps (what it reports for admission, "
        "queue estimates and autoscaling).",
        tag_keys=("replica",),
    )


@cache
def shard_retries_total() -> metrics.Counter:
    return metrics.Counter(
        "undiffuse_shard_retries_total", description="Shards put back for another attempt.", tag_keys=("reason",)
    )


@cache
def dependency_waits_total() -> metrics.Counter:
    return metrics.Counter(
        "undiffuse_dependency_waits_total",
        description="Retries of a finished shard's upload, completion or ack while S3 or Redis was unreachable.",
        tag_keys=("step",),
    )


@cache
def webhook_deliveries_total() -> metrics.Counter:
    return metrics.Counter(
        "undiffuse_webhook_deliveries_total",
        description="Webhook delivery attempts by outcome: delivered, retried (failed, another attempt is due), "
        "failed (the last attempt failed), dropped (the job was deleted first).",
        tag_keys=("outcome",),
    )


@cache
def auth_failures_total() -> metrics.Counter:
    return metrics.Counter(
        "undiffuse_auth_failures_total",
        description="Requests refused for their API key: missing (no Authorization: Bearer), invalid (not a key) "
        "or revoked (service.keyring).",
        tag_keys=("reason",),
    )
