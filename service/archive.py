"""What a succeeded job hands out in one piece: its manifest.json and its ZIP archive.

The manifest lists the job's resolved parameters and, per image, its index, seed, object key and
the SHA-256 and size of the PNG as stored. Workers record each shard's checksums with the
shard's completion (service.jobs.store, computed from the bytes they upload), and the Worker
whose shard completes the job writes `jobs/{id}/manifest.json` *before* it moves the job to
succeeded: a Worker that dies in between leaves the job running with its last shard's message
pending, and the shard's redelivery (which skips sampling: the shard is done) writes the
manifest and then succeeds the job. So a succeeded job always has its manifest; one missing from
the bucket was removed there (with its images, by a lifecycle rule or by hand), and the archive
says so instead of guessing.

The archive streams `00000.png`, `00001.png`, ... (or `.jpg`, `.webp`: the job's format) and
`manifest.json`, stored uncompressed (the images are compressed already), each image read from
S3 in chunks while it is sent, so its size is known up front (Content-Length) and no image is
held whole in memory.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from zipstream import ZipStream

from service.jobs.store import JobRecord
from service.storage import ObjectStore, image_key, manifest_key

Files = dict[int, tuple[str, int]]
"""{image index: (sha256 hex, size in bytes)} of a job's PNGs as stored."""


def build_manifest(record: JobRecord, files: Files) -> bytes:
    """manifest.json of a job whose every image is in `files`."""
    missing = sorted(set(range(record.params.num_images)) - set(files))
    if missing:
        raise ValueError(f"job {record.id}: no checksum for images {missing[:5]}")
    images = [
        {
            "index": i,
            "seed": record.params.seed,
            "key": image_key(record.id, i, record.params.image_suffix),
            "sha256": sha,
            "size": size,
        }
        for i, (sha, size) in sorted(files.items())
    ]
    manifest = {
        "job_id": record.id,
        "created_at": record.created_at,
        "model": record.params.model,
        "params": record.params.model_dump(mode="json"),
        "images": images,
    }
    return json.dumps(manifest, indent=1).encode()


def write_manifest(objects: ObjectStore, record: JobRecord, files: Files) -> bytes:
    """Write the job's manifest to the bucket and return it; `files` holds every image."""
    manifest = build_manifest(record, files)
    objects.put_json(manifest_key(record.id), manifest)
    return manifest


class ManifestMissing(LookupError):
    """A succeeded job's manifest is not in the bucket: it was removed there."""


def load_manifest(objects: ObjectStore, record: JobRecord) -> bytes:
    """The succeeded job's manifest from the bucket; ManifestMissing if it is not there."""
    manifest = objects.get_bytes(manifest_key(record.id))
    if manifest is None:
        raise ManifestMissing(f"job {record.id}: manifest.json is not in the bucket")
    return manifest


def zip_archive(objects: ObjectStore, manifest: bytes) -> ZipStream:
    """A sized ZipStream of the manifest's images (fetched as it is iterated) and the manifest."""
    archive = ZipStream(sized=True)  # ZIP_STORED
    for image in json.loads(manifest)["images"]:
        name = f"{image['index']:05d}{PurePosixPath(image['key']).suffix}"  # 00000.png, 00000.jpg, ...
        archive.add(objects.iter_object(image["key"]), name, size=image["size"])
    archive.add(manifest, "manifest.json")
    return archive
