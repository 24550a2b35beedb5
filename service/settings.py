"""All configuration, validated once at start-up. No other module reads the environment.

Every field can be set as an environment variable with the UNDIFFUSE_ prefix
(UNDIFFUSE_REDIS_URL, UNDIFFUSE_S3_BUCKET, UNDIFFUSE_API_KEYS=alice=sha256:<hex>,..., see
service.api_keys). That flat surface is what operators set; components take a typed view of the
part they use (`settings.storage`, `settings.webhooks`, `settings.engine`, `settings.queue`), so a
component's signature says what it depends on and a test builds only that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import api_keys as api_keys

REPO_ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER_SECRETS = {"", "changeme", "localsecret", "REPLACE_ME"}


class _View(BaseModel):
    """A typed, read-only slice of Settings for one component."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageSettings(_View):
    """S3-compatible object storage (service.storage.ObjectStore): UNDIFFUSE_S3_* and the URLs' lifetime."""

    endpoint_url: str | None
    public_endpoint_url: str | None
    bucket: str
    region: str
    access_key_id: str | None
    secret_access_key: SecretStr | None
    create_bucket: bool
    max_attempts: int
    presign_expiry_seconds: int


class WebhookSettings(_View):
    """Webhook deliveries (worker.dispatcher, service.webhooks): UNDIFFUSE_WEBHOOK_*."""

    signing_key: SecretStr | None
    previous_signing_key: SecretStr | None
    allow_private: bool
    timeout_seconds: float
    resolve_timeout_seconds: float
    retry_base_seconds: float
    concurrency: int
    concurrency_per_owner: int
    resolve_concurrency_per_owner: int
    allowed_ports: tuple[int, ...]
    production: bool
    """In production: https:// receivers only, and no development signing key."""


class EngineSettings(_View):
    """What a Denoiser replica runs its engines with (service.denoiser)."""

    model_dir: Path
    default_model: str
    device: Literal["auto", "cpu", "cuda"]
    torch_threads: int
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    model_precision: dict[str, Literal["fp32", "bf16", "fp16"]]
    compile: Literal["auto", "on", "off"]
    compile_mode: str
    step_graphs: Literal["auto", "on", "off"]
    warmup_seconds: float
    latency_slack: float
    max_decode_batch: int | None
    preview_decode_every: int
    invariant_rows: int | None
    progress_interval_seconds: float
    min_batch_rows: int
    """The smallest batch a replica may run: a guided shard's rows (2 x shard_size)."""


