"""ObjectStore without a server: presigning is local computation."""

import time

from service.settings import Settings
from service.storage import ObjectStore


def test_presigned_urls_are_reused_for_half_their_lifetime():
    store = ObjectStore(Settings(presign_expiry_seconds=2))
    first = store.presign("jobs/x/00000.png")
    assert store.presign("jobs/x/00000.png") == first and "X-Amz-Expires=2" in first
    assert store.presign("jobs/x/00001.png") != first
    time.sleep(1.2)  # past half the lifetime: a fresh URL (a new X-Amz-Date, a new signature)
    assert store.presign("jobs/x/00000.png") != first
