"""What the dashboard tests and ``bench/dashboard.py`` share: a live server, seeded data, a browser.

The search runner is not needed to look at results, so jobs, candidates, measurements
and predictors are written straight through the db models: a realistic ResNet-20-like
policy space with scores that trade accuracy for latency, deterministic by seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from db.models import Candidate, Dataset, Device, Job, JobEvent, Measurement, Model, Predictor, Tenant, utcnow
from engine.job import Scores
from engine.spec import JobSpec
from service import queries
from service.app import create_app
from service.settings import Settings
from tests.live import run_app

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)]
LAYERS = ["conv1", *[f"{blk}.conv{i}" for blk in BLOCKS for i in (1, 2)], "fc"]
SKIPPABLE = [b for b in BLOCKS if not b.endswith(".0") or b == "layer1.0"]
BASELINE = {"accuracy": 0.99, "latency_ms": 4.0, "size_bytes": 1_100_000}
CONSTRAINTS = {"latency_ms": {"max": 2.5}, "accuracy_drop": {"max": 0.08}}


def chromium_path() -> str:
    """Install Chromium if missing (scripts/ensure_chromium.sh) and return its path; raise if impossible."""
    script = REPO / "scripts" / "ensure_chromium.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"Chromium is required and could not be installed:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Live:
    """A running server and a session factory on its database."""

    url: str
    key: str
    tenant_id: int
    factory: sessionmaker[Session]


@contextmanager
def live_server(data_dir: Path, **app_kwargs: Any) -> Iterator[Live]:
    """Serve the app (runner off: tests write results themselves) on a fresh SQLite database."""
    settings = Settings(data_dir=data_dir, run_jobs=False)
    with run_app(create_app(settings, announce=lambda _msg: None, **app_kwargs)) as url:
        engine = make_engine(settings.db_url)
        factory = make_session_factory(engine)
        with factory() as session:
            tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == "local")).one()
        try:
            yield Live(
                url=url,
                key=settings.local_key_path.read_text().strip(),
                tenant_id=tenant_id,
                factory=factory,
            )
        finally:
            engine.dispose()


# --- synthetic results -------------------------------------------------------------------


def make_policy(rng: random.Random) -> dict[str, Any]:
    """A policy in the JSON form of ``compression.policy.Policy``."""
    width = round(rng.uniform(0.25, 1.0), 4)
    default: dict[str, Any] = {"width": width, "scheme": "dense", "sparsity": 0.0, "nm": None, "block": None}
    default["bits"] = rng.choice([None, None, 8, 8, 4])
    layers: dict[str, Any] = {}
    for name in rng.sample(LAYERS, rng.randint(0, 4)):
        scheme = rng.choice(["nm", "unstructured", "block", "dense"])
        spec: dict[str, Any] = {"width": round(rng.uniform(0.25, 1.0), 3), "scheme": scheme}
        if scheme == "nm":
            spec["nm"] = [2, 4]
        elif scheme == "block":
            spec.update(block=4, sparsity=0.5)
        elif scheme == "unstructured":
            spec["sparsity"] = round(rng.uniform(0.3, 0.9), 2)
        layers[name] = spec
    skip = sorted(rng.sample(SKIPPABLE, rng.choice([0, 0, 1, 2])))
    return {"default": default, "layers": layers, "skip": skip, "act_bits": None}


def score_policy(policy: dict[str, Any], rng: random.Random) -> Scores:
    """Plausible scores: narrower, skipped and lower-bit models are faster and less accurate."""
    width = float(policy["default"]["width"])
    skips = len(policy["skip"])
    bits = policy["default"]["bits"]
    latency = (
        BASELINE["latency_ms"] * (0.12 + 0.88 * width**1.7) * (1 - 0.07 * skips) * rng.uniform(0.95, 1.05)
    )
    if bits == 8:
        latency *= 0.85
    accuracy = 0.99 - 0.3 * (1 - width) ** 2.2 - 0.012 * skips - (0.02 if bits == 4 else 0.0)
    accuracy = min(0.995, max(0.1, accuracy - abs(rng.gauss(0, 0.012))))
    size = int(BASELINE["size_bytes"] * width**2 * (bits or 32) / 32 * (1 - 0.05 * skips))
    return Scores(
        accuracy=round(accuracy, 5), latency_ms=round(latency, 5), size_bytes=size, macs=int(4e7 * width**2)
    )


def expected_front(rows: list[tuple[int, float, float, bool]]) -> set[int]:
    """Ids non-dominated in (accuracy max, latency min) among feasible rows (a plain 2-D sweep)."""
    front: set[int] = set()
    best = -math.inf
    for cid, acc, _lat, feasible in sorted(rows, key=lambda r: (r[2], -r[1])):
        if feasible and acc > best:
            front.add(cid)
            best = acc
    return front


def expected_fold(
    rows: list[tuple[int, float, float, bool]], front: set[int], n_val: int = 1000
) -> dict[int, list[int]]:
    """The accuracy / latency front folded as documented (plain loops, not the service's code):
    in front order (accuracy best first, then latency, then id) each point joins the first
    representative within one validation image and 1 % latency, else it becomes one."""
    points = sorted((r for r in rows if r[0] in front), key=lambda r: (-r[1], r[2], r[0]))
    reps: list[tuple[tuple[int, float, float, bool], list[int]]] = []
    for row in points:
        for rep, members in reps:
            same_accuracy = abs(row[1] - rep[1]) <= 1 / n_val + 1e-12
            same_latency = abs(row[2] - rep[2]) <= 0.01 * max(row[2], rep[2])
            if same_accuracy and same_latency:
                members.append(row[0])
                break
        else:
            reps.append((row, []))
    return {rep[0]: members for rep, members in reps}


@dataclass
class SeededJob:
    job_id: int
    candidate_ids: list[int]
    rows: list[tuple[int, float, float, bool]]  # id, accuracy, latency, feasible

    @property
    def front(self) -> set[int]:
        return expected_front(self.rows)

    @property
    def folded_front(self) -> dict[int, list[int]]:
        """Representative id -> ids folded under it (the harness's data sets hold 1000+ validation images)."""
        return expected_fold(self.rows, self.front)


def seed_refs(factory: sessionmaker[Session], tenant_id: int) -> tuple[int, int, int]:
    """A data set, a ResNet-20-like model and the built-in 1-thread CPU device: (model, dataset, device)."""
    with factory() as session:
        dataset = Dataset(
            tenant_id=tenant_id, name="mnist", builtin="mnist", shapes={"x_train": [60000, 1, 28, 28]}
        )
        session.add(dataset)
        session.flush()
        layers = [
            {"name": n, "macs": 1_000_000 + 50_000 * i, "params": 2_000 + 100 * i}
            for i, n in enumerate(LAYERS)
        ]
        model = Model(
            tenant_id=tenant_id,
            name="resnet20-mnist",
            source="zoo",
            zoo="resnet20",
            dataset_id=dataset.id,
            layers=layers,
            params=270_000,
            macs=40_000_000,
            size_bytes=BASELINE["size_bytes"],
        )
        session.add(model)
        device_id = session.scalars(select(Device.id).where(Device.name == "cpu-ort-1t")).one()
        session.commit()
        return model.id, dataset.id, device_id


def seed_job(
    factory: sessionmaker[Session],
    tenant_id: int,
    *,
    n: int,
    status: str = "succeeded",
    algorithm: str = "optuna-nsga2",
    seed: int = 0,
    refs: tuple[int, int, int] | None = None,
) -> SeededJob:
    """A job of ``status`` with ``n`` candidates (bulk-inserted)."""
    model_id, dataset_id, device_id = refs or seed_refs(factory, tenant_id)
    spec = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "device_id": device_id,
        "algorithm": algorithm,
        "space": {},
        "objectives": [
            {"metric": "accuracy", "direction": "max"},
            {"metric": "latency_ms", "direction": "min"},
        ],
        "constraints": CONSTRAINTS,
        "budget": {"candidates": max(n, 1), "seconds": 900},
        "seed": seed,
        "remeasure_top_k": 0,
    }
    with factory() as session:
        job = Job(
            tenant_id=tenant_id,
            model_id=model_id,
            dataset_id=dataset_id,
            device_id=device_id,
            algorithm=algorithm,
            spec=spec,
            status=status,
            baseline=dict(BASELINE),
            progress={
                "phase": "searching" if status == "running" else status,
                "done": n,
                "total": max(n, 1),
                "eta_s": 42.0 if status == "running" else None,
            },
        )
        session.add(job)
        session.flush()
        job_id = job.id
        session.add(JobEvent(job_id=job_id, kind="status", data={"status": status}))
        session.commit()
    added = add_candidates(factory, job_id, n=n, seed=seed)
    return SeededJob(job_id, [r[0] for r in added], added)


def add_candidates(
    factory: sessionmaker[Session], job_id: int, *, n: int, seed: int, boost: float = 0.0
) -> list[tuple[int, float, float, bool]]:
    """Append ``n`` scored candidates to a job; ``boost`` makes them more accurate (a better front)."""
    rng = random.Random(seed)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        start = queries.count_candidates(session, job_id=job_id)
        spec, baseline = JobSpec.model_validate(job.spec), job.baseline
        values = []
        for i in range(n):
            policy = make_policy(rng)
            scores = score_policy(policy, rng)
            if boost:
                scores = dataclasses.replace(scores, accuracy=min(0.999, (scores.accuracy or 0) + boost))
            values.append(
                {
                    "job_id": job_id,
                    "index": start + i,
                    "policy": policy,
                    "policy_hash": f"{seed}-{start + i}",
                    "accuracy": scores.accuracy,
                    "latency_ms": scores.latency_ms,
                    "size_bytes": scores.size_bytes,
                    "macs": scores.macs,
                    "predictor_version": 1,
                    "eval_seconds": 1.5,
                    "extra": {},
                    "measured_latency_ms": round((scores.latency_ms or 0) * 1.04, 5) if i % 50 == 0 else None,
                    "feasible": queries.is_feasible(scores, spec=spec, baseline=baseline),
                }
            )
        for chunk in range(0, len(values), 5000):
            session.execute(insert(Candidate), values[chunk : chunk + 5000])
        session.commit()
        rows = session.execute(
            select(Candidate.id, Candidate.accuracy, Candidate.latency_ms, Candidate.feasible)
            .where(Candidate.job_id == job_id, Candidate.index >= start)
            .order_by(Candidate.index)
        ).all()
        return [(int(r[0]), float(r[1] or 0.0), float(r[2] or 0.0), bool(r[3])) for r in rows]


def seed_device_data(
    factory: sessionmaker[Session], tenant_id: int, device_id: int, *, n: int = 80
) -> dict[str, Any]:
    """Calibration measurements and one predictor version with held-out pairs; returns its metrics."""
    rng = random.Random(7)
    with factory() as session:
        for i in range(n):
            macs = rng.uniform(2e6, 4e7)
            status = "failed" if i == n - 1 else "done"
            session.add(
                Measurement(
                    device_id=device_id,
                    tenant_id=tenant_id,
                    status=status,
                    purpose="calibration",
                    features={"macs": int(macs), "params": int(macs / 150)},
                    latency_ms=None
                    if status == "failed"
                    else round(0.2 + macs / 1e7 * rng.uniform(0.9, 1.1), 4),
                    error="onnxruntime: invalid graph" if status == "failed" else None,
                    measured_at=utcnow(),
                )
            )
        measured = [round(rng.uniform(0.3, 4.0), 4) for _ in range(60)]
        predicted = [round(m * rng.uniform(0.86, 1.12), 4) for m in measured]
        within = sum(abs(p - m) <= 0.1 * m for m, p in zip(measured, predicted, strict=True)) / len(measured)
        metrics = {
            "rmse_ms": 0.18,
            "mape": 0.052,
            "within_5pct": 0.55,
            "within_10pct": round(within, 4),
            "n_train": 200,
            "n_holdout": 60,
            "holdout": {
                "measured_ms": measured,
                "predicted_ms": predicted,
                "names": [f"arch-{i}" for i in range(len(measured))],
            },
        }
        session.add(
            Predictor(
                device_id=device_id,
                version=1,
                kind="kernel-gbt",
                metrics={
                    "rmse_ms": 0.31,
                    "mape": 0.09,
                    "within_5pct": 0.38,
                    "within_10pct": 0.71,
                    "n_train": 100,
                    "n_holdout": 40,
                },
            )
        )
        session.add(Predictor(device_id=device_id, version=2, kind="kernel-gbt", metrics=metrics))
        session.commit()
    return metrics


def add_event(factory: sessionmaker[Session], job_id: int, kind: str, data: dict[str, Any]) -> None:
    with factory() as session:
        session.add(JobEvent(job_id=job_id, kind=kind, data=data))
        session.commit()


def set_status(factory: sessionmaker[Session], job_id: int, status: str) -> None:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
        job.progress = {**job.progress, "phase": status, "eta_s": None}
        session.add(JobEvent(job_id=job_id, kind="status", data={"status": status}))
        session.commit()


def launch_browser(playwright: Any) -> Any:
    """Headless Debian Chromium under Playwright (its own browser download is not possible here)."""
    return playwright.chromium.launch(
        executable_path=os.environ.get("MODELTAILOR_CHROMIUM") or chromium_path(),
        headless=True,
        args=CHROMIUM_FLAGS,
    )
