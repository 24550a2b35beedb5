"""Per-owner secrets and Standard Webhooks signatures, verified with the `standardwebhooks` library."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from service.settings import Settings
from service.webhooks.signing import DEVELOPMENT_KEY, owner_secret, owner_secrets, signed_headers

KEY, OLD_KEY = "k" * 32, "o" * 32
PRODUCTION = {"environment": "production", "api_keys": "a=sha256:" + "0" * 64}


def test_each_owner_has_its_own_secret_derived_from_the_server_key():
    alice, bob = owner_secret(KEY, "alice"), owner_secret(KEY, "bob")
    assert alice.startswith("whsec_") and alice != bob
    assert owner_secret(KEY, "alice") == alice  # derived, the same in every replica
    assert owner_secret(OLD_KEY, "alice") != alice  # another server key rotates it
    assert owner_secrets(Settings().webhooks, "alice") == [owner_secret(DEVELOPMENT_KEY, "alice")]


def test_a_signed_delivery_verifies_with_the_owners_secret_only():
    secret = owner_secret(KEY, "alice")
    body = '{"type":"job.succeeded","timestamp":"2026-01-01T00:00:00.000Z","data":{"id":"x"}}'
    headers = signed_headers([secret], "msg_x_succeeded", body)
    assert Webhook(secret).verify(body, headers)["data"]["id"] == "x"
    with pytest.raises(WebhookVerificationError):
        Webhook(owner_secret(KEY, "bob")).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace('"x"', '"y"'), headers)


def test_during_a_rotation_both_secrets_verify():
    settings = Settings(webhook_signing_key=KEY, webhook_previous_signing_key=OLD_KEY)
    secrets = owner_secrets(settings.webhooks, "alice")
    assert secrets == [owner_secret(KEY, "alice"), owner_secret(OLD_KEY, "alice")]
    body = "{}"
    headers = signed_headers(secrets, "msg_1", body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in secrets:
        assert Webhook(secret).verify(body, headers) == {}


def test_production_has_no_development_key_and_refuses_placeholders():
    assert owner_secrets(Settings(**PRODUCTION).webhooks, "alice") == []  # webhooks off
    for bad in ("changeme", "short"):
        with pytest.raises(ValidationError, match="WEBHOOK_SIGNING_KEY"):
            Settings(**PRODUCTION, webhook_signing_key=bad)
    assert owner_secrets(Settings(**PRODUCTION, webhook_signing_key=KEY).webhooks, "alice") == [
        owner_secret(KEY, "alice")
    ]
