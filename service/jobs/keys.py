"""Every Redis key the service uses. Nothing else spells a key."""

PREFIX = "undiffuse"
SHARD_STREAM = f"{PREFIX}:shards"
DEAD_LETTER_STREAM = f"{PREFIX}:shards:dead"
CONSUMER_GROUP = "workers"


def job(job_id: str) -> str:
    """HASH: the job record (see service.jobs.store for its fields)."""
    return f"{PREFIX}:job:{job_id}"


def job_done_shards(job_id: str) -> str:
    """SET: indices of the job's shards whose images are all in the bucket."""
    return f"{PREFIX}:job:{job_id}:done"


def job_events(job_id: str) -> str:
    """STREAM: the job's events (service.jobs.events), as long-lived as the record."""
    return f"{PREFIX}:job:{job_id}:events"


def job_files(job_id: str) -> str:
    """HASH: shard index -> JSON [[sha256 hex, size], ...] of the shard's PNGs as uploaded, from
    which the job's manifest is written (service.manifest)."""
    return f"{PREFIX}:job:{job_id}:files"


def job_webhooks(job_id: str) -> str:
    """HASH: webhook event -> JSON outcome of its delivery (service.jobs.webhooks), as
    long-lived as the record and deleted with it."""
    return f"{PREFIX}:job:{job_id}:webhooks"


WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
"""ZSET: "{job id}:{event}" of every delivery not yet delivered or given up, scored by when its
next attempt is due (epoch seconds); a claimed one is pushed a lease ahead."""

PURGE = f"{PREFIX}:purge"
"""ZSET: job ids scored by when their objects are to be deleted (epoch seconds)."""


def owner_jobs(owner: str) -> str:
    """ZSET: the owner's job ids scored by creation time (microseconds)."""
    return f"{PREFIX}:owner:{owner}:jobs"


def owner_status_jobs(owner: str, status: str) -> str:
    """ZSET: the owner's job ids of one status, scored as in owner_jobs (the status index)."""
    return f"{PREFIX}:owner:{owner}:jobs:{status}"


def idempotency(owner: str, key: str) -> str:
    """STRING: {"job_id", "body_hash"} for an Idempotency-Key."""
    return f"{PREFIX}:idem:{owner}:{key}"
