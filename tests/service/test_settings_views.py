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


def test_the_decode_and_step_graph_settings_reach_the_engine_view_and_each_engines_config(monkeypatch):
    import undiffuse
    import undiffuse.engine
    from service.denoiser import Denoiser

    s = Settings(device="cpu", max_decode_batch=8, preview_decode_every=3, invariant_rows=0, step_graphs="on")
    unset = Settings(device="cpu")
    assert (s.engine.max_decode_batch, s.engine.preview_decode_every, s.engine.invariant_rows) == (8, 3, 0)
    assert (unset.engine.max_decode_batch, unset.engine.preview_decode_every, unset.engine.invariant_rows) == (
        None,
        5,
        None,
    )

    class Built(Exception):
        """Stops the replica once its first engine's config is made: no model, thread or Redis."""

    def engine(model, config):
        raise Built(config)

    monkeypatch.setattr(undiffuse, "load_model", lambda path, device: None)
    monkeypatch.setattr(undiffuse.engine, "DenoisingEngine", engine)
    for settings, expected in ((s, (8, 3, 0, True)), (unset, (None, 5, None, None))):
        with pytest.raises(Built) as built:
            Denoiser.func_or_class(settings)
        config = built.value.args[0]
        got = (config.max_decode_batch, config.preview_decode_every, config.invariant_rows, config.step_graphs)
        assert got == expected


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_max_decode_batch_or_invariant_rows_is_unset(monkeypatch, value):
    monkeypatch.setenv("UNDIFFUSE_MAX_DECODE_BATCH", value)
    monkeypatch.setenv("UNDIFFUSE_INVARIANT_ROWS", value)
    assert (Settings().engine.max_decode_batch, Settings().engine.invariant_rows) == (None, None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("UNDIFFUSE_MAX_DECODE_BATCH", "0"),
        ("UNDIFFUSE_MAX_DECODE_BATCH", "x"),
        ("UNDIFFUSE_PREVIEW_DECODE_EVERY", "0"),
        ("UNDIFFUSE_PREVIEW_DECODE_EVERY", "x"),
        ("UNDIFFUSE_PREVIEW_DECODE_EVERY", ""),
        ("UNDIFFUSE_INVARIANT_ROWS", "-1"),
        ("UNDIFFUSE_INVARIANT_ROWS", "eight"),
    ],
)
def test_a_bad_decode_setting_is_refused_naming_it(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable.removeprefix("UNDIFFUSE_").lower()):
        Settings()
