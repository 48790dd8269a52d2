"""The Python SDK: a thin, typed wrapper over the REST API.

    from modeltailor.client import Client
    client = Client("http://127.0.0.1:8000")          # key from MODELTAILOR_API_KEY or the local key file
    model = client.upload_model("net.pt2")
    data = client.builtin_dataset("mnist")
    job = client.submit_job(model["id"], data["id"], "cpu-ort-1t", budget={"candidates": 50})
    job.wait()
    best = job.pareto()[0]
    best.export("net.onnx")

Every non-2xx answer raises an :class:`ApiError` subclass carrying the HTTP status and
the server's message.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The server refused a call; ``status`` is the HTTP status, ``message`` its reason."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class AuthError(ApiError):
    """401: missing, invalid or revoked API key."""


class NotFoundError(ApiError):
    """404: no such object for this tenant."""


class ConflictError(ApiError):
    """409: the object exists already or is not in the right state."""


class ValidationError(ApiError):
    """400 / 413 / 415 / 422: the request or the uploaded file is not acceptable."""


class ServerError(ApiError):
    """5xx: the server failed; the message says how."""


class JobFailed(ApiError):
    """``Job.wait()`` ended in ``failed`` (status is the HTTP 200 of the poll)."""


class CalibrationFailed(ApiError):
    """A calibration waited for ended ``failed`` or ``cancelled``; ``body`` is the calibration."""


def _error_for(status: int) -> type[ApiError]:
    if status == 401:
        return AuthError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status in (400, 411, 413, 415, 422):
        return ValidationError
    if status >= 500:
        return ServerError
    return ApiError


def default_api_key() -> str | None:
    """``MODELTAILOR_API_KEY``, else the key the embedded server saved in the data directory."""
    if key := os.environ.get("MODELTAILOR_API_KEY"):
        return key
    data_dir = Path(os.environ.get("MODELTAILOR_DATA_DIR", Path.home() / ".modeltailor"))
    path = data_dir / "local_api_key"
    return path.read_text().strip() if path.is_file() else None


class Client:
    """A connection to one modeltailor server with one tenant's API key."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get("MODELTAILOR_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or default_api_key()
        if not key:
            raise AuthError(
                401, "no API key: pass api_key=, set MODELTAILOR_API_KEY, or start the local server once"
            )
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call ``/v1{path}``; return the decoded JSON; raise ApiError on a non-2xx status."""
        response = self._http.request(method, f"/v1{path}", **kwargs)
        return self._decode(response)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        if response.is_success:
            ctype = response.headers.get("content-type", "")
            return response.json() if ctype.startswith("application/json") else response.content
        try:
            body = response.json()
            message = body.get("detail", response.text) if isinstance(body, dict) else response.text
        except ValueError:
            body, message = None, response.text or response.reason_phrase
        if not isinstance(message, str):
            message = json.dumps(message)
        raise _error_for(response.status_code)(response.status_code, message, body)

    def _upload(self, path: str, file: str | Path, name: str | None) -> dict[str, Any]:
        p = Path(file)
        with p.open("rb") as fh:
            data = {"name": name} if name else {}
            result: dict[str, Any] = self.request("POST", path, files={"file": (p.name, fh)}, data=data)
        return result

    # --- resources ------------------------------------------------------------------

    def upload_model(self, file: str | Path, name: str | None = None) -> dict[str, Any]:
        """Upload a ``torch.export.save`` archive (.pt2)."""
        return self._upload("/models", file, name)

    def zoo_model(self, zoo: str, dataset_id: int, name: str | None = None) -> dict[str, Any]:
        """Request a built-in architecture trained on ``dataset_id`` (trained on first use)."""
        return dict(
            self.request("POST", "/models", json={"zoo": zoo, "dataset_id": dataset_id, "name": name})
        )

    def models(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/models")["data"])

    def upload_dataset(self, file: str | Path, name: str | None = None) -> dict[str, Any]:
        """Upload an .npz with x_train, y_train, x_val, y_val."""
        return self._upload("/datasets", file, name)

    def builtin_dataset(self, builtin: str, name: str | None = None) -> dict[str, Any]:
        """Register a built-in data set ("mnist" or "digits")."""
        return dict(self.request("POST", "/datasets", json={"builtin": builtin, "name": name}))

    def datasets(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/datasets")["data"])

    def devices(self) -> list[dict[str, Any]]:
        """Your devices and the built-in local ones."""
        return list(self.request("GET", "/devices")["data"])

    def device(self, name_or_id: str | int) -> dict[str, Any]:
        """A device by id or by name."""
        if isinstance(name_or_id, int):
            return dict(self.request("GET", f"/devices/{name_or_id}"))
        for device in self.devices():
            if device["name"] == name_or_id:
                return device
        raise NotFoundError(404, f"device {name_or_id!r} not found")

    def create_device(
        self, name: str, runtime: str = "onnxruntime", threads: int = 1, kind: str = "remote", **settings: Any
    ) -> dict[str, Any]:
        body = {"name": name, "runtime": runtime, "threads": threads, "kind": kind, "settings": settings}
        return dict(self.request("POST", "/devices", json=body))

    def calibrate(
        self,
        device: str | int,
        samples: int = 200,
        *,
        model_id: int | None = None,
        seed: int = 0,
        runs: int = 100,
        wait: bool = False,
        timeout: float | None = None,
        poll_s: float = 1.0,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Start a calibration of ``device`` (measure ``samples`` models, fit a new predictor).

        ``model_id`` focuses the samples on one of your models. Returns the calibration
        (``id``, ``status``, ``progress``); with ``wait=True`` blocks until it ends, showing
        a progress bar, and returns it finished (``predictor_version``, ``metrics``).

        Raises:
            ConflictError: the device is being calibrated already.
            CalibrationFailed: ``wait=True`` and the calibration failed.
        """
        device_id = self.device(device)["id"]
        body: dict[str, Any] = {"samples": samples, "seed": seed, "runs": runs}
        if model_id is not None:
            body["model_id"] = model_id
        cal = dict(self.request("POST", f"/devices/{device_id}/calibrate", json=body))
        return (
            self.wait_calibration(cal["id"], timeout=timeout, poll_s=poll_s, progress=progress)
            if wait
            else cal
        )

    def calibration(self, calibration_id: int) -> dict[str, Any]:
        """One calibration: status, progress, and the predictor version it made."""
        return dict(self.request("GET", f"/calibrations/{calibration_id}"))

    def calibrations(self, device: str | int) -> list[dict[str, Any]]:
        """Your calibrations of a device, newest first."""
        device_id = self.device(device)["id"]
        return list(self.request("GET", f"/devices/{device_id}/calibrations")["data"])

    def wait_calibration(
        self, calibration_id: int, *, timeout: float | None = None, poll_s: float = 1.0, progress: bool = True
    ) -> dict[str, Any]:
        """Block until a calibration ends; raise CalibrationFailed unless it succeeded."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        deadline = None if timeout is None else time.monotonic() + timeout
        with Progress(
            TextColumn("calibration {task.fields[cal]} {task.fields[message]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task("calibration", total=None, cal=calibration_id, message="queued")
            while True:
                cal = self.calibration(calibration_id)
                prog = cal.get("progress") or {}
                bar.update(
                    task,
                    completed=prog.get("done", 0),
                    total=prog.get("total") or None,
                    message=str(prog.get("message", cal["status"]))[:40],
                )
                if cal["status"] not in ("queued", "running"):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"calibration {calibration_id} still {cal['status']} after {timeout} s"
                    )
                time.sleep(poll_s)
        if cal["status"] != "succeeded":
            raise CalibrationFailed(
                200, f"calibration {calibration_id} {cal['status']}: {cal.get('error')}", cal
            )
        return cal

    def predictor(self, device: str | int, version: int | None = None) -> dict[str, Any] | None:
        """The device's current predictor (or ``version``) with its held-out metrics; None if it has none."""
        device_id = self.device(device)["id"]
        params = {"version": version} if version is not None else None
        try:
            return dict(self.request("GET", f"/devices/{device_id}/predictor", params=params))
        except NotFoundError:
            return None  # the device exists (looked up above): it has no predictor (version) yet

    def predictors(self, device: str | int) -> list[dict[str, Any]]:
        """Every predictor version of a device, oldest first."""
        device_id = self.device(device)["id"]
        return list(self.request("GET", "/predictors", params={"device_id": device_id})["data"])

    def measurements(self, device: str | int, limit: int = 2000) -> list[dict[str, Any]]:
        """Latency measurements on a device (calibration, dense, candidate), newest first."""
        device_id = self.device(device)["id"]
        return list(
            self.request("GET", f"/devices/{device_id}/measurements", params={"limit": limit})["data"]
        )

    def submit_job(
        self,
        model_id: int,
        dataset_id: int,
        device: str | int,
        *,
        algorithm: str = "rule",
        **spec: Any,
    ) -> Job:
        """Queue a search; ``spec`` takes the other fields of the job contract (space, budget, ...).

        ``finetune={"top_k": 5, "epochs": 2.0}`` (the default) fine-tunes the top-k front points
        by distillation after the search and re-scores them; ``finetune={"top_k": 0}`` skips it.
        ``family={"budgets": [1.0, 0.7, 0.5], "finetune_epochs": 0}`` (with the ``rule``
        algorithm) searches K nested operating points instead of a front: see :meth:`family`
        and :meth:`export_family`.
        """
        device_id = device if isinstance(device, int) else self.device(device)["id"]
        body = {
            "model_id": model_id,
            "dataset_id": dataset_id,
            "device_id": device_id,
            "algorithm": algorithm,
        }
        body.update({k: v for k, v in spec.items() if v is not None})
        answer = self.request("POST", "/jobs", json=body)
        return Job(self, int(answer["id"]))

    def job(self, job_id: int) -> Job:
        return Job(self, job_id)

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/jobs")["data"])

    def compare(
        self,
        jobs: list[int],
        *,
        max_latency_ms: float | None = None,
        min_accuracy: float | None = None,
        max_accuracy_drop: float | None = None,
    ) -> dict[str, Any]:
        """Jobs side by side (``GET /v1/compare``): each one's accuracy / latency front, its
        hypervolume as candidates arrived, and its best point under the one bound given."""
        bounds = {
            "max_latency_ms": max_latency_ms,
            "min_accuracy": min_accuracy,
            "max_accuracy_drop": max_accuracy_drop,
        }
        params = {
            "jobs": ",".join(str(int(j)) for j in jobs),
            **{k: v for k, v in bounds.items() if v is not None},
        }
        return dict(self.request("GET", "/compare", params=params))

    def sensitivity(self, job_id: int) -> dict[str, Any]:
        """Per-layer sensitivity where the rule agent measured it (``GET /v1/jobs/{id}/sensitivity``):
        each single move from its anchor with the accuracy it cost and the latency it saved,
        cheapest first; other agents' jobs answer with no moves and a note."""
        return dict(self.request("GET", f"/jobs/{job_id}/sensitivity"))

    def family(self, job_id: int) -> dict[str, Any]:
        """A family job's points in budget order (``GET /v1/jobs/{id}/family``): each one's budget,
        candidate, accuracy, predicted and measured latency, and its bundle figures once exported."""
        return dict(self.request("GET", f"/jobs/{job_id}/family"))

    def export_family(
        self,
        job_id: int,
        out: str | Path | None = None,
        *,
        wait: bool = True,
        runs: int = 200,
        timeout: float = 3600.0,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Export a succeeded family job's bundle (``POST /v1/jobs/{id}/family-export``).

        With ``wait`` (the default), waits until it is built, unpacks it into the folder ``out``
        (default ``family-<job id>``: ``weights.bin``, one ``point_<k>.onnx`` per point,
        ``family.json``; ``modeltailor.switch.FamilySwitch(out)`` runs it) and returns its
        manifest (``family.json``). Without, returns ``{"artifact_id", "status"}`` at once.

        Raises:
            ConflictError: not a family job, not succeeded, or an export of it is running.
            ApiError: the export failed (the message says why).
        """
        import io
        import zipfile

        accepted = dict(self.request("POST", f"/jobs/{job_id}/family-export", json={"runs": runs}))
        if not wait:
            return accepted
        artifact_id = int(accepted["artifact_id"])
        deadline = time.monotonic() + timeout
        while True:
            meta = self.artifact(artifact_id)
            if meta["status"] == "ready":
                break
            if meta["status"] == "failed":
                raise ApiError(200, f"family export failed: {meta.get('error')}", meta)
            if time.monotonic() > deadline:
                raise TimeoutError(f"artifact {artifact_id} not ready after {timeout} s")
            time.sleep(poll_s)
        content = self.request("GET", f"/artifacts/{artifact_id}/download")
        folder = Path(out) if out is not None else Path(f"family-{job_id}")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            zf.extractall(folder)  # member names are sanitised (no absolute paths, no "..")
        return dict(json.loads((folder / "family.json").read_text()))

    def candidate(self, candidate_id: int) -> Candidate:
        return Candidate(self, self.request("GET", f"/candidates/{candidate_id}"))

    def artifact(self, artifact_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/artifacts/{artifact_id}"))


@dataclass
class Candidate:
    """One evaluated policy with its scores (``data`` is the server's JSON)."""

    client: Client = field(repr=False)
    data: dict[str, Any]

    @property
    def id(self) -> int:
        return int(self.data["id"])

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def export(
        self,
        path: str | Path,
        *,
        int8: bool = False,
        finetune_epochs: int = 0,
        timeout: float = 3600.0,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Export to ONNX, wait until ready, download to ``path``; return the artifact metadata.

        A candidate the job fine-tuned is exported fine-tuned; ``finetune_epochs`` asks for at least
        that many epochs of distillation (from the dense model) first.
        """
        body = {"format": "onnx", "int8": int8, "finetune_epochs": finetune_epochs}
        accepted = self.client.request("POST", f"/candidates/{self.id}/export", json=body)
        artifact_id = int(accepted["artifact_id"])
        deadline = time.monotonic() + timeout
        while True:
            meta = self.client.artifact(artifact_id)
            if meta["status"] == "ready":
                break
            if meta["status"] == "failed":
                raise ApiError(200, f"export failed: {meta.get('error')}", meta)
            if time.monotonic() > deadline:
                raise TimeoutError(f"artifact {artifact_id} not ready after {timeout} s")
            time.sleep(poll_s)
        content = self.client.request("GET", f"/artifacts/{artifact_id}/download")
        Path(path).write_bytes(content)
        return meta


@dataclass
class Job:
    """A submitted search job."""

    client: Client = field(repr=False)
    id: int

    def status(self) -> dict[str, Any]:
        """The job as the server sees it now (status, progress, best, error)."""
        return dict(self.client.request("GET", f"/jobs/{self.id}"))

    def cancel(self) -> dict[str, Any]:
        return dict(self.client.request("POST", f"/jobs/{self.id}/cancel"))

    def candidates(self, limit: int | None = None, offset: int = 0) -> list[Candidate]:
        """Evaluated candidates in evaluation order: all of them, or ``limit`` from ``offset``.

        Pages through the REST listing (1000 per request), so a long seconds-budget job
        returns every candidate, not the first page.
        """
        page = 1000
        out: list[Candidate] = []
        while limit is None or len(out) < limit:
            want = page if limit is None else min(page, limit - len(out))
            rows = self.client.request(
                "GET", f"/jobs/{self.id}/candidates", params={"limit": want, "offset": offset + len(out)}
            )
            out.extend(Candidate(self.client, r) for r in rows["data"])
            if len(rows["data"]) < want:
                break
        return out

    def pareto(self, *, fold: bool = False) -> list[Candidate]:
        """The non-dominated feasible candidates, best first. Points equal within measurement
        resolution carry ``duplicates`` / ``duplicate_of``; ``fold=True`` keeps one of each."""
        rows = self.client.request("GET", f"/jobs/{self.id}/pareto", params={"fold": str(fold).lower()})
        return [Candidate(self.client, r) for r in rows["data"]]

    def sensitivity(self) -> dict[str, Any]:
        """This job's measured single moves (:meth:`Client.sensitivity`)."""
        return self.client.sensitivity(self.id)

    def family(self) -> dict[str, Any]:
        """This job's family points (:meth:`Client.family`)."""
        return self.client.family(self.id)

    def export_family(self, out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
        """Export this family job's bundle into ``out`` (:meth:`Client.export_family`)."""
        return self.client.export_family(self.id, out, **kwargs)

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-sent events as (kind, data) until the job ends."""
        with self.client._http.stream("GET", f"/v1/jobs/{self.id}/events", timeout=None) as response:
            if not response.is_success:
                response.read()
                Client._decode(response)
            kind, data = "message", ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "":
                    if data:
                        yield kind, json.loads(data)
                        if kind == "end":
                            return
                    kind, data = "message", ""

    def wait(
        self, *, timeout: float | None = None, poll_s: float = 1.0, progress: bool = True
    ) -> dict[str, Any]:
        """Block until the job ends, showing a progress bar; raise JobFailed if it failed."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        deadline = None if timeout is None else time.monotonic() + timeout
        with Progress(
            TextColumn("job {task.fields[job]} {task.fields[status]}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total}"),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task("job", total=None, job=self.id, status="queued")
            while True:
                info = self.status()
                prog = info.get("progress") or {}
                phase = str(prog.get("phase") or "")
                # a job first loads, scores the dense model and may calibrate the device: say so
                shown = (
                    info["status"]
                    if phase in ("", "searching", info["status"])
                    else f"{info['status']}: {phase}"
                )
                bar.update(task, completed=prog.get("done", 0), total=prog.get("total"), status=shown[:60])
                if info["status"] in TERMINAL:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {info['status']} after {timeout} s")
                time.sleep(poll_s)
        if info["status"] == "failed":
            raise JobFailed(200, f"job {self.id} failed: {info.get('error')}", info)
        return info
