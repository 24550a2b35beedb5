"""ObjectStore: presigning (local computation), and against a real SeaweedFS S3 server: boto3's
default credential chain when no static keys are set, and a bucket created only when S3 says it
does not exist and the settings allow it."""

import time
import uuid

import boto3
import httpx
import pytest
from pydantic import ValidationError

from service.dev.servers import S3Server
from service.settings import Settings
from service.storage import BucketUnavailable, ObjectStore
from tests.service.conftest import S3_KEY, S3_SECRET

KEYS = {"s3_access_key_id": S3_KEY, "s3_secret_access_key": S3_SECRET}


def test_presigned_urls_are_reused_for_half_their_lifetime():
    store = ObjectStore(Settings(presign_expiry_seconds=2, **KEYS).storage)
    first = store.presign("jobs/x/00000.png")
    assert store.presign("jobs/x/00000.png") == first and "X-Amz-Expires=2" in first
    assert store.presign("jobs/x/00001.png") != first
    time.sleep(1.2)  # past half the lifetime: a fresh URL (a new X-Amz-Date, a new signature)
    assert store.presign("jobs/x/00000.png") != first


def test_presigned_urls_name_the_public_endpoint():
    store = ObjectStore(Settings(s3_public_endpoint_url="http://localhost:9000", **KEYS).storage)
    assert store.presign("jobs/x/00000.png").startswith("http://localhost:9000/undiffuse/jobs/x/00000.png?")


def test_static_keys_come_in_pairs_and_production_refuses_placeholders():
    with pytest.raises(ValidationError, match="both"):
        Settings(s3_access_key_id="AKIA-only")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(
            environment="production", api_keys="a=sha256:" + "0" * 64, **{**KEYS, "s3_secret_access_key": "REPLACE_ME"}
        )
    # no keys at all: the default credential chain (IRSA, instance profile), fine in production
    settings = Settings(environment="production", api_keys="a=sha256:" + "0" * 64)
    assert settings.s3_access_key_id is None and settings.s3_secret_access_key is None


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3"), access_key=S3_KEY, secret_key=S3_SECRET).start() as server:
        yield server


def _admin(s3: S3Server):
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def _bucket_exists(s3: S3Server, bucket: str) -> bool:
    return bucket in {b["Name"] for b in _admin(s3).list_buckets()["Buckets"]}


def _record_calls(store: ObjectStore) -> list[str]:
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    return calls


