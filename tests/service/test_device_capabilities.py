"""What a device accelerates, end to end on a real server with real ONNX Runtime timings.

A job on an uncalibrated device calibrates it; that calibration also measures the channel
multiple the kernels reward and which schemes run faster than dense, and stores them with the
predictor version (REST: the predictor's and the calibration's ``metrics.capabilities``). A
later job with the default space searches with the device's ``round_to`` and without the
size-only schemes, saying why in its progress; a job that sets them keeps its own choices,
marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modeltailor.client import Client, Job
from tests.service.conftest import LiveServer

MULTIPLES = {1, 2, 4, 8, 16, 32}


def _finish(job: Job) -> dict[str, Any]:
    job.wait(timeout=600, poll_s=0.2, progress=False)
    info = job.status()
    assert info["status"] == "succeeded", info.get("error")
    return info


def _schemes_used(job: Job) -> set[str]:
    used: set[str] = set()
    for c in job.candidates():
        policy = c["policy"]
        used.add(str((policy.get("default") or {}).get("scheme", "dense")))
        used |= {str(lp.get("scheme", "dense")) for lp in (policy.get("layers") or {}).values()}
    return used


@pytest.mark.slow  # a calibration and three short jobs: about a minute on 2 idle cores
def test_calibration_stores_capabilities_and_later_jobs_search_with_them(
    real_live: LiveServer, tiny_pt2: Path
) -> None:
    client = Client(real_live.url, real_live.key)
    data = client.builtin_dataset("digits")
    model = client.upload_model(tiny_pt2, name="tiny")
    common: dict[str, Any] = {"algorithm": "random", "remeasure_top_k": 0, "seed": 1}
    first = client.submit_job(
        model["id"], data["id"], "cpu-ort-1t", budget={"candidates": 2}, calibration_samples=8, **common
    )
    _finish(first)

    pred = client.predictor("cpu-ort-1t")
    assert pred is not None
    caps = pred["metrics"]["capabilities"]
    assert caps["round_to"] in MULTIPLES
    assert str(caps["round_to"]) in caps["channel_efficiency"]
    from compression.schemes import names

    # every registered fine-grained scheme is probed, and int8
    assert set(caps["measured_schemes"]) == (set(names()) - {"dense"}) | {"int8"}
    assert set(caps["size_only"]) == set(caps["measured_schemes"]) - set(caps["accelerated_schemes"])
    assert all(caps["reasons"][s] for s in caps["measured_schemes"])
    [cal] = client.calibrations("cpu-ort-1t")
    assert cal["metrics"]["capabilities"] == caps

    # A later job with the default space (latency is an objective): the device decides.
    later = client.submit_job(model["id"], data["id"], "cpu-ort-1t", budget={"candidates": 4}, **common)
    space = _finish(later)["progress"]["space"]
    assert space["round_to"] == caps["round_to"] and space["round_to_source"] == "device"
    slow = set(caps["size_only"])
    assert set(space["left_out"]) == slow
    assert all(space["left_out"][s] == caps["reasons"][s] for s in slow)
    assert not slow & set(space["schemes"]) and not slow & _schemes_used(later)
    assert (8 in space["bits"]) == ("int8" not in slow)
    if slow:
        assert "size-only" in space["note"]
    assert len(client.calibrations("cpu-ort-1t")) == 1  # no second calibration

    # The user's choices win; a listed size-only scheme stays, marked.
    mine = client.submit_job(
        model["id"],
        data["id"],
        "cpu-ort-1t",
        budget={"candidates": 2},
        space={"round_to": 1, "schemes": ["unstructured"]},
        **common,
    )
    own = _finish(mine)["progress"]["space"]
    assert own["round_to"] == 1 and own["round_to_source"] == "space"
    assert "unstructured" in own["schemes"] and not own["left_out"]
    assert ("unstructured" in own["size_only"]) == ("unstructured" in slow)
