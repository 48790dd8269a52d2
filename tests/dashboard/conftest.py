"""Fixtures for the dashboard: a live server on a fresh SQLite database and headless Chromium."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.job import ExportContext, ExportResult
from tests.dashboard.harness import REPO, Live, live_server

ARTIFACTS = REPO / "test-artifacts"
KEY_STORE = "modeltailor.apiKey"


def fake_exporter(ctx: ExportContext) -> ExportResult:
    """Writes a file and reports a measured 2× speedup, as the real exporter does."""
    ctx.out_path.write_bytes(b"onnx-model-of-candidate")
    predicted = ctx.scores.latency_ms
    return ExportResult(
        ctx.out_path,
        {
            "measured_latency_ms": 1.25,
            "dense_latency_ms": 2.5,
            "speedup": 2.0,
            "accuracy": 0.9712,
            "predicted_latency_ms": predicted,
        },
    )


def failing_exporter(_ctx: ExportContext) -> ExportResult:
    raise RuntimeError("the device cpu-ort-1t did not answer within 60 s")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    """A server whose exports fail with a known message."""
    with live_server(tmp_path / "data", exporter=failing_exporter) as server:
        yield server


@pytest.fixture
def live_exporting(tmp_path: Path) -> Iterator[Live]:
    """A server whose exports succeed (fake model file, known metrics)."""
    with live_server(tmp_path / "data", exporter=fake_exporter) as server:
        yield server


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """``open_page(live, signed_in=True)``: a fresh browser context; fails the test on any JS error."""
    contexts: list[Any] = []
    errors: list[str] = []

    def make(live: Live, *, signed_in: bool = True) -> Any:
        context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        contexts.append(context)
        if signed_in:
            context.add_init_script(f"sessionStorage.setItem({KEY_STORE!r}, {live.key!r})")
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot into test-artifacts/ (gitignored) and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def doc_screenshot(page: Any, name: str) -> Path | None:
    """Also save the viewport as ``docs/screenshots/<name>.png`` (the README's pictures) when
    ``MODELTAILOR_DOC_SCREENSHOTS=1``: a plain test run leaves the tracked files alone."""
    if os.environ.get("MODELTAILOR_DOC_SCREENSHOTS") != "1":
        return None
    path = REPO / "docs" / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def goto(page: Any, live: Live, route: str) -> None:
    """Open ``route`` (e.g. ``#/jobs/1``) and wait until the page says it is drawn."""
    page.goto(f"{live.url}/{route}")
    page.wait_for_selector("body[data-ready='1']")
