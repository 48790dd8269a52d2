"""Serves the dashboard: ``/`` (the page), its static files and the bundled plotly.js.

Nothing here needs the API key: the page asks for it once and keeps it in the
browser's sessionStorage; every data call then goes to ``/v1`` with it. plotly.js is
the "basic" distribution (scatter, bar; MIT licence, ``static/vendor/PLOTLY-LICENSE.txt``),
1.2 MB instead of the full 4.8 MB bundle, so a first visit parses a quarter of the
script; nothing is fetched from the internet at run time.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Our own files change with the code: revalidate. The vendored plotly.js changes only with a release.
NO_CACHE = {"Cache-Control": "no-cache"}
LONG_CACHE = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)


PLOTLY_JS = STATIC_DIR / "vendor" / "plotly-basic.min.js"


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The single page; the client-side router shows jobs, a job, a candidate or devices."""
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers=NO_CACHE)


@router.get("/dashboard/static/plotly.min.js")
def plotly_js() -> FileResponse:
    """The bundled plotly.js (no CDN)."""
    return FileResponse(PLOTLY_JS, media_type=MEDIA_TYPES[".js"], headers=LONG_CACHE)


@router.get("/dashboard/static/{name}")
def static_file(name: str) -> FileResponse:
    """The dashboard's own JS and CSS (flat folder; anything else is a 404)."""
    path = STATIC_DIR / name
    if "/" in name or "\\" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dashboard file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)
