"""Issue 18: no upload runs code, at upload or later; archive bombs are refused with bounded memory.

Every payload is built at test time from a real ``torch.export.save`` archive and sent to a
real server. Code-execution payloads would create a marker file (they do under plain
``torch.export.load``, checked first); the marker must appear neither after the upload nor
after the job path loads the model. Bombs go to ``modeltailor serve`` in its own process with
the default limits, whose peak memory (and its inspection children's) is measured.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from compression.data import make_dataset
from compression.model_io import ModelLoadError, load_pt2
from compression.resolve import resolve_model
from service.app import create_app
from service.inspect_process import inspect_in_child
from service.settings import Settings
from service.uploads import UploadError
from tests.live import run_app, server_process
from tests.security.conftest import (
    STRIPPED,
    PeakRss,
    code_execution_payloads,
    issue_bombs,
    npz_arrays,
    npz_bytes,
)

RSS_BOUND = 1.5e9


@dataclass
class Server:
    url: str
    key: str
    settings: Settings

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/v1", headers={"Authorization": f"Bearer {self.key}"}, timeout=300
        )


@contextmanager
def serve(db_url: str, data_dir: Path, **limits: Any) -> Iterator[Server]:
    """The app in this process (uvicorn thread) with ``limits`` overriding the settings."""
    settings = Settings(data_dir=data_dir, database_url=db_url, run_jobs=False, **limits)
    with run_app(create_app(settings, announce=lambda _msg: None)) as url:
        yield Server(url, settings.local_key_path.read_text().strip(), settings)


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    with serve(db_url, tmp_path / "data", uploads_per_tenant=8) as srv:
        yield srv


def post(c: httpx.Client, what: str, filename: str, payload: bytes) -> httpx.Response:
    return c.post(f"/{what}", files={"file": (filename, payload)})


def nothing_left(data_dir: Path) -> bool:
    return all(not list((data_dir / sub).iterdir()) for sub in ("tmp", "models", "datasets"))


# --------------------------------------------------------------------------- code execution


def test_payloads_run_code_under_plain_torch_export_load(real_pt2: Path, tmp_path: Path) -> None:
    """The payloads are live: each one runs its code when torch reads the archive directly."""
    import torch

    markers = tmp_path / "markers"
    markers.mkdir()
    for name, data in code_execution_payloads(real_pt2, markers).items():
        path = tmp_path / "payload.pt2"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.CRITICAL)
            try:
                # forward itself, as modeltailor's copy of the graph runs it (no input-check hook)
                torch.export.load(str(path)).module().forward(torch.randn(2, 1, 8, 8))
            except Exception:  # several payloads break the load after their code has run
                pass
            finally:
                logging.disable(logging.NOTSET)
        assert [p.name for p in markers.iterdir()] == [name.replace(" ", "-")], name
        next(markers.iterdir()).unlink()


REFUSED = {
    "use_pickle weight": "is pickled (use_pickle)",
    "use_pickle tensor constant": "is pickled (use_pickle)",
    "opaque constant": "'data/constants/opaque_obj_0' is not part of a plain torch.export archive",
    "shape expression": "symbolic shape expression",
    "tree spec keys": "tree spec dict keys",
}


def test_no_upload_runs_code_at_upload_or_when_a_job_loads_it(
    server: Server, real_pt2: Path, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    payloads = code_execution_payloads(real_pt2, markers)
    with server.client() as c, ThreadPoolExecutor(len(payloads)) as pool:
        answers = dict(
            zip(payloads, pool.map(lambda d: post(c, "models", "m.pt2", d), payloads.values()), strict=True)
        )
        for name, r in answers.items():
            if name in STRIPPED:  # the rebuilt archive leaves the code out and the model loads
                assert r.status_code == 201, (name, r.text)
                assert r.json()["params"] == 4 * 9 + 4 + 4 + 4 + 256 * 10 + 10
            else:
                assert r.status_code == 400 and REFUSED[name] in r.json()["detail"], (name, r.text)
        assert list(markers.iterdir()) == []
        assert c.get("/models").json()["count"] == len(STRIPPED)
    # The job path (compression.resolve -> load_pt2) on what was stored, then run, and on the rest.
    data = make_dataset("d", **npz_arrays())
    stored = sorted((server.settings.data_dir / "models").iterdir())
    assert len(stored) == len(STRIPPED)
    for path in stored:
        model = resolve_model(path, data)
        model.gm(model.example_input(2))
    for name, payload in payloads.items():
        if name not in STRIPPED:
            (tmp_path / "refused.pt2").write_bytes(payload)
            with pytest.raises(ModelLoadError):
                load_pt2(tmp_path / "refused.pt2")
    assert list(markers.iterdir()) == []


# --------------------------------------------------------------------------- bombs


@pytest.fixture(scope="session")
def bombs(real_pt2: Path) -> dict[str, tuple[str, bytes]]:
    return issue_bombs(real_pt2)


EXPECTED = {
    "npz inflating to 2.4 GB": (413, "MODELTAILOR_MAX_UNPACKED_BYTES"),
    "pt2 with a 2 GiB weight": (413, "MODELTAILOR_MAX_UNPACKED_BYTES"),
    "pt2 declaring a [1, 8192, 65536] weight": (413, "MODELTAILOR_MAX_MODEL_PARAMS"),
    "pt2 whose weight member lies about its size": (400, "CRC"),
    "npz whose x_train member lies about its size": (400, "x_train declares shape"),
    "npz inflating to 0.86 GB": (413, "MODELTAILOR_MAX_DATASET_ELEMENTS"),
}


def test_bombs_are_refused_before_inflating_with_bounded_memory(
    db_url: str, tmp_path: Path, bombs: dict[str, tuple[str, bytes]]
) -> None:
    data_dir = tmp_path / "data"
    with (
        server_process(
            data_dir, db_url, log_path=tmp_path / "server.log", run_jobs=False, uploads_per_tenant=3
        ) as srv,
        PeakRss(srv.proc.pid) as rss,
        httpx.Client(
            base_url=f"{srv.url}/v1", headers={"Authorization": f"Bearer {srv.key}"}, timeout=300
        ) as c,
    ):
        for name, (what, payload) in bombs.items():
            r = post(c, what, "bomb.pt2" if what == "models" else "bomb.npz", payload)
            code, needle = EXPECTED[name]
            assert r.status_code == code and needle in r.json()["detail"], (name, r.text)
        # three at once (the issue's 3 x 0.86 MB, 3.84 GB before)
        what, payload = bombs["npz inflating to 0.86 GB"]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post(c, what, "bomb.npz", payload), range(3)))
        assert [r.status_code for r in answers] == [413] * 3, [r.text for r in answers]
        assert c.get("/devices").status_code == 200  # still serving
        server_peak, children_peak = rss.server_peak, rss.children_peak
    assert server_peak < RSS_BOUND, f"server peak RSS {server_peak / 1e9:.2f} GB"
    assert 0 < children_peak < RSS_BOUND, f"inspection peak RSS {children_peak / 1e9:.2f} GB"
    assert nothing_left(data_dir)


def test_limits_are_the_settings_and_name_them(db_url: str, tmp_path: Path, real_pt2: Path) -> None:
    small = {"max_unpacked_bytes": 1_000_000, "max_model_params": 1000, "max_dataset_elements": 1000}
    with serve(db_url, tmp_path / "data", **small) as srv:
        with srv.client() as c:
            r = post(c, "models", "tiny.pt2", real_pt2.read_bytes())  # 2,618 parameters
            assert r.status_code == 413 and "MODELTAILOR_MAX_MODEL_PARAMS" in r.json()["detail"], r.text
            r = post(c, "datasets", "d.npz", npz_bytes(npz_arrays()))  # 3,900 elements
            assert r.status_code == 413 and "MODELTAILOR_MAX_DATASET_ELEMENTS" in r.json()["detail"], r.text
            big = npz_bytes({**npz_arrays(), "x_train": np.zeros((100, 1, 100, 100), np.uint8)})
            r = post(c, "datasets", "d.npz", big)
            assert r.status_code == 413 and "MODELTAILOR_MAX_UNPACKED_BYTES" in r.json()["detail"], r.text
        assert nothing_left(srv.settings.data_dir)


# --------------------------------------------------------------------------- concurrency and the child


def test_a_tenant_checks_at_most_uploads_per_tenant_at_once(db_url: str, tmp_path: Path) -> None:
    with serve(db_url, tmp_path / "data", uploads_per_tenant=1) as srv:
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n\r\n'.encode()
            + npz_bytes(npz_arrays())
            + f"\r\n--{boundary}--\r\n".encode()
        )
        go_on = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield body[:100]
            go_on.wait(60)
            yield body[100:]

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(body)),
        }
        with srv.client() as c, ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, "/datasets", content=slow_body(), headers=headers)
            deadline = time.monotonic() + 30
            while True:  # an empty upload answers 400 without a child, or 429 once the slot is held
                r = post(c, "datasets", "e.npz", b"")
                if r.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 429, r.text
            assert "MODELTAILOR_UPLOADS_PER_TENANT" in r.json()["detail"] and r.headers["Retry-After"]
            go_on.set()
            assert first.result(120).status_code == 201, first.result().text
            assert post(c, "datasets", "e.npz", b"").status_code == 400  # the slot is free again


def test_the_inspection_child_is_held_to_its_time_and_memory(tmp_path: Path, real_pt2: Path) -> None:
    with pytest.raises(UploadError, match="MODELTAILOR_INSPECT_TIMEOUT_S") as slow:
        inspect_in_child("model", real_pt2, Settings(data_dir=tmp_path, inspect_timeout_s=0.05))
    assert slow.value.status == 400
    with pytest.raises(UploadError, match="MODELTAILOR_INSPECT_MEMORY_BYTES"):
        inspect_in_child("model", real_pt2, Settings(data_dir=tmp_path, inspect_memory_bytes=256 * 1024**2))
    info = inspect_in_child("dataset", _npz_file(tmp_path), Settings(data_dir=tmp_path))
    assert info["x_train"] == [40, 1, 8, 8] and info["num_classes"] == 3


def _npz_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(npz_arrays()))
    return path


def test_npz_arrays_keep_their_layout_and_byte_order(tmp_path: Path) -> None:
    """The loader reads arrays from their checked headers itself: Fortran order and byte order hold."""
    from compression.data import load_npz

    arrays = npz_arrays()
    arrays["x_train"] = np.asfortranarray(arrays["x_train"])
    arrays["y_train"] = arrays["y_train"].astype(">i8")
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(arrays))
    data = load_npz(path)
    np.testing.assert_array_equal(data.y_train, npz_arrays()["y_train"])
    np.testing.assert_allclose(data.x_train * 255, npz_arrays()["x_train"].astype(np.float32), rtol=1e-5)
