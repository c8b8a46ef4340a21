"""The chat page at ``/``: hand-written static files (``server/web/``) served by the same app,
and ``GET /web/config.json``, the few facts the page needs that the OpenAI API does not give.

The page talks only to this server's own API (its Content-Security-Policy says so), so it works
offline; ``qwenvl serve --no-web`` (``ServerSettings.web = False``) leaves all of it out.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

from qwenvl.grounding import grounding_prompt
from qwenvl.server.state import State

WEB_DIR = files("qwenvl.server").joinpath("web")
PHRASE = "{phrase}"  # where the page puts the phrase of a "find" into the model's own prompt

# Only this server: no CDN, no fonts, no other host can be reached from the page. Media stay
# in the page as data: and blob: URLs.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
    "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(str(WEB_DIR.joinpath("index.html")), headers=_HEADERS)


@router.get("/web/config.json", include_in_schema=False)
async def config(state: State) -> dict[str, Any]:
    """Whether ``/v1`` needs a key, the media limits (so the page can refuse a file before
    sending megabytes the server would refuse), and the model's own grounding prompt."""
    s = state.settings
    return {
        "api_key_required": s.api_key is not None,
        "max_media_bytes": s.max_media_bytes,
        "max_body_bytes": s.max_body_bytes,
        "max_image_pixels": s.max_image_pixels,
        "find_prompt": grounding_prompt(PHRASE, state.llm.config.family),
    }


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/web/``."""
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=str(WEB_DIR)), name="web")
