"""Upload bombs against a real server: peak memory of the server and of its inspection children.

Starts ``modeltailor serve`` (no job runner, default limits, SQLite or PostgreSQL) as a child
process on 127.0.0.1 and sends the bombs of issue 18, built from a real ``torch.export``
archive (``tests.security.conftest.issue_bombs``): an .npz inflating to 2.4 GB, a .pt2 with a
2 GiB weight, a .pt2 declaring a [1, 8192, 65536] weight over an empty record, members whose
zip headers lie about their size, and three 0.86 GB .npz at once. For each it prints the
status, the time to answer and the reason; then the server's peak RSS (VmHWM) and the
largest peak RSS of an inspection child (sampled every 10 ms). It also times clean uploads
(a small .pt2 and .npz) end to end and the inspection child alone against the same
inspection in-process: the difference is the cost of starting the child.

    .venv/bin/python bench/upload_bombs.py [--backend sqlite|postgresql] [--uploads-per-tenant 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compression.archive_check import ArchiveLimits  # noqa: E402
from db.testing import fresh_database  # noqa: E402
from service.inspect_process import Kind, archive_limits, inspect_in_child  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.uploads import inspect_dataset, inspect_model  # noqa: E402
from tests.live import server_process  # noqa: E402
from tests.security.conftest import PeakRss, issue_bombs, npz_arrays, npz_bytes, tiny_model_pt2  # noqa: E402


def post(c: httpx.Client, what: str, payload: bytes) -> tuple[int, float, str]:
    start = time.perf_counter()
    r = c.post(f"/{what}", files={"file": ("upload.pt2" if what == "models" else "upload.npz", payload)})
    detail = r.json().get("detail", "") if r.status_code >= 400 else "stored"
    return r.status_code, time.perf_counter() - start, str(detail)


def child_cost(folder: Path, model: Path, data: Path, repeats: int) -> None:
    """Median wall time of the inspection child vs the same inspection in this process."""
    settings = Settings(data_dir=folder)
    limits = ArchiveLimits(**archive_limits(settings))
    cases: list[tuple[Kind, Path, Callable[[Path, ArchiveLimits], object]]] = [
        ("model", model, inspect_model),
        ("dataset", data, inspect_dataset),
    ]
    for kind, path, inline in cases:
        inline(path, limits)  # imports done: the in-process figure is the inspection alone
        child, local = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            inspect_in_child(kind, path, settings)
            child.append(time.perf_counter() - start)
            start = time.perf_counter()
            inline(path, limits)
            local.append(time.perf_counter() - start)
        c, i = statistics.median(child), statistics.median(local)
        print(
            f"inspection of a small {kind}: child {c:.2f} s, in-process {i:.2f} s -> start-up {c - i:.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument(
        "--uploads-per-tenant", type=int, default=3, help="3: the three bombs are checked at once"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timings of the inspection child")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upload-bombs-") as tmp:
        folder = Path(tmp)
        model = tiny_model_pt2(folder / "tiny.pt2")
        data = folder / "d.npz"
        data.write_bytes(npz_bytes(npz_arrays()))
        start = time.perf_counter()
        bombs = issue_bombs(model)
        print(f"built {len(bombs)} bombs in {time.perf_counter() - start:.1f} s")
        with (
            fresh_database(args.backend, folder) as db_url,
            server_process(
                folder / "data",
                db_url,
                log_path=folder / "server.log",
                run_jobs=False,
                uploads_per_tenant=args.uploads_per_tenant,
            ) as srv,
            httpx.Client(
                base_url=f"{srv.url}/v1", headers={"Authorization": f"Bearer {srv.key}"}, timeout=600
            ) as c,
        ):
            print(f"server started: peak RSS {PeakRss.hwm(srv.proc.pid) / 1e6:.0f} MB ({args.backend})")
            for what, payload in (("models", model.read_bytes()), ("datasets", data.read_bytes())):
                code, seconds, _ = post(c, what, payload)
                print(f"clean {what[:-1]} upload ({len(payload) / 1e3:.0f} kB): {code} in {seconds:.2f} s")
            print(f"after the clean uploads: server peak RSS {PeakRss.hwm(srv.proc.pid) / 1e6:.0f} MB")
            with PeakRss(srv.proc.pid) as rss:
                for name, (what, payload) in bombs.items():
                    code, seconds, detail = post(c, what, payload)
                    print(f"{name} ({len(payload) / 1e6:.2f} MB): {code} in {seconds:.2f} s: {detail[:150]}")
                what, payload = bombs["npz inflating to 0.86 GB"]
                with ThreadPoolExecutor(3) as pool:
                    answers = list(pool.map(lambda _: post(c, what, payload), range(3)))
                codes, slowest = [a[0] for a in answers], max(a[1] for a in answers)
                print(f"three 0.86 GB .npz at once: {codes} in {slowest:.2f} s")
                server_peak, child_peak = rss.server_peak, rss.children_peak
        print(f"peak RSS: server {server_peak / 1e6:.0f} MB, inspection child {child_peak / 1e6:.0f} MB")
        child_cost(folder, model, data, args.repeats)


if __name__ == "__main__":
    main()
