"""PNG objects in S3-compatible storage through boto3; botocore does the retrying."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.settings import StorageSettings
from undiffuse.image_formats import media_type_of

log = logging.getLogger("ray.serve")
CONDITIONAL_PUT_TRIES = 5


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def image_key(job_id: str, index: int, suffix: str = ".png") -> str:
    """Deterministic, so a retried shard finds its images instead of duplicating them."""
    return f"{job_prefix(job_id)}{index:05d}{suffix}"


def manifest_key(job_id: str) -> str:
    """The job's manifest.json (service.archive), next to its images: deleted with them."""
    return f"{job_prefix(job_id)}manifest.json"


class ObjectStore:
    def __init__(self, settings: StorageSettings) -> None:
        self.bucket = settings.bucket
        self.region = settings.region
        self.create_bucket = settings.create_bucket
        self.expiry = settings.presign_expiry_seconds
        # static keys when configured; otherwise the session resolves boto3's default credential
        # chain (AWS_* variables, IRSA's web identity token, EKS Pod Identity, an instance profile)
        keys = (
            {}
            if settings.secret_access_key is None
            else dict(
                aws_access_key_id=settings.access_key_id,
                aws_secret_access_key=settings.secret_access_key.get_secret_value(),
            )
        )
        session = boto3.session.Session(region_name=settings.region, **keys)
        retries = Config(
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
            connect_timeout=3,
            read_timeout=20,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )
        self.client = session.client("s3", endpoint_url=settings.endpoint_url, config=retries)
        # presigned URLs must name the endpoint the *client* reaches, which can differ
        public = settings.public_endpoint_url or settings.endpoint_url
        self.presigner = session.client("s3", endpoint_url=public, config=retries)
        self._presigned: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (url, reuse until)
        self._lock = threading.Lock()
        self._conditional_puts = True  # until the store answers 501 to If-None-Match

    def ensure_bucket(self) -> None:
        """Check that the bucket exists and these credentials reach it. Only when S3 answers that
        it does not exist (404) is it created, and only if s3_create_bucket allows; any other
        answer (403: the credentials may not read it) is a BucketUnavailable naming the answer."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            status, code = _answer(e)
            if status != 404 and code not in ("404", "NoSuchBucket"):
                raise BucketUnavailable(
                    f"S3 bucket {self.bucket!r}: HeadBucket answered {status} {code}; check the credentials "
                    "and that they may list the bucket (s3:ListBucket)"
                ) from e
        if not self.create_bucket:
            raise BucketUnavailable(
                f"S3 bucket {self.bucket!r} does not exist; create it, or set UNDIFFUSE_S3_CREATE_BUCKET=true"
            )
        location = (
            {} if self.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
        )
        try:
            self.client.create_bucket(Bucket=self.bucket, **location)
        except ClientError as e:  # another replica created it first
            if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def ping(self) -> None:
        """Raises when the bucket is unreachable."""
        self.client.head_bucket(Bucket=self.bucket)

    def put_image(self, key: str, data: bytes) -> None:
        """Write an image; its Content-Type follows the key's suffix (.png, .jpg, .webp)."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=media_type_of(key))

    def put_image_once(self, key: str, data: bytes) -> bytes:
        """Write the image unless the key holds one already (a conditional PUT, If-None-Match: *);
        returns the bytes that stand under the key: these, or those an earlier or concurrent
        attempt wrote first, so the caller's checksums are of the bytes the bucket holds.

        412: the object exists, and is read back. 409 (a concurrent conditional write of the key
        in progress, which botocore does not retry): tried again shortly. 501 (a store without
        conditional writes): logged once, then this store is written unconditionally (a retried
        shard's write then replaces the earlier attempt's bytes, which the checksums follow).
        A store that ignores the header altogether cannot be told apart: the write then
        overwrites. Raises ImageNotWritten if the key neither takes the write nor can be read."""
        if not self._conditional_puts:
            self.put_image(key, data)
            return data
        for attempt in range(CONDITIONAL_PUT_TRIES):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=media_type_of(key), IfNoneMatch="*"
                )
                return data
            except ClientError as e:
                status, code = _answer(e)
                if status == 501 or code == "NotImplemented":
                    endpoint = self.client.meta.endpoint_url
                    log.warning("S3 store at %s has no conditional writes: images are overwritten", endpoint)
                    self._conditional_puts = False
                    self.put_image(key, data)
                    return data
                if status == 409 or code == "ConditionalRequestConflict":
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if status != 412 and code != "PreconditionFailed":
                    raise
            stored = self.get_bytes(key)
            if stored is not None:
                return stored  # None: deleted between the PUT and the GET; try again
        raise ImageNotWritten(f"{key}: neither written nor readable after {CONDITIONAL_PUT_TRIES} conditional PUTs")

    def put_json(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object (other errors raise)."""
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        body = reply["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def iter_object(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """The object's bytes in chunks, fetched when iteration starts (for streaming responses:
        at most one chunk is held)."""
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete_keys(self, keys: list[str]) -> None:
        """Delete these objects (at most 1,000, DeleteObjects' limit; missing ones are fine)."""
        if keys:
            reply = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise ObjectsNotDeleted(f"could not delete {len(reply['Errors'])} objects: {first.get('Code')}")

    def delete_job(self, job_id: str) -> int:
        """Delete every object of a job (idempotent); returns how many there were."""
        deleted = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=job_prefix(job_id))
        for page in pages:  # a page holds at most 1,000 keys
            keys = [o["Key"] for o in page.get("Contents", [])]
            self.delete_keys(keys)
            deleted += len(keys)
        with self._lock:  # URLs of deleted objects must not be handed out again
            for key in [k for k in self._presigned if k.startswith(job_prefix(job_id))]:
                del self._presigned[key]
        return deleted

    def presign(self, key: str) -> str:
        """A presigned GET URL for key, valid for at least half of presign_expiry_seconds.

        Signing costs ~0.25 ms of Python per URL (0.25 s for a 1,024-image job), so each URL is
        reused for half its lifetime; the cache is per process and bounded (LRU)."""
        now = time.monotonic()
        with self._lock:
            hit = self._presigned.get(key)
            if hit is not None and hit[1] > now:
                self._presigned.move_to_end(key)
                return hit[0]
        url = self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry
        )
        with self._lock:
            self._presigned[key] = (url, now + self.expiry / 2)
            while len(self._presigned) > PRESIGN_CACHE_SIZE:
                self._presigned.popitem(last=False)
        return url


def _answer(error: ClientError) -> tuple[int | None, str | None]:
    """(HTTP status, S3 error code) of a refused request."""
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode"), error.response.get("Error", {}).get("Code")


class ObjectsNotDeleted(Exception):
    """DeleteObjects answered, but refused some of the keys."""


class ImageNotWritten(Exception):
    """A conditional PUT kept failing without an object standing in its place."""


class BucketUnavailable(Exception):
    """The bucket is missing (and may not be created) or these credentials may not reach it."""


STORAGE_ERRORS = (BotoCoreError, ClientError, ObjectsNotDeleted, ImageNotWritten)
PRESIGN_CACHE_SIZE = 100_000
