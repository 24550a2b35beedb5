"""The web page at `/`: one HTML file, one script, one stylesheet from service/api/web/, served
as they are (no build step, no CDN, so it works offline). The page calls the same /v1 API with
the key the user pastes; it holds no secret itself."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

ASSETS = Path(__file__).with_name("web")
MEDIA_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
# Scripts and styles only from this origin; images also from the bucket's presigned URLs
# (another origin) and previews (data: URLs); API calls to this origin only.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: http: https:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(ASSETS / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/ui/{name}")
def asset(name: str) -> FileResponse:
    if name not in MEDIA_TYPES:  # a fixed list: no path from the request reaches the filesystem
        raise HTTPException(404, "no such file")
    return FileResponse(ASSETS / name, media_type=MEDIA_TYPES[name], headers=HEADERS)
