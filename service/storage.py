"""PNG objects in S3-compatible storage through boto3; botocore does the retrying."""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.settings import Settings


def image_key(job_id: str, index: int) -> str:
    """Deterministic, so a retried shard overwrites its images instead of duplicating them."""
    return f"jobs/{job_id}/{index:05d}.png"


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.expiry = settings.presign_expiry_seconds
        common = dict(
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
            region_name=settings.s3_region,
        )
        retries = Config(
            retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
            connect_timeout=3,
            read_timeout=20,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=retries, **common)
        # presigned URLs must name the endpoint the *client* reaches, which can differ
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.presigner = boto3.client("s3", endpoint_url=public, config=retries, **common)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def ping(self) -> None:
        """Raises when the bucket is unreachable."""
        self.client.head_bucket(Bucket=self.bucket)

    def put_png(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="image/png")

    def presign(self, key: str) -> str:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry
        )


STORAGE_ERRORS = (BotoCoreError, ClientError)