class QueueSettings(_View):
    """Shards on the fair queue and their attempts (service.jobs.queue, worker.consumer)."""

    shard_size: int
    visibility_timeout_seconds: float
    max_attempts: int
    max_interruptions: int
    shard_timeout_seconds: float
    intake_fallback_rows: int
    dependency_patience_seconds: float
    purge_delay_seconds: float
    redis_timeout_seconds: float
    """A blocking read of the queue waits at most half of it, so it never becomes a read timeout."""
    quantum: int


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UNDIFFUSE_",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # inputs may be secrets
    )

    environment: Literal["development", "production"] = "development"

    # --- Redis: job records, the shard stream, idempotency keys ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_seconds: float = Field(2.0, gt=0)
    job_ttl_seconds: int = Field(7 * 24 * 3600, ge=60, description="how long job records live")

    # --- S3-compatible object storage for the PNGs ---
    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    s3_public_endpoint_url: str | None = Field(None, description="endpoint used in presigned URLs")
    s3_bucket: str = "undiffuse"
    s3_region: str = "us-east-1"
    # static keys, both or neither; neither: boto3's default credential chain (AWS_* variables,
    # IRSA / EKS Pod Identity, an instance profile), so no long-lived secret has to exist
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_create_bucket: bool = Field(
        True, description="create the bucket at start if S3 says it does not exist (404); never on any other error"
    )
    s3_max_attempts: int = Field(5, ge=1, description="botocore retries per request")
    presign_expiry_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)

    # --- models ---
    model_dir: Path = REPO_ROOT / "models"
    default_model: str = "mnist"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available; cuda: a Denoiser replica without a usable GPU fails to start"
    )
    torch_threads: int = Field(0, ge=0, description="0: torch's default")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="network precision of every model: auto = bf16 on CUDA, fp32 on a CPU"
    )
    model_precision: dict[str, Literal["fp32", "bf16", "fp16"]] = Field(
        default_factory=dict, description='per-model overrides, e.g. {"mnist": "fp32"}'
    )
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the networks: auto = on CUDA")
    compile_mode: str = Field(
        "default", description="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs"
    )
    step_graphs: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run each engine step as one CUDA graph per batch bucket (network, sampler update, noise): "
        "auto = where the networks compile on CUDA",
    )
    warmup_seconds: float = Field(120.0, ge=0, description="time budget to warm up (and compile) every batch bucket")
    latency_slack: float = Field(1.25, ge=1.0, description="engine scheduler: how much a short job may be slowed")
    max_decode_batch: int | None = Field(
        None,
        ge=1,
        description="a latent model's finished images decoded per decoder call; unset or empty: sized once from "
        "the free GPU memory and the decoder's measured memory per image (16 on a CPU); one where images are "
        "batch-invariant (invariant_rows > 0)",
    )
    preview_decode_every: int = Field(
        5, ge=1, description="a latent model's previews are decoded at most every this many steps"
    )
    invariant_rows: int | None = Field(
        None,
        ge=0,
        description="rows per network call, so that an image's bytes do not depend on its batch (0: whole "
        "batches); unset or empty: 16 on a CPU, 0 on a GPU",
    )
    progress_interval_seconds: float = Field(
        0.25, gt=0, description="how often the Denoiser exchanges progress and cancellations with Redis"
    )

    # --- limits and queue semantics ---
    max_images_per_job: int = Field(1024, ge=1)
    max_steps: int = Field(1000, ge=1)
    max_job_cost: int = Field(
        262_144, ge=1, description="image-steps per job: num_images x steps, x2 with guidance (twice the rows)"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_jobs_in_flight_per_key: int = Field(64, ge=1, description="queued + running jobs per owner; more get 429")
    max_cost_in_flight_per_key: int = Field(
        4 * 262_144,
        ge=1,
        description="image-steps of an owner's queued and running jobs (4 maximum-cost jobs); a job past it gets 429",
    )
    max_cost_per_day_per_key: int = Field(
        100 * 262_144, ge=1, description="image-steps an owner may submit per day (UTC); past it, 429 until midnight"
    )
    max_jobs_stored_per_key: int = Field(
        10_000,
        ge=1,
        description="job records an owner keeps (any status, until they expire or are deleted); more submissions "
        "get 429. Bounds what one owner holds in Redis (docs/reliability.md measures a record's bytes)",
    )
    max_stored_bytes_per_key: int = Field(
        10 * 2**30,
        ge=1,
        description="bytes of images an owner keeps in the bucket; at it, submissions get 429 until jobs are "
        "deleted or expire (jobs in flight may finish past it)",
    )
    max_reads_per_minute_per_key: int = Field(
        1200, ge=1, description="reads (job views, lists, streams, downloads) per owner in any 60 s; more get 429"
    )
    max_submissions_per_minute_per_key: int = Field(
        120, ge=1, description="job submissions per owner in any 60 s window (moving window); more get 429"
    )
    max_event_streams_per_key: int = Field(
        16,
        ge=1,
        description="open event streams and archive downloads per owner, across every Ingress replica; more get 429",
    )
    stream_send_timeout_seconds: float = Field(
        20.0, gt=0, le=25, description="an event stream or download whose client takes longer to accept a write ends"
    )
    event_stream_max_seconds: float = Field(
        900.0, gt=0, description="an event stream is ended after this long; clients resume it with Last-Event-ID"
    )
    purge_delay_seconds: float = Field(
        60.0, ge=0, description="after a job fails, is canceled or deleted, when its images are deleted"
    )
    shard_size: int = Field(16, ge=1, description="images per shard; with guidance twins, at most the Denoiser's batch")
    visibility_timeout_seconds: float = Field(
        20.0, gt=0, description="a shard not heart-beaten for this long (its Worker died) is reclaimed"
    )
    max_attempts: int = Field(3, ge=1, description="tries per shard before its job fails")
    max_interruptions: int = Field(
        10, ge=0, description="times a Denoiser replica may die under one shard before that counts as an attempt"
    )
    shard_timeout_seconds: float = Field(1800.0, gt=0, description="longest a shard may sample before it is retried")
    intake_fallback_rows: int = Field(
        128,
        ge=1,
        description="rows the queue admits before any Denoiser replica has reported its batch (afterwards: twice "
        "the replicas' max_batch)",
    )
    dependency_patience_seconds: float = Field(
        600.0, ge=0, description="how long a worker waits out an S3 or Redis outage on a shard whose images are done"
    )

    # --- webhooks (service.webhooks, worker.dispatcher) ---
    webhook_signing_key: SecretStr | None = Field(
        None,
        description="server key from which each owner's webhook secret is derived (GET /v1/webhook-secret); "
        "changing it rotates every owner's secret. Unset: a fixed development key in development, "
        "webhooks refused (422) in production",
    )
    webhook_previous_signing_key: SecretStr | None = Field(
        None, description="during a rotation: deliveries also carry a signature with the secret derived from this key"
    )
    webhook_allow_private: bool = Field(
        False,
        description="allow webhook URLs that resolve to loopback, private, link-local or otherwise non-public "
        "addresses, on any port (SSRF guard off; for development and tests: production refuses it)",
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60, description="one delivery attempt, connect to response")
    webhook_resolve_timeout_seconds: float = Field(2.0, gt=0, le=30, description="DNS lookup of a webhook URL's host")
    webhook_retry_base_seconds: float = Field(
        5.0,
        gt=0,
        description="first retry delay; later ones follow the schedule in service.jobs.webhook_schedule (~3 h in all)",
    )
    webhook_concurrency: int = Field(16, ge=1, description="deliveries in flight per Worker replica")
    webhook_concurrency_per_owner: int = Field(
        4,
        ge=1,
        description="deliveries in flight per owner on one Worker replica: an owner whose receivers are slow "
        "or never answer holds at most these, and other owners' deliveries go on in the rest",
    )
    webhook_resolve_concurrency_per_owner: int = Field(
        2,
        ge=1,
        description="DNS lookups of webhook hosts in flight per owner in one process; a lookup counts until "
        "the resolver answers, even past its timeout, so a name that never resolves holds back its owner only",
    )
    webhook_allowed_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list,
        description="ports webhook URLs may name besides 80 and 443, as JSON: [8443, 9000]",
    )

    # --- auth ---
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="[owner=]sha256:<hex> entries (service.api_keys); empty: no auth"
    )
    _key_owners: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def queue_quantum(self) -> int:
        """The deficit an owner earns per round of the fair queue: the largest shard's cost
        (row-steps: shard_size x max_steps, x2 for guidance twins), so every visit admits."""
        return self.shard_size * self.max_steps * 2

    @property
    def min_batch_rows(self) -> int:
        """The fewest rows a Denoiser's batch may hold: a guided shard's (2 x shard_size)."""
        return 2 * self.shard_size

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(
            **_prefixed(self, "s3_", StorageSettings), presign_expiry_seconds=self.presign_expiry_seconds
        )

    @property
    def webhooks(self) -> WebhookSettings:
        return WebhookSettings(
            **_prefixed(self, "webhook_", WebhookSettings, skip={"production"}),
            production=self.environment == "production",
        )

    @property
    def engine(self) -> EngineSettings:
        return EngineSettings(**_prefixed(self, "", EngineSettings))

    @property
    def queue(self) -> QueueSettings:
        return QueueSettings(**_prefixed(self, "", QueueSettings, skip={"quantum"}), quantum=self.queue_quantum)

    @property
    def key_owners(self) -> dict[str, str]:
        """{SHA-256 hex of a key: owner id}."""
        return self._key_owners

    @field_validator("max_decode_batch", "invariant_rows", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="before")
    @classmethod
    def _split_keys(cls, data):
        if isinstance(data, dict) and isinstance(data.get("api_keys"), str):
            data = {**data, "api_keys": [k.strip() for k in data["api_keys"].split(",") if k.strip()]}
        return data

    @model_validator(mode="after")
    def _parse_keys(self) -> Settings:
        self._key_owners = api_keys.parse(self.api_keys)
        return self

    @model_validator(mode="after")
    def _quotas_fit_a_job(self) -> Settings:
        if self.max_cost_in_flight_per_key < self.max_job_cost or self.max_cost_per_day_per_key < self.max_job_cost:
            raise ValueError(
                "UNDIFFUSE_MAX_COST_IN_FLIGHT_PER_KEY and UNDIFFUSE_MAX_COST_PER_DAY_PER_KEY must be at least "
                "UNDIFFUSE_MAX_JOB_COST, or the largest job allowed could never run"
            )
        return self

    @model_validator(mode="after")
    def _s3_keys_come_in_pairs(self) -> Settings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "set both UNDIFFUSE_S3_ACCESS_KEY_ID and UNDIFFUSE_S3_SECRET_ACCESS_KEY, or neither "
                "(then boto3's default credential chain is used)"
            )
        return self

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        if self.environment == "production":
            if self.s3_secret_access_key is not None and (
                self.s3_secret_access_key.get_secret_value() in PLACEHOLDER_SECRETS
                or self.s3_access_key_id in PLACEHOLDER_SECRETS
            ):
                raise ValueError(
                    "UNDIFFUSE_S3_ACCESS_KEY_ID / _SECRET_ACCESS_KEY hold a placeholder; set real keys in production, "
                    "or unset both to use the default credential chain (IRSA, instance profile)"
                )
            for name in ("webhook_signing_key", "webhook_previous_signing_key"):
                value = getattr(self, name)
                if value is not None and (value.get_secret_value() in PLACEHOLDER_SECRETS or len(value) < 16):
                    raise ValueError(
                        f"UNDIFFUSE_{name.upper()} is a placeholder or shorter than 16 characters; set a random key "
                        "(python -c 'import secrets; print(secrets.token_urlsafe(32))'), or unset it to refuse webhooks"
                    )
            if self.webhook_allow_private:  # any owner could make the Workers reach inside the network
                raise ValueError(
                    "UNDIFFUSE_WEBHOOK_ALLOW_PRIVATE turns the webhooks' SSRF guard off; production refuses it"
                )
            if not self.api_keys or any(k in PLACEHOLDER_SECRETS for k in self.api_keys):
                raise ValueError("UNDIFFUSE_API_KEYS is empty or a placeholder; production requires API keys")
            if not all(api_keys.is_hashed(k) for k in self.api_keys):
                raise ValueError(
                    "UNDIFFUSE_API_KEYS holds a plain key; production takes owner=sha256:<hex> entries "
                    "(python -m service.api_keys new <owner>)"
                )
        return self


def _prefixed(settings: Settings, prefix: str, view: type[_View], skip: set[str] = frozenset()) -> dict:
    """The view's fields from the Settings fields (or properties) named prefix + field."""
    return {
        name: getattr(settings, prefix + name)
        for name in view.model_fields
        if name not in skip and hasattr(settings, prefix + name)
    }
