"""A hostile tenant against a real server (SQLite and PostgreSQL): shared devices, request
bodies, numbers and the headers of every answer (issue 18, parts 5-8).

* The built-in devices are shared: only the admin key calibrates them, a calibration is
  bounded and can be cancelled (freeing the device at once), and what one tenant's jobs
  made on a shared device (its predictors, calibrations, model hashes) never reaches another.
* A body that is not an upload is refused with 413 before it is read, so a 50 MB body costs
  the server almost nothing; NaN, Infinity and overflowing numbers are a 422 anywhere a
  device, calibration, measurement, export, model or data set body takes a number.
* Every answer carries a Content-Security-Policy, ``X-Frame-Options: DENY`` and
  ``X-Content-Type-Options: nosniff``, and the dashboard runs under its policy in Chromium.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Calibration, Measurement, Predictor, Tenant
from service import calibrations, device_tasks
from service.auth import create_tenant
from service.settings import Settings
from tests.service.conftest import LiveServer, fake_exporter, fake_search, serve

ADMIN_KEY = "admin-key-of-the-tests"
MAX_SAMPLES = 50
# Tenant A's upload, as its calibrations name it ("upload-<sha256[:12]>@<input shape>").
A_HASH = "a11ce0ff5ec4"
A_SPACE = f"upload-{A_HASH}@1x1x8x8"
MB = 1024 * 1024


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """The embedded default with an admin key, a small calibration limit and the stand-in search."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        lease_s=2.0,
        poll_s=0.1,
        admin_key=ADMIN_KEY,
        max_calibration_samples=MAX_SAMPLES,
    )
    for url in serve(settings, search=fake_search, exporter=fake_exporter):
        yield LiveServer(
            url=url, key=settings.local_key_path.read_text().strip(), settings=settings, db_url=db_url
        )


@pytest.fixture
def factory(server: LiveServer) -> Iterator[Any]:
    engine = make_engine(server.db_url)
    yield make_session_factory(engine)
    engine.dispose()


def _client(server: LiveServer, key: str, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}", **headers}, timeout=60
    )


def _tenant_b(factory: Any) -> tuple[int, str]:
    with factory() as session:
        tenant, key = create_tenant(session, name="tenant-b")
        return tenant.id, key


def _builtin(http: httpx.Client, name: str = "cpu-ort-1t") -> dict[str, Any]:
    return next(d for d in http.get("/devices").json()["data"] if d["name"] == name)


def _tenant_id(factory: Any, name: str = "local") -> int:
    with factory() as session:
        return int(session.scalars(select(Tenant.id).where(Tenant.name == name)).one())


# --- shared devices ----------------------------------------------------------------------


