"""/v1/webhook-secret, and the checks of a submission's webhook (service.webhooks)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.api.deps import UNAUTHORIZED, Context, Ctx, Owner
from service.api.errors import invalid
from service.api.schemas import JobCreate, WebhookSecret
from service.jobs.webhook_schedule import DEFAULT_EVENTS
from service.webhooks import signing
from service.webhooks.addresses import AddressRefused, Guard, checked_addresses

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=UNAUTHORIZED)
DISABLED = "webhooks are not enabled on this server (UNDIFFUSE_WEBHOOK_SIGNING_KEY is unset)"


async def webhook_target(body: JobCreate, ctx: Context, owner: str | None = None) -> tuple[str, list[str]] | None:
    """(url, events) of the submission's webhook, or None; a 422 naming the field when the URL
    may not be delivered to (service.webhooks.addresses: credentials in it, http:// in
    production, a port not open to webhooks, a host that does not resolve to public addresses)
    or the events come without a URL. owner: whose DNS budget the lookup counts in (None: the
    host's own)."""
    if body.webhook_url is None:
        if body.webhook_events is not None:
            raise invalid("webhook_events", "needs webhook_url", body.webhook_events)
        return None
    if not signing.enabled(ctx.settings.webhooks):
        raise invalid("webhook_url", DISABLED, body.webhook_url)
    try:
        await checked_addresses(body.webhook_url, Guard.from_settings(ctx.settings.webhooks), owner)
    except AddressRefused as e:
        raise invalid("webhook_url", str(e), body.webhook_url) from None
    return body.webhook_url, list(body.webhook_events or DEFAULT_EVENTS)


@router.get(
    "/webhook-secret",
    response_model=WebhookSecret,
    responses={404: {"description": "webhooks are not enabled on this server"}},
)
async def webhook_secret(ctx: Ctx, owner: Owner) -> WebhookSecret:
    """The secret that signs this key owner's webhook deliveries (Standard Webhooks, whsec_...).
    Every key of one owner gets the same; it changes when the server's signing key is rotated."""
    secrets = signing.owner_secrets(ctx.settings.webhooks, owner)
    if not secrets:
        raise HTTPException(status.HTTP_404_NOT_FOUND, DISABLED)
    return WebhookSecret(secret=secrets[0])
