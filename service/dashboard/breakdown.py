"""A candidate's time, layer by layer, for ``GET /v1/candidates/{id}/breakdown`` (read-only).

Reads the predictor version that scored the candidate (never mirroring or writing, unlike the
runner's ``predictor_versions.current_predictor``), the job's model as an *architecture* (the
space needs shapes, not weights: a zoo model is built untrained from the data set's shapes, an
upload is loaded from its checked archive) and the space options the job resolved against the
device, and hands them to ``latency_models.breakdown``.

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
Spaces and predictors are kept in small in-process caches, so only the first look at a model
pays for building its graph (about a second for ResNet-20).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from db.models import Candidate, Dataset, Device, Job, Model
from engine.spec import JobSpec
from service.predictor_versions import device_store, predictor_rows, preferred

if TYPE_CHECKING:
    from compression.space import SearchSpace
    from latency_models.capabilities import Capabilities

_LOCK = threading.Lock()
_SPACES: OrderedDict[tuple[int, str], SearchSpace] = OrderedDict()
_PREDICTORS: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
_KEEP = 8


class BreakdownUnavailable(Exception):
    """The candidate's time cannot be broken down; the message says why."""


def _cached(cache: OrderedDict[Any, Any], key: Any, build: Any) -> Any:
    with _LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = build()
    with _LOCK:
        cache[key] = value
        while len(cache) > _KEEP:
            cache.popitem(last=False)
    return value


def _architecture(model: Model, dataset: Dataset) -> Any:
    """The model's graph: a zoo architecture untrained (same layers as the trained one), or the
    uploaded archive."""
    import warnings

    import torch

    from compression.model_io import from_module, load_pt2
    from compression.zoo import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model.zoo:
            shape = list((dataset.shapes or {}).get("x_val") or (dataset.shapes or {}).get("x_train") or [])
            if len(shape) != 4:
                raise BreakdownUnavailable(f"data set {dataset.id} does not record its image shape")
            classes = int((dataset.shapes or {}).get("num_classes") or 10)
            net = build_model(
                model.zoo, in_channels=shape[1], image_size=shape[2], num_classes=classes
            ).eval()
            return from_module(net, torch.zeros(2, shape[1], shape[2], shape[3]), name=model.zoo)
        if not model.path or not Path(model.path).is_file():
            raise BreakdownUnavailable(f"model {model.id}'s file is gone")
        return load_pt2(model.path)


def _predictor(
    session: Session, data_dir: Path, device: Device, job: Job, version: int | None
) -> tuple[Any, Any]:
    """(the predictor that scored the candidate or None, its row or None)."""
    if version is None:
        return None, None
    rows = predictor_rows(session, device=device, tenant_id=job.tenant_id)
    row = preferred([p for p in rows if p.artifact_path], version)
    if row is None or row.artifact_path is None:
        return None, None
    store = device_store(data_dir, device, row.tenant_id)
    stored = int(Path(row.artifact_path).name.removeprefix("v"))
    kind = row.kind or ""

    def load() -> Any:
        from latency_models.predictors.base import StalePredictorError

        try:
            return store.load(stored, kind or None)[0]
        except (StalePredictorError, OSError, ValueError):
            return None

    return _cached(_PREDICTORS, (str(store.root), stored, kind), load), row


def _capabilities(row: Any) -> Capabilities | None:
    from latency_models.capabilities import Capabilities

    return Capabilities.from_stored((row.metrics or {}).get("capabilities")) if row is not None else None


def candidate_breakdown(
    session: Session, *, data_dir: Path, candidate: Candidate, job: Job
) -> dict[str, Any]:
    """Per-layer predicted time of ``candidate`` against the dense model, flags and advice.

    Raises:
        BreakdownUnavailable: no latency to break down, or the model or data set is gone.
    """
    from compression.policy import Policy
    from compression.space_builder import space_for
    from engine.device_space import latency_matters, resolve_space
    from latency_models.breakdown import DeviceFacts, explain, layer_costs, macs_costs, without_bits

    if candidate.latency_ms is None:
        raise BreakdownUnavailable(f"candidate {candidate.id} has no latency to break down")
    model = session.get(Model, job.model_id)
    dataset = session.get(Dataset, job.dataset_id)
    device = session.get(Device, job.device_id)
    if model is None or dataset is None or device is None:
        raise BreakdownUnavailable("the job's model, data set or device was deleted")
    spec = JobSpec.model_validate(job.spec)
    predictor, row = _predictor(session, data_dir, device, job, candidate.predictor_version)
    caps = _capabilities(row)
    resolved = resolve_space(spec.space, caps, latency_objective=latency_matters(spec))
    options = resolved.options
    key = (model.id, repr(options))
    try:
        space = _cached(_SPACES, key, lambda: space_for(_architecture(model, dataset), options))
        policy = Policy.from_dict(candidate.policy)
    except BreakdownUnavailable:
        raise
    except (ValueError, RuntimeError, OSError, KeyError) as exc:  # a model this server cannot rebuild
        raise BreakdownUnavailable(f"model {model.id} cannot be analysed here: {exc}") from exc
    facts = DeviceFacts.from_capabilities(device.name, caps, round_to=options.round_to)
    if predictor is not None and hasattr(predictor, "kernel_costs"):
        costs = layer_costs(predictor, space, policy)
        dense = layer_costs(predictor, space, Policy.dense())
        in_float = layer_costs(predictor, space, without_bits(policy)) if _any_bits(policy) else None
        out = explain(space, policy, costs, dense, facts, float_costs=in_float)
        source = f"predictor v{candidate.predictor_version} ({row.kind}) of {device.name}"
    else:
        base = float((job.baseline or {}).get("latency_ms") or 0.0)
        costs = macs_costs(space, policy, float(candidate.latency_ms))
        dense = macs_costs(space, Policy.dense(), base) if base > 0 else {}
        out = explain(space, policy, costs, dense, facts, source="macs")
        source = "estimate: the candidate's latency split by each layer's kept MACs (no per-layer predictor)"
    return {
        "candidate_id": candidate.id,
        "device": device.name,
        "round_to": facts.round_to,
        "size_only": dict(facts.size_only),
        "source_words": source,
        **out.to_dict(),
    }


def _any_bits(policy: Any) -> bool:
    return policy.default.bits is not None or any(lp.bits is not None for lp in policy.layers.values())
