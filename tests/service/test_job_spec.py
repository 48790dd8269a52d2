"""A job is one typed ``JobSpec`` from the request to the engine: what validates runs, the rest is a 422.

The real-server test runs the README's SDK example (an accuracy-drop constraint) on a small
real model, a job whose constraint nothing can meet, and a seconds-only budget.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, serve
from pydantic import ValidationError

from db.testing import fresh_database
from engine.spec import Algorithm, JobSpec, SpaceSpec
from modeltailor.client import Client
from service.settings import Settings

BASE: dict[str, Any] = {"model_id": 1, "dataset_id": 1, "device_id": 1, "algorithm": "random"}
# Each is refused before anything is stored: the engine could not honour it.
BAD: dict[str, dict[str, Any]] = {
    "min bound": {"constraints": {"accuracy": {"min": 0.9}}},
    "min beside max": {"constraints": {"accuracy_drop": {"min": None, "max": 0.01}}},
    "unknown metric": {"constraints": {"energy_mj": {"max": 1.0}}},
    "macs bound (not enforced by the search)": {"constraints": {"macs": {"max": 1e6}}},
    "empty bound": {"constraints": {"latency_ms": {}}},
    "negative latency": {"constraints": {"latency_ms": {"max": -1.0}}},
    "accuracy drop over 1": {"constraints": {"accuracy_drop": {"max": 2.0}}},
    "N >= M and zeros": {"space": {"nm_choices": [[5, 4], [0, 0]]}},
    "block of 0": {"space": {"block_choices": [0]}},
    "block of 128": {"space": {"block_choices": [128]}},
    "bits 16": {"space": {"bits": [16]}},
    "a million bits": {"space": {"bits": [8] * 10**6}},
    "round_to true": {"space": {"round_to": True}},
    "round_to 1000": {"space": {"round_to": 1000}},
    "min_width 0": {"space": {"min_width": 0}},
    "unknown space key": {"space": {"colour": "blue"}},
    "no budget": {"budget": {"candidates": None, "seconds": None}},
    "minimised accuracy": {"objectives": [{"metric": "accuracy", "direction": "min"}]},
    "repeated objective": {"objectives": [{"metric": "macs", "direction": "min"}] * 2},
}
NON_FINITE = {
    "NaN bound": '"constraints": {"latency_ms": {"max": NaN}}',
    "infinite seconds": '"budget": {"candidates": null, "seconds": Infinity}',
    "NaN width": '"space": {"min_width": NaN}',
}


def _raw(fields: str) -> str:
    return json.dumps(BASE)[:-1] + ", " + fields + "}"


@pytest.mark.parametrize("name", list(BAD))
def test_the_spec_refuses_what_the_engine_cannot_honour(name: str) -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**BASE, **BAD[name]})


@pytest.mark.parametrize("name", list(NON_FINITE))
def test_the_spec_refuses_non_finite_numbers(name: str) -> None:
    with pytest.raises(ValidationError, match="finite"):
        JobSpec.model_validate(json.loads(_raw(NON_FINITE[name])))


def test_a_spec_becomes_the_engines_objective_and_space() -> None:
    spec = JobSpec.model_validate(
        {
            **BASE,
            "constraints": {"accuracy_drop": {"max": 0.01}, "latency_ms": {"max": 2}},
            "objectives": [
                {"metric": "accuracy", "direction": "max"},
                {"metric": "size_bytes", "direction": "min"},
            ],
            "space": {
                "schemes": ["channel", "nm", "nm"],
                "bits": [8, None, 8],
                "nm_choices": [[2, 4], [2, 4]],
            },
        }
    )
    objective = spec.objective()
    assert (objective.max_accuracy_drop, objective.max_latency_ms, objective.max_size_bytes) == (
        0.01,
        2.0,
        None,
    )
    assert [(g.metric, g.direction) for g in objective.goals] == [("accuracy", "max"), ("size_bytes", "min")]
    options = spec.space_options()
    assert options.schemes == ("dense", "nm") and options.width  # "channel" turns on width
    assert options.bits == (8, None) and options.nm_choices == ((2, 4),)
    # Stored as JSON and read back into the same type (how the runner and the engine get it).
    assert JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_defaults_match_the_engines_defaults() -> None:
    from compression.space import SpaceOptions

    assert SpaceSpec().space_options() == SpaceOptions()


def test_the_algorithms_are_the_registered_agents() -> None:
    from agents import AGENTS

    assert set(typing.get_args(Algorithm)) == set(AGENTS)


def test_the_examples_are_valid_specs() -> None:
    for example in JobSpec.model_json_schema()["examples"]:
        JobSpec.model_validate(example)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert 'constraints={"accuracy_drop": {"max": 0.01}}, budget={"candidates": 100}' in readme
    JobSpec.model_validate(
        {**BASE, "constraints": {"accuracy_drop": {"max": 0.01}}, "budget": {"candidates": 100}}
    )


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[LiveServer]:
    """A server (no runner) whose body limit lets a huge spec reach validation."""
    with fresh_database("sqlite", tmp_path) as db_url:
        settings = Settings(
            data_dir=tmp_path / "data", database_url=db_url, run_jobs=False, max_json_body_bytes=16 * 2**20
        )
        for url in serve(settings):
            yield LiveServer(
                url=url, key=settings.local_key_path.read_text().strip(), settings=settings, db_url=db_url
            )


def test_the_rest_api_answers_422_for_every_refused_spec(roomy: LiveServer) -> None:
    with httpx.Client(
        base_url=f"{roomy.url}/v1", headers={"Authorization": f"Bearer {roomy.key}"}, timeout=60
    ) as c:
        for name, fields in BAD.items():
            r = c.post("/jobs", json={**BASE, **fields})
            assert r.status_code == 422, (name, r.text[:300])
        for name, fields in NON_FINITE.items():
            r = c.post("/jobs", content=_raw(fields), headers={"content-type": "application/json"})
            assert r.status_code == 422, (name, r.text[:300])
        assert c.get("/jobs").json()["count"] == 0


@pytest.mark.slow
def test_constrained_jobs_run_on_a_real_model(real_live: LiveServer) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.zoo_model("lenet5", data["id"])
    small = {"calibration_samples": 8, "remeasure_top_k": 0, "seed": 1}
    # after the first job (the README's defaults), skip what these jobs are not about
    cheap = {**small, "calibrate": "auto", "active_measurement": {"share": 0.0}, "finetune": {"top_k": 0}}

    # The README's SDK example, on a budget.
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="optuna-tpe",
        constraints={"accuracy_drop": {"max": 0.01}}, budget={"candidates": 6}, **small,
    )  # fmt: skip
    info = job.wait(timeout=900, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    assert info["spec"]["constraints"] == {"accuracy_drop": {"max": 0.01}}
    dense = info["baseline"]["accuracy"]
    front = job.pareto()
    assert front, "the rule sweep TPE starts from keeps some policy within a point of dense"
    for point in front:
        assert point["feasible"] and dense - point["accuracy"] <= 0.01 + 1e-9, point.data
    assert "note" not in info["progress"]

    # A bound nothing meets: the job succeeds, the front is empty and the job says why.
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random",
        constraints={"latency_ms": {"max": 1e-6}}, budget={"candidates": 3}, **cheap,
    )  # fmt: skip
    info = job.wait(timeout=600, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    assert job.pareto() == [] and info["best"] == []
    assert len(job.candidates()) == 3
    assert "no feasible candidate" in info["progress"]["note"], info["progress"]

    # No candidate limit: the seconds budget ends the search.
    job = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", algorithm="random",
        budget={"candidates": None, "seconds": 30}, **cheap,
    )  # fmt: skip
    info = job.wait(timeout=600, poll_s=0.5, progress=False)
    assert info["status"] == "succeeded", info.get("error")
    assert info["spec"]["budget"] == {"candidates": None, "seconds": 30.0}
    progress = info["progress"]
    assert progress["total"] is None and progress["done"] == len(job.candidates()) > 0
    assert progress["elapsed_s"] <= 30 + 15, progress  # the last candidate started before 30 s
