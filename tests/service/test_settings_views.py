"""The typed views components take (Settings.storage, .webhooks, .engine, .queue) carry exactly
what the flat UNDIFFUSE_* settings say. No servers."""

from __future__ import annotations

import pytest

from service.settings import EngineSettings, QueueSettings, Settings, StorageSettings, WebhookSettings


def test_views_follow_the_flat_settings():
    s = Settings(
        s3_bucket="pictures",
        s3_access_key_id="k",
        s3_secret_access_key="s",
        presign_expiry_seconds=60,
        webhook_concurrency=3,
        webhook_allowed_ports=[8443],
        shard_size=8,
        max_steps=100,
        latency_slack=2.0,
    )
    assert (s.storage.bucket, s.storage.access_key_id, s.storage.presign_expiry_seconds) == ("pictures", "k", 60)
    assert s.storage.secret_access_key.get_secret_value() == "s"
    assert (s.webhooks.concurrency, s.webhooks.allowed_ports, s.webhooks.production) == (3, (8443,), False)
    assert (s.engine.min_batch_rows, s.engine.latency_slack) == (16, 2.0)  # a guided shard's rows
    assert (s.queue.shard_size, s.queue.quantum) == (8, 8 * 100 * 2)


def test_every_view_field_comes_from_settings_and_views_are_read_only():
    s = Settings()
    for view in (s.storage, s.webhooks, s.engine, s.queue):
        assert type(view) in (StorageSettings, WebhookSettings, EngineSettings, QueueSettings)
        with pytest.raises(ValueError):
            setattr(view, next(iter(type(view).model_fields)), None)


def test_production_reaches_the_webhook_view():
    production = Settings(environment="production", api_keys=["alice=sha256:" + "0" * 64])
    assert production.webhooks.production is True