def test_shared_devices_are_calibrated_by_the_admin_only_and_calibrations_cancel(
    server: LiveServer, factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []  # calibrations stay queued: their measuring thread is not started
    monkeypatch.setattr(
        calibrations, "start_calibration_thread", lambda _f, _d, cal_id, **_kw: started.append(cal_id)
    )
    _b_id, b_key = _tenant_b(factory)
    with (
        _client(server, server.key) as a,
        _client(server, server.key, **{"X-Admin-Key": ADMIN_KEY}) as admin,
        _client(server, b_key) as b,
        _client(server, b_key, **{"X-Admin-Key": ADMIN_KEY}) as b_admin,
    ):
        device = _builtin(a)
        url = f"/devices/{device['id']}/calibrate"
        refused = a.post(url, json={"samples": 8})
        assert refused.status_code == 403, refused.text
        assert (
            "X-Admin-Key" in refused.json()["detail"] and "MODELTAILOR_ADMIN_KEY" in refused.json()["detail"]
        )
        assert a.post(url, json={"samples": 8}, headers={"X-Admin-Key": "guess"}).status_code == 403
        too_big = admin.post(url, json={"samples": 5000})
        assert (
            too_big.status_code == 422 and "MODELTAILOR_MAX_CALIBRATION_SAMPLES" in too_big.json()["detail"]
        )
        assert started == []

        first = admin.post(url, json={"samples": 8})
        assert first.status_code == 202, first.text
        cal = first.json()
        assert cal["params"]["scope"] == "device" and started == [cal["id"]]
        busy = admin.post(url, json={"samples": 8})  # one at a time per device; the admin may stop it
        assert busy.status_code == 409 and f"/v1/calibrations/{cal['id']}/cancel" in busy.json()["detail"]
        # Another tenant can neither see nor cancel it; the owner can.
        assert b.post(f"/calibrations/{cal['id']}/cancel").status_code == 404
        cancelled = a.post(f"/calibrations/{cal['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert (
            cancelled.json()["status"] == "cancelled"
            and cancelled.json()["error"] == "cancelled by its owner"
        )
        assert a.post(f"/calibrations/{cal['id']}/cancel").json()["status"] == "cancelled"  # idempotent
        assert a.post("/calibrations/999999/cancel").status_code == 404

        # The device is free again at once; the admin may cancel anyone's calibration.
        second = admin.post(url, json={"samples": 8})
        assert second.status_code == 202, second.text
        by_admin = b_admin.post(f"/calibrations/{second.json()['id']}/cancel")
        assert by_admin.status_code == 200 and by_admin.json()["error"] == "cancelled by the admin"
        assert a.get(f"/calibrations/{second.json()['id']}").json()["status"] == "cancelled"

        # A tenant calibrates its own devices without the admin key, within the same limit.
        own = a.post("/devices", json={"name": "board-a", "kind": "remote"}).json()
        assert a.post(f"/devices/{own['id']}/calibrate", json={"samples": MAX_SAMPLES + 1}).status_code == 422
        assert a.post(f"/devices/{own['id']}/calibrate", json={"samples": 8}).status_code == 202


def test_a_running_calibration_stops_when_cancelled_and_the_device_is_free(server: LiveServer) -> None:
    with _client(server, server.key) as a:
        own = a.post("/devices", json={"name": "cpu-a", "kind": "local", "threads": 1}).json()
        url = f"/devices/{own['id']}/calibrate"
        cal = a.post(url, json={"samples": 40, "runs": 5}).json()
        deadline = time.monotonic() + 120
        while a.get(f"/calibrations/{cal['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert a.post(f"/calibrations/{cal['id']}/cancel").json()["status"] == "cancelled"
        again = a.post(url, json={"samples": 4, "runs": 5})
        assert again.status_code == 202, again.text  # no 409: the cancelled one let go at once
        a.post(f"/calibrations/{again.json()['id']}/cancel")
        # The measuring threads notice at their next sample and stop without overwriting the outcome.
        names = {f"calibration-{cal['id']}", f"calibration-{again.json()['id']}"}
        while any(t.name in names for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a cancelled calibration kept running"
            time.sleep(0.2)
        final = a.get(f"/calibrations/{cal['id']}").json()
        assert final["status"] == "cancelled" and final["error"] == "cancelled by its owner"
        assert final["progress"]["done"] < 40 and final["predictor_version"] is None


def _store_version(data_dir: Path, store: str, *, within_10pct: float) -> None:
    """A predictor version folder as ``DeviceStore.save_version`` writes it (metrics.json only)."""
    folder = data_dir / "devices" / store / "predictors" / "v0001"
    folder.mkdir(parents=True)
    doc = {
        "version": 1,
        "device": store,
        "default": "macs",
        "records": 30,
        "architectures": 4,
        "predictors": {"macs": {"within_10pct": within_10pct, "mape": 9.0, "n": 8}},
    }
    (folder / "metrics.json").write_text(json.dumps(doc))


def test_what_a_tenant_made_on_a_shared_device_stays_its_own(server: LiveServer, factory: Any) -> None:
    a_id = _tenant_id(factory)
    _b_id, b_key = _tenant_b(factory)
    data_dir = server.settings.data_dir
    with _client(server, server.key) as a, _client(server, b_key) as b:
        device = _builtin(a)
        # The device's own predictor (the admin's; focused on an upload, or made before scoping)
        # and tenant A's own, made by its job's calibration, as the calibration run stores them.
        _store_version(data_dir, "cpu-ort-1t", within_10pct=70.0)
        _store_version(data_dir, f"cpu-ort-1t@t{a_id}", within_10pct=90.0)
        # Versions written outside a calibration run are mirrored by the housekeeping loop.
        deadline = time.monotonic() + 30
        while len(listed := a.get("/predictors", params={"device_id": device["id"]}).json()["data"]) < 2:
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        assert sorted(p["version"] for p in listed) == [1, 2]  # one number names one predictor
        focus = {"space_id": A_SPACE, "within_10pct": 95.0}
        holdout = {
            "measured_ms": [1.0, 2.0],
            "predicted_ms": [1.1, 1.9],
            "names": [A_SPACE, "resnet20@1x3x32x32"],
        }
        with factory() as session:
            for row in session.scalars(select(Predictor).where(Predictor.device_id == device["id"])):
                row.metrics = {**row.metrics, "focus": focus, "holdout": holdout}
            cal = Calibration(
                device_id=device["id"], tenant_id=a_id, status="succeeded", model_id=7, job_id=9,
                params={"samples": 12, "plan": "focused", "model": A_SPACE, "scope": "tenant"},
                progress={"done": 12, "total": 12, "message": f"calibrating 12/12: skipped {A_SPACE}"},
                metrics={"focus": focus}, predictor_version=2,
            )  # fmt: skip
            session.add(cal)
            session.add(
                Measurement(
                    device_id=device["id"], tenant_id=a_id, status="done", purpose="calibration",
                    spec={"space_id": A_SPACE}, latency_ms=1.0,
                )
            )  # fmt: skip
            session.commit()
            cal_id = cal.id

        # A uses its own predictor first and sees its own names.
        mine = a.get(f"/devices/{device['id']}/predictor").json()
        assert mine["scope"] == "tenant" and mine["metrics"]["focus"]["space_id"] == A_SPACE
        assert a.get(f"/calibrations/{cal_id}").status_code == 200

        # B: the device's own predictor only, and not a trace of A.
        answers = [
            b.get(f"/devices/{device['id']}/predictor"),
            b.get("/predictors", params={"device_id": device["id"]}),
            b.get(f"/devices/{device['id']}/calibrations"),
            b.get(f"/devices/{device['id']}/measurements"),
            b.get(f"/devices/{device['id']}/predictor", params={"version": mine["version"]}),
            b.get(f"/calibrations/{cal_id}"),
        ]
        theirs = answers[0].json()
        assert theirs["scope"] == "device" and theirs["version"] != mine["version"]
        assert theirs["metrics"]["within_10pct"] == 70.0
        assert theirs["metrics"]["focus"]["space_id"] == "upload@1x1x8x8"
        assert theirs["metrics"]["holdout"]["names"] == ["upload@1x1x8x8", "resnet20@1x3x32x32"]
        assert [p["scope"] for p in answers[1].json()["data"]] == ["device"]
        assert answers[2].json()["count"] == 0 and answers[3].json()["count"] == 0
        assert answers[4].status_code == 404 and answers[5].status_code == 404
        for answer in answers:
            assert A_HASH not in answer.text, answer.text


# --- request bodies and numbers ------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _json_body(size: int) -> tuple[int, Iterator[bytes]]:
    """A ``POST /v1/models`` JSON body of ``size`` bytes, generated 64 KiB at a time."""
    head, tail = b'{"zoo": "lenet5", "dataset_id": 1, "name": "', b'"}'
    filler = size - len(head) - len(tail)

    def chunks() -> Iterator[bytes]:
        yield head
        left = filler
        while left > 0:
            n = min(left, 64 * 1024)
            yield b"x" * n
            left -= n
        yield tail

    return size, chunks()


def _peak_growth_mb(send: Any) -> tuple[httpx.Response, float]:
    """The answer of ``send()`` and how far this process's resident memory rose above its level
    before (the server runs in a thread of this process; ``clear_refs`` resets the peak)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    response = send()
    return response, (_rss_kb("VmHWM") - before) / 1024


def test_a_50_mb_json_body_is_refused_unread(server: LiveServer) -> None:
    url = f"{server.url}/v1/models"
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=120) as http:
        size, body = _json_body(50 * MB)
        declared, declared_mb = _peak_growth_mb(
            lambda: http.post(url, content=body, headers={**headers, "Content-Length": str(size)})
        )
        _size, body = _json_body(50 * MB)
        chunked, chunked_mb = _peak_growth_mb(lambda: http.post(url, content=body, headers=headers))
    for answer in (declared, chunked):
        assert answer.status_code == 413, answer.text[:300]
        assert "MODELTAILOR_MAX_JSON_BODY_BYTES" in answer.json()["detail"]
        assert answer.headers["x-content-type-options"] == "nosniff"
    # The body was 50 MB; reading it as JSON used to cost about 3.5 times that.
    print(
        f"\nRSS growth for a 50 MB body: {declared_mb:.1f} MB (Content-Length), {chunked_mb:.1f} MB (chunked)"
    )
    assert declared_mb < 10 and chunked_mb < 10, (declared_mb, chunked_mb)


def test_bodies_over_the_limit_are_413_except_uploads(server: LiveServer) -> None:
    limit = server.settings.max_json_body_bytes
    with _client(server, server.key) as a:
        job = {
            "model_id": 1,
            "dataset_id": 1,
            "device_id": 1,
            "algorithm": "random",
            "space": {"x": "y" * limit},
        }
        assert a.post("/jobs", json=job).status_code == 413
        fake_form = {"Content-Type": "multipart/form-data; boundary=x"}
        assert (
            a.post("/jobs", content=b"x" * (limit + 1), headers=fake_form).status_code == 413
        )  # not an upload route
        upload = a.post("/models", files={"file": ("big.pt2", b"\0" * (limit + MB))}, data={"name": "big"})
        assert upload.status_code != 413 or "MAX_JSON_BODY" not in upload.text  # uploads have their own limit
        assert a.post("/datasets", json={"builtin": "digits"}).status_code == 201  # small bodies pass


NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400")
# A device agent's timing record (``latency_models.harness.Measurement``), every field valid.
MEASUREMENT = {
    "model_sha256": "0" * 64, "input_shape": [1, 1, 8, 8], "device": "", "runtime": "onnxruntime",
    "runtime_version": "1.0", "threads": 1, "settings": {}, "runs": 7, "warmup": 1, "median_ms": 1.5,
    "mean_ms": 1.6, "min_ms": 1.4, "p10_ms": 1.45, "p90_ms": 1.7, "iqr_ms": 0.1, "reference_sha256": "r",
    "reference_median_ms": 3.0, "ratio_to_reference": 0.5, "attempts": 1, "noisy": False,
    "timestamp": "2025-01-01T00:00:00+00:00",
}  # fmt: skip


def _post_raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    return http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def test_nan_and_infinity_are_422_in_every_body(server: LiveServer) -> None:
    with _client(server, server.key) as a:
        board = a.post("/devices", json={"name": "board-n", "kind": "remote"}).json()
        data = a.post("/datasets", json={"builtin": "digits"}).json()
        dev = f"/devices/{board['id']}"
        task = device_tasks.task_id(1)
        ok = {**MEASUREMENT, "device": "board-n"}
        result = f'"task_id": "{task}", "device": "board-n"'
        for literal in NON_FINITE:
            measurement = json.dumps(ok)[:-1] + f', "ratio_to_reference": {literal}}}'
            bodies = [
                ("/devices", f'{{"name": "n1", "kind": "remote", "settings": {{"x": {literal}}}}}'),
                (f"{dev}/calibrate", f'{{"samples": 8, "seed": {literal}}}'),
                (f"{dev}/measurements", f'{{{result}, "status": "ok", "measurement": {measurement}}}'),
                (f"{dev}/measurements", f'{{{result}, "status": "error", "speedup": {literal}}}'),
                (f"{dev}/measurements", f'{{{result}, "status": "error", "agent": {{"t": [{literal}]}}}}'),
                ("/candidates/1/export", f'{{"finetune_epochs": {literal}}}'),
                ("/models", f'{{"zoo": "lenet5", "dataset_id": {data["id"]}, "name": {literal}}}'),
                ("/datasets", f'{{"builtin": "digits", "name": "d", "extra": {literal}}}'),
            ]
            for path, text in bodies:
                answer = _post_raw(a, path, text)
                assert answer.status_code == 422, (path, text, answer.status_code, answer.text[:300])
                assert answer.json()["detail"].startswith("invalid request"), answer.text[:300]
        named = _post_raw(a, "/devices", '{"name": "n2", "kind": "remote", "settings": {"level": NaN}}')
        assert "settings.level: NaN and Infinity are not numbers" in named.json()["detail"]
        negative = {
            "task_id": task,
            "device": "board-n",
            "status": "ok",
            "measurement": {**ok, "ratio_to_reference": -1},
        }
        refused = a.post(f"{dev}/measurements", json=negative)
        assert refused.status_code == 422 and "ratio_to_reference" in refused.json()["detail"]


def test_devices_that_cannot_run_are_refused(server: LiveServer) -> None:
    with _client(server, server.key) as a:
        evil = a.post("/devices", json={"name": "e1", "settings": {"graph_optimization_level": "evil"}})
        assert evil.status_code == 422 and "graph_optimization_level" in evil.json()["detail"]
        crowded = a.post("/devices", json={"name": "e2", "kind": "local", "threads": 256})
        assert crowded.status_code == 422 and "CPU cores" in crowded.json()["detail"]
        torch = a.post("/devices", json={"name": "e3", "runtime": "torch", "settings": {"x": "1"}})
        assert torch.status_code == 422 and "takes no settings" in torch.json()["detail"]
        nested = a.post("/devices", json={"name": "e4", "settings": {"x": {"y": 1}}})
        assert nested.status_code == 422
        board = a.post("/devices", json={"name": "e5", "kind": "remote", "threads": 256,
                                         "settings": {"graph_optimization_level": "basic"}})  # fmt: skip
        assert board.status_code == 201, board.text  # a remote board may have many cores


# --- headers --------------------------------------------------------------------------------

SECURITY_HEADERS = ("content-security-policy", "x-frame-options", "x-content-type-options")


def test_every_answer_carries_the_security_headers(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        answers = {
            "page": http.get("/"),
            "script": http.get("/dashboard/static/app.js"),
            "plotly": http.get("/dashboard/static/plotly.min.js"),
            "api": http.get("/v1/devices", headers=auth),
            "401": http.get("/v1/devices"),
            "404": http.get("/dashboard/static/nothing.js"),
            "422": http.post("/v1/devices", json={}, headers=auth),
            "health": http.get("/healthz"),
        }
        for what, answer in answers.items():
            assert all(h in answer.headers for h in SECURITY_HEADERS), (what, dict(answer.headers))
            policy = answer.headers["content-security-policy"]
            assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, what
            assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, what
            assert answer.headers["x-frame-options"] == "DENY", what
            assert answer.headers["x-content-type-options"] == "nosniff", what
        page = answers["page"].text
        assert "<script>" not in page and "style=" not in page  # nothing inline for the policy to refuse
        assert "style=" not in answers["script"].text

        docs = http.get("/docs")
        policy = docs.headers["content-security-policy"]
        (inline,) = re.findall(r"<script>(.*?)</script>", docs.text, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy and "https://cdn.jsdelivr.net" in policy
        assert "script-src 'self' https://cdn.jsdelivr.net 'sha256-" in policy  # no other inline script
        assert docs.headers["x-frame-options"] == "DENY"
        assert http.get("/redoc").headers["content-security-policy"].startswith("default-src 'self'")


def test_the_dashboard_runs_under_its_policy(tmp_path: Path, browser: Any) -> None:
    """Every page in Chromium: drawn, progress bars sized, and not one policy violation."""
    from tests.dashboard.harness import live_server, seed_device_data, seed_job, seed_refs

    with live_server(tmp_path / "dash") as live:
        refs = seed_refs(live.factory, live.tenant_id)
        job = seed_job(live.factory, live.tenant_id, n=60, status="running", refs=refs)
        seed_device_data(live.factory, live.tenant_id, refs[2])
        context = browser.new_context()
        try:
            context.add_init_script(
                f"sessionStorage.setItem('modeltailor.apiKey', {live.key!r});"
                "window.__violations = [];"
                "document.addEventListener('securitypolicyviolation',"
                " (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));"
            )
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            for route in (
                "#/jobs",
                f"#/jobs/{job.job_id}",
                f"#/candidates/{job.candidate_ids[0]}",
                f"#/devices/{refs[2]}",
            ):
                page.goto(f"{live.url}/{route}")
                page.wait_for_selector("body[data-ready='1']", timeout=30_000)
                if route == "#/jobs":
                    width = page.evaluate("() => document.querySelector('.bar > span').style.width")
                    assert width.endswith("%") and float(width[:-1]) > 0, width
                assert page.evaluate("() => window.__violations") == [], route
            assert errors == []
        finally:
            context.close()
