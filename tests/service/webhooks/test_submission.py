"""The webhook checks of a submission (service.api.webhook_routes.webhook_target) and the settings
they depend on: what production refuses and development still takes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.api.schemas import JobCreate
from service.api.webhook_routes import webhook_target
from service.settings import Settings

PRODUCTION = {
    "environment": "production",
    "api_keys": "a=sha256:" + "0" * 64,
    "webhook_signing_key": "a-random-signing-key-0123456789",
}


def submit(url: str, **settings) -> tuple[str, list[str]] | None:
    ctx = SimpleNamespace(settings=Settings(**settings))
    body = JobCreate(webhook_url=url)
    return asyncio.run(webhook_target(body, ctx, owner="alice"))


def refused(url: str, **settings) -> dict:
    """The one error of the 422 a submission with this webhook URL gets."""
    with pytest.raises(RequestValidationError) as invalid:
        submit(url, **settings)
    (error,) = invalid.value.errors()
    return error


def test_production_refuses_plain_http_webhooks_naming_the_field():
    error = refused("http://93.184.215.14/hook", **PRODUCTION)
    assert error["loc"] == ("body", "webhook_url") and "must be an https:// URL" in error["msg"]
    assert submit("https://93.184.215.14/hook", **PRODUCTION) == (
        "https://93.184.215.14/hook",
        ["succeeded", "failed", "canceled"],
    )


def test_development_takes_http_for_local_receivers():
    assert submit("http://93.184.215.14/hook") is not None
    assert submit("http://127.0.0.1:9000/hook", webhook_allow_private=True) is not None  # a receiver on this machine


@pytest.mark.parametrize("settings", [{}, PRODUCTION])
def test_credentials_in_a_webhook_url_are_refused(settings):
    error = refused("https://user:pass@93.184.215.14/hook", **settings)
    assert error["loc"] == ("body", "webhook_url") and "user name or password" in error["msg"]


def test_a_port_other_than_80_and_443_needs_the_setting():
    error = refused("https://93.184.215.14:8443/hook")
    assert error["loc"] == ("body", "webhook_url") and "port 8443 is not open to webhooks" in error["msg"]
    assert submit("https://93.184.215.14:8443/hook", webhook_allowed_ports=[8443]) is not None


def test_an_internal_name_and_a_missing_one_get_the_same_422():
    internal = refused("https://localhost/hook")["msg"].replace("'localhost'", "HOST")
    missing = refused("https://no-such-host.invalid/hook")["msg"].replace("'no-such-host.invalid'", "HOST")
    assert internal == missing


def test_production_refuses_to_turn_the_ssrf_guard_off():
    with pytest.raises(ValidationError, match="UNDIFFUSE_WEBHOOK_ALLOW_PRIVATE"):
        Settings(**PRODUCTION, webhook_allow_private=True)
    assert Settings(webhook_allow_private=True).webhook_allow_private  # development and tests


def test_allowed_ports_come_from_the_environment_as_json(monkeypatch):
    monkeypatch.setenv("UNDIFFUSE_WEBHOOK_ALLOWED_PORTS", "[8443, 9000]")
    assert Settings().webhook_allowed_ports == [8443, 9000]
    with pytest.raises(ValidationError):
        Settings(webhook_allowed_ports=[0])
    with pytest.raises(ValidationError):
        Settings(webhook_allowed_ports=[70000])
