"""Every Redis key the service uses. Nothing else spells a key."""

PREFIX = "undiffuse"
DEAD_LETTER_STREAM = f"{PREFIX}:shards:dead"
"""STREAM: shards out of attempts, or unreadable, with the reason (capped at 10,000)."""

# The shard queue (service.jobs.queue). Owners' keys are QUEUE_OWNER_PREFIX + owner (a HASH:
# shards waiting or in flight, rows held, deficit, cost enqueued and admitted) and that + ":shards"
# (a LIST of the owner's waiting shard ids, oldest first).
QUEUE_OWNER_PREFIX = f"{PREFIX}:q:owner:"
QUEUE_ACTIVE = f"{PREFIX}:q:active"
"""LIST: owners with shards waiting, in round-robin order."""
QUEUE_WAITING_COST = f"{PREFIX}:q:waiting"
"""HASH: owner -> cost (row-steps) of its shards waiting."""
QUEUE_TOTALS = f"{PREFIX}:q:totals"
"""HASH: waiting, waiting_cost, inflight, inflight_rows, inflight_cost, owners."""
QUEUE_MESSAGES = f"{PREFIX}:q:msg"
"""HASH: shard id -> ShardTask JSON, while the shard waits or is in flight."""
QUEUE_META = f"{PREFIX}:q:meta"
"""HASH: shard id -> JSON [owner, cost, rows]."""
QUEUE_LEASES = f"{PREFIX}:q:leases"
"""ZSET: shard ids in flight, scored by their lease's deadline (epoch ms)."""
QUEUE_LESSEES = f"{PREFIX}:q:lessees"
"""HASH: shard id -> its current lease token."""
QUEUE_SEQ = f"{PREFIX}:q:seq"
"""STRING: the counter shard ids and lease tokens are drawn from."""
QUEUE_REPLY_PREFIX = f"{PREFIX}:q:reply:"
"""+ consumer: STRING, JSON [nonce, reply] of its last admit or reclaim (a minute), for retries."""
QUEUE_WAKE = f"{PREFIX}:q:wake"
"""LIST: a token per submission, so a waiting Worker wakes at once (capped at 16)."""
DENOISERS = f"{PREFIX}:denoisers"
"""HASH: Denoiser replica id -> JSON {max_batch, throughput, at} (service.jobs.capacity)."""


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
    which the job's manifest is written (service.archive)."""
    return f"{PREFIX}:job:{job_id}:files"


def job_previews(job_id: str) -> str:
    """LIST: stream ids of the job's preview events still in its stream, oldest first: the
    newest PREVIEWS_KEPT while it runs, none once it has ended (service.jobs.events)."""
    return f"{PREFIX}:job:{job_id}:previews"


def job_webhooks(job_id: str) -> str:
    """HASH: webhook event -> JSON outcome of its delivery (service.jobs.webhook_schedule), as
    long-lived as the record and deleted with it."""
    return f"{PREFIX}:job:{job_id}:webhooks"


WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
"""ZSET: "{job id}:{event}" of every delivery not yet delivered or given up, scored by when its
next attempt is due (epoch seconds); a claimed one is pushed a lease ahead."""

WEBHOOKS_PARKED = f"{PREFIX}:webhooks:parked"
"""ZSET: owners with deliveries parked at their per-owner limit, by when the earliest came due."""
WEBHOOKS_PARKED_PREFIX = f"{WEBHOOKS_PARKED}:"
"""+ owner: ZSET of the owner's parked "{job id}:{event}" deliveries (service.jobs.webhook_schedule)."""

API_KEYS = f"{PREFIX}:apikeys"
"""HASH: key digest -> JSON {owner, created} of keys added at run time (service.keyring)."""
API_KEYS_REVOKED = f"{PREFIX}:apikeys:revoked"
"""HASH: revoked key digests (configured ones too) -> when (service.keyring)."""
API_KEYS_VERSION = f"{PREFIX}:apikeys:version"
"""STRING: bumped with every key ring change, so replicas re-read the ring only when it moved."""

PURGE = f"{PREFIX}:purge"
"""ZSET: job ids scored by when their objects are to be deleted (epoch seconds)."""


def owner_shards(owner: str) -> str:
    """LIST: the owner's waiting shard ids, oldest first (service.jobs.queue)."""
    return f"{QUEUE_OWNER_PREFIX}{owner}:shards"


def owner_jobs(owner: str) -> str:
    """ZSET: the owner's job ids scored by creation time (microseconds)."""
    return f"{PREFIX}:owner:{owner}:jobs"


def owner_status_jobs(owner: str, status: str) -> str:
    """ZSET: the owner's job ids of one status, scored as in owner_jobs (the status index)."""
    return f"{PREFIX}:owner:{owner}:jobs:{status}"


def owner_slots(owner: str) -> str:
    """ZSET: lease tokens of the owner's open event streams and archive downloads, scored by
    when each lease ends in epoch ms (service.jobs.slots)."""
    return f"{PREFIX}:owner:{owner}:slots"


def owner_stored_bytes(owner: str) -> str:
    """STRING: bytes of the owner's images in the bucket (service.jobs.store: counted as shards
    complete, given back when a job's objects are deleted)."""
    return f"{PREFIX}:owner:{owner}:stored_bytes"


def job_usage(job_id: str) -> str:
    """HASH: owner, bytes of the job's images counted in owner_stored_bytes; it outlives the
    record until the job's objects are deleted, which gives the bytes back."""
    return f"{PREFIX}:job:{job_id}:usage"


def idempotency(owner: str, key: str) -> str:
    """STRING: {"job_id", "body_hash"} for an Idempotency-Key."""
    return f"{PREFIX}:idem:{owner}:{key}"
