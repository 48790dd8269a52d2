"""How fast the dashboard draws a job with 50,000 candidates (goal: under 2 s).

Starts a real server on a fresh SQLite database, writes a job with N candidates through
the db layer, and times in headless Chromium:
  * cold: a new browser context opens the job page (HTML, plotly.js, data, drawing);
  * warm: from another job's page (plotly.js already parsed) to the 50k job drawn;
  * the ``/scatter`` call alone (server side decimation).
Each is the median of --repeats runs. Prints the figures and appends a section to
bench/RESULTS.md (never rewriting what others wrote there).

    .venv/bin/python bench/dashboard.py [--candidates 50000] [--repeats 5] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.dashboard.routes import PLOTLY_JS  # noqa: E402
from tests.dashboard.harness import launch_browser, live_server, seed_job, seed_refs  # noqa: E402

GOAL_S = 2.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, live_server(Path(tmp) / "data") as live:
        t0 = time.perf_counter()
        refs = seed_refs(live.factory, live.tenant_id)
        big = seed_job(live.factory, live.tenant_id, n=args.candidates, refs=refs)
        small = seed_job(live.factory, live.tenant_id, n=20, seed=1, refs=refs)
        took = time.perf_counter() - t0
        print(f"seeded {args.candidates:,} candidates in {took:.1f} s; front {len(big.front)}")
        headers = {"Authorization": f"Bearer {live.key}"}
        api_s = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            body = httpx.get(f"{live.url}/v1/jobs/{big.job_id}/scatter", headers=headers, timeout=60).json()
            api_s.append(time.perf_counter() - t)
        shown = body["shown"]
        # the page draws the front with points equal within resolution folded, as /scatter sends it
        ready = f"#scatter[data-total='{args.candidates}'][data-front-count='{len(body['front']['id'])}']"
        cold_s, warm_s, draw_ms = [], [], []
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            for _ in range(args.repeats):
                context = browser.new_context(viewport={"width": 1360, "height": 900})
                context.add_init_script(f"sessionStorage.setItem('modeltailor.apiKey', {live.key!r})")
                page = context.new_page()
                t = time.perf_counter()
                page.goto(f"{live.url}/#/jobs/{big.job_id}")
                page.wait_for_selector(ready, timeout=60_000)
                cold_s.append(time.perf_counter() - t)
                page.goto(f"{live.url}/#/jobs/{small.job_id}")
                page.wait_for_selector("#scatter[data-total='20']")
                t = time.perf_counter()
                page.evaluate(f"location.hash = '#/jobs/{big.job_id}'")
                page.wait_for_selector(ready, timeout=60_000)
                warm_s.append(time.perf_counter() - t)
                draw_ms.append(float(page.locator("#scatter").get_attribute("data-render-ms") or "nan"))
                context.close()
            browser.close()

    med = statistics.median

    def spread(values: list[float]) -> str:
        return f"median {med(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"

    lines = [
        f"candidates {args.candidates:,}; points drawn {shown:,} (all {len(big.front)} front points)",
        f"cold page load (new browser context) to drawn scatter: {spread(cold_s)}",
        f"warm navigation (dashboard open) to drawn scatter: {spread(warm_s)}",
        f"plotly draw alone: median {med(draw_ms):.0f} ms; GET /scatter: median {1000 * med(api_s):.0f} ms",
        f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        f"goal < {GOAL_S:.0f} s: warm {'met' if med(warm_s) < GOAL_S else 'NOT met'}, "
        f"cold {'met' if med(cold_s) < GOAL_S else 'NOT met'} (cold includes fetching and parsing "
        f"{PLOTLY_JS.stat().st_size / 1e6:.1f} MB of plotly.js)",
    ]
    print("\n".join(lines))
    if not args.no_write:
        command = (
            f".venv/bin/python bench/dashboard.py --candidates {args.candidates} --repeats {args.repeats}"
        )
        section = (
            f"\n## Dashboard render at {args.candidates:,} candidates ({dt.date.today().isoformat()})\n\n"
            f"- machine: {machine()}; headless Debian Chromium via Playwright, SQLite\n"
            f"- command: `{command}`\n" + "".join(f"- {line}\n" for line in lines)
        )
        results = REPO / "bench" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n")
        with results.open("a", encoding="utf-8") as fh:
            fh.write(section)
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
