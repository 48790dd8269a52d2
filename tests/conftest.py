"""Suite-wide collection order: files with slow tests run first.

``pytest -n 2 --dist loadfile --no-loadscope-reorder`` (scripts/test.sh) hands whole files to
the two workers in collection order (without the flag, xdist puts files with many tests first,
and the few-test, long files last). The slow files (real servers, training, kill -9, 100 jobs)
sit late alphabetically too; run last, the longest of them decide the suite's wall time alone
on one worker. Started first, the quick files fill in beside them. The longest file of all
(100 real jobs on two worker processes, the heaviest load the suite puts on the machine)
starts first, so it is over before the load-sensitive kill -9 file starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

LONGEST_FIRST = ("test_reliability_concurrency.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    # stable sort: collection order kept within each part
    items.sort(key=lambda item: (item.path.name not in LONGEST_FIRST, item.path not in slow_files))


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium per test process (installed by scripts/ensure_chromium.sh if missing).

    Shared by every test that drives a browser: Playwright's sync API allows one instance per
    thread, so a second ``sync_playwright()`` while this one lives fails."""
    from playwright.sync_api import sync_playwright

    from tests.dashboard.harness import launch_browser

    with sync_playwright() as playwright:
        chromium = launch_browser(playwright)
        yield chromium
        chromium.close()
