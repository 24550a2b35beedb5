"""The API's answers as typed values: jobs, their progress and results, pages of the job list,
events, and what a download wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Progress:
    images_done: int
    images_total: int
    step: int
    steps: int


@dataclass(frozen=True)
class ImageResult:
    index: int
    seed: int
    key: str
    url: str


@dataclass(frozen=True)
class Job:
    """A job as GET /v1/jobs/{id} shows it. `results` is one page (see `Client.results`)."""

    id: str
    status: str
    progress: Progress
    params: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, str] | None = None
    results: list[ImageResult] = field(default_factory=list)
    results_next_offset: int | None = None
    manifest_url: str | None = None
    queue: dict[str, Any] | None = None  # while queued: ahead_row_steps, estimated_start_seconds / _at

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        return cls(
            id=body["id"],
            status=body["status"],
            progress=Progress(**body["progress"]),
            params=body.get("params", {}),
            created_at=body["created_at"],
            started_at=body.get("started_at"),
            finished_at=body.get("finished_at"),
            error=body.get("error"),
            results=[
                ImageResult(**{k: r[k] for k in ("index", "seed", "key", "url")}) for r in body.get("results", [])
            ],
            results_next_offset=body.get("results_next_offset"),
            manifest_url=body.get("manifest_url"),
            queue=body.get("queue"),
        )

    def to_json(self) -> dict[str, Any]:
        """The job as the API writes it (what a polled `queued` or terminal event carries)."""
        body = {k: v for k, v in vars(self).items() if k not in ("progress", "results")}
        body["progress"] = vars(self.progress)
        body["results"] = [vars(r) for r in self.results]
        return body


@dataclass(frozen=True)
class JobSummary:
    id: str
    status: str
    progress: Progress
    created_at: float
    finished_at: float | None = None


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobSummary]
    next_cursor: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JobPage:
        jobs = [
            JobSummary(j["id"], j["status"], Progress(**j["progress"]), j["created_at"], j.get("finished_at"))
            for j in body["jobs"]
        ]
        return cls(jobs, body.get("next_cursor"))


@dataclass(frozen=True)
class JobEvent:
    """One event of a job: `event` is queued, started, progress, preview, succeeded, failed or
    canceled; `data` its JSON; `id` what Last-Event-ID resumes after (None for polled events)."""

    event: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL


@dataclass(frozen=True)
class Download:
    """What `download` wrote: the images (by index) and whether the manifest checked them."""

    directory: Path
    images: list[Path]
    manifest: Path | None
    verified: bool
