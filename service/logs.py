"""Fields for structured logs, so that an operator can follow one job through the Ingress, the
Worker and the Denoiser: pass them as `extra=` to a log call.

With AppArgs.log_encoding = "JSON", Serve writes each record of the replicas' log files (Ray's
logs/serve/) as one JSON object, and these fields become its keys beside Serve's own
(deployment, replica, request_id): `job` (the job id; Serve drops a field named job_id, which is
Ray's own), `shard`, `owner` (the key's owner id, never the key), `attempt`, `status` where a
job's status changed, and `duration_ms` where something took time. In TEXT encoding they are
left out of the line and the message says what matters."""

from __future__ import annotations

from typing import Any

from service.jobs.records import ShardTask


def job_fields(job_id: str, owner: str | None, **more: Any) -> dict[str, Any]:
    return {"job": job_id, "owner": owner, **more}


def shard_fields(task: ShardTask, **more: Any) -> dict[str, Any]:
    return {"job": task.job_id, "shard": task.shard, "owner": task.owner, "attempt": task.attempt, **more}


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
