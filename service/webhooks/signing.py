"""Webhook signatures, per the Standard Webhooks specification (PyPI `standardwebhooks`).

Each owner (API key owner id) has its own secret, derived from the server's key, so nothing is
stored and every replica derives the same one:

    secret = "whsec_" + base64(HMAC-SHA256(Settings.webhook_signing_key, "undiffuse webhook secret\\0" + owner))

The owner reads it with GET /v1/webhook-secret. Changing the server key rotates every owner's
secret at once; during a rotation, Settings.webhook_previous_signing_key adds a second
signature made with the old secret (the spec's space-separated list in `webhook-signature`),
so receivers verify with either until they have the new one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timezone

from standardwebhooks import Webhook

from service.settings import WebhookSettings

DEVELOPMENT_KEY = "undiffuse-development-webhook-key"  # development only (Settings refuse placeholders in production)
_CONTEXT = b"undiffuse webhook secret\x00"


def server_keys(settings: WebhookSettings) -> list[str]:
    """The keys to sign with, current first; none where webhooks are off (production without
    a key)."""
    current = settings.signing_key
    if current is None:
        return [] if settings.production else [DEVELOPMENT_KEY]
    previous = settings.previous_signing_key
    return [current.get_secret_value(), *([previous.get_secret_value()] if previous is not None else [])]


def enabled(settings: WebhookSettings) -> bool:
    return bool(server_keys(settings))


def owner_secret(server_key: str, owner: str) -> str:
    """The owner's webhook secret (whsec_ + base64 of 32 bytes), as standardwebhooks takes it."""
    digest = hmac.new(server_key.encode(), _CONTEXT + owner.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode()


def owner_secrets(settings: WebhookSettings, owner: str) -> list[str]:
    return [owner_secret(key, owner) for key in server_keys(settings)]


def signed_headers(secrets: list[str], msg_id: str, body: str, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: webhook-id (the same for every attempt of
    an event), webhook-timestamp (this attempt's, in seconds) and webhook-signature (one `v1,`
    signature per secret)."""
    at = at or datetime.now(timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(s).sign(msg_id, at, body) for s in secrets),
    }