def test_without_static_keys_the_default_credential_chain_signs(s3, monkeypatch):
    """No UNDIFFUSE_S3_* keys: boto3 finds credentials itself (here the AWS_* variables; on EKS
    IRSA's web identity token), for uploads and for presigned URLs alike."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    store = ObjectStore(Settings(s3_endpoint_url=s3.endpoint, s3_bucket="chain").storage)
    store.ensure_bucket()
    store.put_image("jobs/j/00000.png", b"\x89PNG-chain")
    assert httpx.get(store.presign("jobs/j/00000.png")).content == b"\x89PNG-chain"
    # and the chain is really what signs: other variables, another identity, refused
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(BucketUnavailable, match="403"):
        ObjectStore(Settings(s3_endpoint_url=s3.endpoint, s3_bucket="chain").storage).ensure_bucket()


def test_a_missing_bucket_is_created_only_when_allowed(s3):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    refused = ObjectStore(
        Settings(s3_endpoint_url=s3.endpoint, s3_bucket=bucket, s3_create_bucket=False, **KEYS).storage
    )
    calls = _record_calls(refused)
    with pytest.raises(BucketUnavailable, match="does not exist.*UNDIFFUSE_S3_CREATE_BUCKET"):
        refused.ensure_bucket()
    assert calls == ["HeadBucket"] and not _bucket_exists(s3, bucket)

    allowed = ObjectStore(
        Settings(s3_endpoint_url=s3.endpoint, s3_bucket=bucket, s3_create_bucket=True, **KEYS).storage
    )
    calls = _record_calls(allowed)
    allowed.ensure_bucket()
    assert calls == ["HeadBucket", "CreateBucket"] and _bucket_exists(s3, bucket)
    allowed.ensure_bucket()  # now it exists: nothing to create
    assert calls == ["HeadBucket", "CreateBucket", "HeadBucket"]


def test_a_403_is_a_clear_error_never_a_blind_create(s3):
    """Credentials S3 refuses: HeadBucket answers 403, and ensure_bucket says so instead of
    trying CreateBucket (which would turn the 403 into a crash of the ingress)."""
    bucket = f"forbidden-{uuid.uuid4().hex[:8]}"
    store = ObjectStore(
        Settings(
            s3_endpoint_url=s3.endpoint,
            s3_bucket=bucket,
            s3_create_bucket=True,
            s3_access_key_id=S3_KEY,
            s3_secret_access_key="a-wrong-secret-0123",
            s3_max_attempts=1,
        ).storage
    )
    calls = _record_calls(store)
    with pytest.raises(BucketUnavailable, match=rf"{bucket}.*403.*credentials"):
        store.ensure_bucket()
    assert calls == ["HeadBucket"] and not _bucket_exists(s3, bucket)


def test_urls_presigned_for_the_public_endpoint_download_from_there(s3):
    """Workers write to the internal endpoint; clients get URLs signed for the public one (compose:
    http://minio:9000 inside, http://localhost:9000 published), and those URLs work there."""
    public = s3.endpoint.replace("127.0.0.1", "localhost")
    settings = Settings(s3_endpoint_url=s3.endpoint, s3_public_endpoint_url=public, s3_bucket="public", **KEYS)
    store = ObjectStore(settings.storage)
    store.ensure_bucket()
    store.put_image("jobs/p/00000.png", b"\x89PNG-public")
    url = store.presign("jobs/p/00000.png")
    assert url.startswith(public + "/public/jobs/p/00000.png?")
    assert httpx.get(url).content == b"\x89PNG-public"
    # signed for one host, refused from another: the public endpoint really is what counts
    assert httpx.get(url.replace("localhost", "127.0.0.1")).status_code == 403


def test_an_image_is_written_once_and_every_writer_is_told_what_stands(s3):
    """Two attempts of one shard write the same key: the first write wins (If-None-Match: *) and
    the second is handed the bytes that stand, so its checksums describe the bucket."""
    settings = Settings(s3_endpoint_url=s3.endpoint, s3_bucket="once", s3_create_bucket=True, **KEYS)
    store = ObjectStore(settings.storage)
    store.ensure_bucket()
    key = f"jobs/{uuid.uuid4().hex}/00000.png"
    assert store.put_image_once(key, b"\x89PNG-first") == b"\x89PNG-first"
    calls = _record_calls(store)
    assert store.put_image_once(key, b"\x89PNG-second") == b"\x89PNG-first"
    assert calls == ["PutObject", "GetObject"]  # refused with 412, then read
    assert store.get_bytes(key) == b"\x89PNG-first"


def _store_answering(s3, monkeypatch, *answers: tuple[int, str]) -> ObjectStore:
    """A store whose next conditional PUTs get these (status, code) errors, then reach S3."""
    from botocore.exceptions import ClientError

    settings = Settings(s3_endpoint_url=s3.endpoint, s3_bucket="once", s3_create_bucket=True, **KEYS)
    store = ObjectStore(settings.storage)
    store.ensure_bucket()
    put, queued = store.client.put_object, list(answers)

    def answering(**kwargs):
        if "IfNoneMatch" in kwargs and queued:
            status, code = queued.pop(0)
            error = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
            raise ClientError(error, "PutObject")
        return put(**kwargs)

    monkeypatch.setattr(store.client, "put_object", answering)
    return store


def test_a_store_without_conditional_puts_is_written_as_before(s3, monkeypatch):
    """An S3-compatible store that answers 501 to If-None-Match: written without it from then on."""
    store = _store_answering(s3, monkeypatch, *[(501, "NotImplemented")] * 10)
    key = f"jobs/{uuid.uuid4().hex}/00000.png"
    assert store.put_image_once(key, b"\x89PNG-a") == b"\x89PNG-a"
    assert store.get_bytes(key) == b"\x89PNG-a"
    assert store.put_image_once(key, b"\x89PNG-b") == b"\x89PNG-b"  # overwritten: such a store cannot do better
    assert store.get_bytes(key) == b"\x89PNG-b"


def test_a_conflicting_concurrent_write_is_tried_again(s3, monkeypatch):
    """409 ConditionalRequestConflict (AWS: another conditional write of the key in progress)."""
    store = _store_answering(s3, monkeypatch, (409, "ConditionalRequestConflict"), (409, "ConditionalRequestConflict"))
    key = f"jobs/{uuid.uuid4().hex}/00000.png"
    assert store.put_image_once(key, b"\x89PNG-c") == b"\x89PNG-c"
    assert store.get_bytes(key) == b"\x89PNG-c"


def test_a_key_that_refuses_the_write_yet_holds_nothing_is_an_error_not_an_overwrite(s3, monkeypatch):
    """412 every time, and nothing to read: the upload fails (a storage error the Worker retries)
    instead of writing unconditionally over whatever another attempt may be writing."""
    from service.storage import STORAGE_ERRORS, ImageNotWritten

    store = _store_answering(s3, monkeypatch, *[(412, "PreconditionFailed")] * 10)
    key = f"jobs/{uuid.uuid4().hex}/00000.png"
    with pytest.raises(ImageNotWritten, match="neither written nor readable"):
        store.put_image_once(key, b"\x89PNG-d")
    assert issubclass(ImageNotWritten, STORAGE_ERRORS) and store.get_bytes(key) is None
