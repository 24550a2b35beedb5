"""Downloads, without the network: where each image goes, which files an earlier download
already left in place, the checks against the job's manifest.json, atomic writes, and the
archive's completeness."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from undiffuse.client._errors import ChecksumError, ConflictError
from undiffuse.client._types import Download, ImageResult, Job


def require_succeeded(job: Job) -> None:
    if job.status != "succeeded":
        raise ConflictError(409, f"job {job.id} is {job.status}: only a succeeded job has images to download")


def write_atomically(path: Path, data: bytes) -> None:
    """Written beside `path` and renamed: a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class DownloadPlan:
    """One job's images into `directory`/NNNNN.png (.jpg, .webp), checked against its manifest (per image:
    index, seed, key, sha256, size); without a manifest nothing can be checked."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any] | None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.entries = {int(e["index"]): e for e in manifest["images"]} if manifest else {}
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, result: ImageResult) -> Path:
        """NNNNN and the suffix the service stored the image with (.png, .jpg, .webp)."""
        return self.directory / f"{result.index:05d}{PurePosixPath(result.key).suffix or '.png'}"

    def needed(self, result: ImageResult) -> bool:
        """False for a file an earlier download left that the manifest vouches for."""
        path, entry = self.path(result), self.entries.get(result.index)
        if entry is None or not path.is_file() or path.stat().st_size != entry["size"]:
            return True
        return hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]

    def check(self, result: ImageResult, data: bytes) -> None:
        """ChecksumError unless `data` is what the manifest lists for the image."""
        if self.manifest is None:
            return
        name, entry = self.path(result).name, self.entries.get(result.index)
        if entry is None:
            raise ChecksumError(f"{name}: the job lists it, its manifest does not")
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry["size"] or digest != entry["sha256"]:
            raise ChecksumError(
                f"{name}: {len(data)} bytes with SHA-256 {digest[:16]}…, "
                f"the manifest says {entry['size']} bytes and {entry['sha256'][:16]}…"
            )

    def store(self, result: ImageResult, data: bytes) -> Path:
        """Check the image and write it; a file that fails the check is not written."""
        self.check(result, data)
        path = self.path(result)
        write_atomically(path, data)
        return path

    def finish(self, paths: list[Path], results: list[ImageResult]) -> Download:
        """Every image is in: write the manifest beside them (when there is one to check by)."""
        if self.manifest is None:
            return Download(self.directory, paths, None, verified=False)
        missing = sorted(set(self.entries) - {r.index for r in results})
        if missing:
            raise ChecksumError(f"the manifest lists images the job does not: {missing[:5]}")
        manifest_path = self.directory / "manifest.json"
        write_atomically(manifest_path, json.dumps(self.manifest, indent=2).encode())
        return Download(self.directory, paths, manifest_path, verified=True)


class ArchiveFile:
    """A job's ZIP streamed to `<path>.part` and renamed to `path` once whole, so `path` is
    never partial; `finish` checks the size against Content-Length."""

    def __init__(self, path: str | Path, job_id: str) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".part")
        self.job_id = job_id
        self.size = 0

    def open(self):
        self.size = 0
        return open(self.partial, "wb")

    def wrote(self, chunk: bytes) -> None:
        self.size += len(chunk)

    def finish(self, content_length: str | None) -> int:
        if content_length is not None and int(content_length) != self.size:
            self.partial.unlink(missing_ok=True)
            raise ChecksumError(f"archive of job {self.job_id}: {self.size} of {content_length} bytes arrived")
        self.partial.replace(self.path)
        return self.size
