"""The browser side of the gateway: a chat page at ``/`` and a status page at ``/status``.

Plain HTML and JavaScript from ``static/`` (no build step). The pages are public, since they
hold nothing; everything they show comes from API calls made with the key the user types in:
``/v1/models`` and ``/v1/chat/completions`` for the chat, ``/api/status`` (an API key or the
metrics token) for the status page. Conversations stay in the browser (localStorage); the
gateway keeps nothing of them. A strict Content-Security-Policy allows scripts from this origin
only, so text that slipped through the page's own escaping still could not run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse

from gateway.web.status import router as status_router

STATIC = Path(__file__).parent / "static"
# What the pages may load: files of their own origin, API calls to it; no inline script, no
# frames, no plugins, no other origins (the chat renders model output: defence in depth).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
ASSETS = sorted(p.name for p in STATIC.iterdir() if p.suffix in MEDIA_TYPES)  # a fixed list: no paths from URLs

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = STATIC / name
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
async def chat_page() -> FileResponse:
    return _file("index.html")


@router.get("/status")
async def status_page() -> FileResponse:
    return _file("status.html")


def _asset_route(name: str) -> None:
    async def asset() -> FileResponse:
        return _file(name)

    router.add_api_route(f"/web/{name}", asset, methods=["GET"])


for _name in ASSETS:
    _asset_route(_name)


def install(app: FastAPI) -> None:
    """Mount the pages and ``/api/status`` on the gateway."""
    app.include_router(router)
    app.include_router(status_router)
