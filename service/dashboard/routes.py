"""Serves the dashboard: ``/`` (the page), its static files and plotly.js from the plotly package.

Nothing here needs the API key: the page asks for it once and keeps it in the
browser's sessionStorage; every data call then goes to ``/v1`` with it. plotly.js
comes from the installed ``plotly`` Python package, so nothing is fetched from the
internet at run time.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Our own files change with the code: revalidate. plotly.js changes only with the package.
NO_CACHE = {"Cache-Control": "no-cache"}
LONG_CACHE = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(include_in_schema=False)


@cache
def plotly_js_path() -> Path:
    """plotly.min.js shipped inside the installed plotly package."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found at {path}; reinstall the 'plotly' package")
    return path


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The single page; the client-side router shows jobs, a job, a candidate or devices."""
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers=NO_CACHE)


@router.get("/dashboard/static/plotly.min.js")
def plotly_js() -> FileResponse:
    """plotly.js from the installed Python package (no CDN)."""
    return FileResponse(plotly_js_path(), media_type=MEDIA_TYPES[".js"], headers=LONG_CACHE)


@router.get("/dashboard/static/{name}")
def static_file(name: str) -> FileResponse:
    """The dashboard's own JS and CSS (flat folder; anything else is a 404)."""
    path = STATIC_DIR / name
    if "/" in name or "\\" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dashboard file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)
