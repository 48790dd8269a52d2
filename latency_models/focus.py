"""Calibration focused on one model: the policies a search of that model will propose.

A general calibration (``latency_models.sampling.sample_plan``) covers many architectures;
a search asks about one model's policies only. A focused plan measures mostly that model's
random policies plus a few random architectures, and :func:`focus_metrics` reports the
predictor's error on held-out policies of the model. Used by the service before a job on a
device without a predictor, and by ``modeltailor calibrate --model``.

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from compression.space import SearchSpace
    from latency_models.predictors import LatencyRecord
    from latency_models.sampling import CalibrationSample

log = logging.getLogger("modeltailor.latency")

#: Share of a focused plan spent on random architectures (keeps the held-out split meaningful).
FOCUSED_RANDOM_FRACTION = 0.25
#: Random architectures of a focused plan are at most this many times the model's MACs...
RANDOM_MACS_FACTOR = 2.0
#: ...or this many MACs, whichever is larger.
RANDOM_MACS_FLOOR = 2e6
#: Random-architecture samples drawn per one wanted (most fall under the cap; this bounds the rest).
MAX_DRAWS_PER_RANDOM = 25


def focused_plan(
    model: CompressibleModel,
    arch_id: str,
    space_id: str,
    n: int,
    *,
    seed: int = 0,
    random_fraction: float = FOCUSED_RANDOM_FRACTION,
) -> Iterator[CalibrationSample]:
    """``n`` samples centred on one model: its random policies plus a few random architectures.

    The model's own policies make the predictor accurate where the job searches; the random
    architectures (``latency_models.sampling``) keep the held-out split meaningful (it groups
    by architecture) and the predictor sane on other models. Interleaved, so a calibration
    stopped midway still has both.
    """
    from compression.policy import Policy
    from compression.space_builder import space_for
    from latency_models.sampling import SPACE_OPTIONS, CalibrationSample, random_policy, sample_plan

    space = space_for(model, SPACE_OPTIONS)
    rng = random.Random(seed)
    n_random = min(n - 1, max(2, round(n * random_fraction))) if n >= 3 else 0
    # Random architectures far larger than the model cost seconds each to export and time and
    # say little about it: keep those up to RANDOM_MACS_FACTOR x its MACs (or a small floor).
    cap = max(RANDOM_MACS_FACTOR * dense_macs(space, Policy.dense()), RANDOM_MACS_FLOOR)
    # The pool is lazy and long: for some seeds the first few architectures are all over the
    # cap, and a plan of the model alone has no held-out architecture (calibration fails).
    pool = (
        sample_plan(n_random * MAX_DRAWS_PER_RANDOM, seed=seed + 1, zoo_fraction=0.0)
        if n_random
        else iter(())
    )
    randoms = (s for s in pool if dense_macs(s.space, Policy.dense()) <= cap)
    for i in range(n):
        if n_random and (i * n_random) // n != ((i + 1) * n_random) // n:
            sample = next(randoms, None)
            if sample is not None:
                yield sample
                continue
        yield CalibrationSample(arch_id, space_id, model, space, random_policy(space, rng))


def dense_macs(space: SearchSpace, policy: Policy) -> float:
    """MACs of ``policy`` applied to the model of ``space`` (from the graph features)."""
    from latency_models.features import MODEL_FEATURES, kernel_features

    return float(kernel_features(space, [policy]).model[0, MODEL_FEATURES.index("total_macs")])


def focus_metrics(
    records: Sequence[LatencyRecord], space_id: str, kind: str, *, seed: int = 0, test_fraction: float = 0.25
) -> dict[str, Any] | None:
    """Errors of ``kind`` on held-out *policies of one model* (``space_id``), trained on the rest.

    The held-out-architecture figure answers "how good on a model never seen"; a job that
    calibrated on its own model also wants "how good on this model's other policies".
    """
    from latency_models.predictors import REGISTRY, evaluate

    mine = [i for i, r in enumerate(records) if r.space_id == space_id]
    if len(mine) < 4:
        return None
    rng = random.Random(seed)
    test = set(rng.sample(mine, max(1, round(test_fraction * len(mine)))))
    try:
        model = REGISTRY[kind](target="ratio", seed=seed).fit(
            [r for i, r in enumerate(records) if i not in test]
        )
        out = evaluate(model, [records[i] for i in sorted(test)])
    except Exception as exc:  # informative only
        log.info("no focus metrics: %s", exc)
        return None
    return {"space_id": space_id, "kind": kind, **out}


def model_ids(model: CompressibleModel, sha256: str | None, zoo: str | None) -> tuple[str, str]:
    """(arch_id, space_id) under which a job's model is calibrated.

    A zoo model is its architecture family; an upload is its own family named by its hash.
    The space id carries the input shape, so the same network at another resolution is
    another measured model.
    """
    shape = "x".join(str(d) for d in model.input_shape)
    arch = zoo or f"upload-{(sha256 or model.name)[:12]}"
    return arch, f"{arch}@{shape}"
