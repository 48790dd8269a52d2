"""Per-layer sensitivity of a job: what each single move cost in accuracy per resource saved.

The rule agent measures it (``agents.sensitivity``): after its sweep it takes an anchor policy
and scores single moves from it — skip one block, narrow one channel group, switch one layer's
bits, sparsify one layer — and keeps each move's measured effect ``(d accuracy, d resource)``
in its saved state. This module reads that state back from the job (never code: the state is
JSON, and a state that is not, such as DDPG's tensors, gives no rows) and turns it into rows a
user can read: which layers are cheap to compress on this device, and which moves buy nothing.
"""

from __future__ import annotations

import json
from typing import Any

from agents.sensitivity import saves
from db.models import Job
from engine.spec import JobSpec

__all__ = ["job_sensitivity"]


def _state(job: Job) -> dict[str, Any] | None:
    """The rule agent's saved sensitivity state, None when the job has none (another agent, not started)."""
    raw = job.agent_state
    if not raw:
        return None
    try:
        state = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # not a JSON state (DDPG keeps tensors): no sensitivity to show
    sens = state.get("sensitivity") if isinstance(state, dict) else None
    return sens if isinstance(sens, dict) and isinstance(sens.get("effects"), dict) else None


def _describe(move: list[Any]) -> tuple[str, str, str]:
    """(kind, target, words) of a move such as ``["bits", "conv1", 8]``."""
    kind, target = str(move[0]), str(move[1])
    if kind == "skip":
        return kind, target, "skip the block"
    if kind == "bits":
        bits = move[2] if len(move) > 2 else None
        return kind, target, "float weights" if bits is None else f"{bits}-bit weights"
    if kind == "width":
        return kind, target, f"width ×{float(move[2]):g}"
    if kind == "sparse":
        fields = move[2] if len(move) > 2 and isinstance(move[2], dict) else {}
        scheme = str(fields.get("scheme", "sparse"))
        rest = ", ".join(f"{k} {v}" for k, v in fields.items() if k != "scheme")
        return kind, target, f"{scheme} sparsity" + (f" ({rest})" if rest else "")
    return kind, target, json.dumps(move[2:])


def job_sensitivity(job: Job) -> dict[str, Any]:
    """The job's measured single moves, most efficient first (accuracy lost per resource saved),
    then the moves that saved nothing; with the anchor they were measured from."""
    spec = JobSpec.model_validate(job.spec)
    resource = spec.objective().resource
    state = _state(job)
    body: dict[str, Any] = {
        "job_id": job.id,
        "algorithm": spec.algorithm,
        "resource": resource,
        "anchor": None,
        "moves": [],
        "note": "",
    }
    if state is None or state.get("anchor") is None:
        body["note"] = (
            "no sensitivity measured: only the rule agent measures single moves, after its first sweep"
            if spec.algorithm != "rule"
            else "no sensitivity measured yet: the rule agent probes single moves after its first sweep"
        )
        return body
    anchor_score = state["anchor"].get("score") or {}
    anchor_resource = float(anchor_score.get(resource) or 0.0) if resource else 0.0
    body["anchor"] = {"accuracy": anchor_score.get("accuracy"), "resource": anchor_resource or None}
    rows = []
    for key, effect in state["effects"].items():
        try:
            move = json.loads(key)
            d_acc, d_res = float(effect[0]), float(effect[1])
        except (ValueError, TypeError, IndexError):
            continue  # a malformed entry: skipped, the rest still shown
        kind, target, words = _describe(move)
        saved = saves(d_res, anchor_resource)
        rows.append(
            {
                "target": target,
                "kind": kind,
                "move": words,
                "accuracy_delta": d_acc,
                "resource_delta": d_res,
                "saves": saved,
                # accuracy points lost per unit of resource saved (ms or bytes): lower is cheaper
                "cost": max(0.0, -d_acc) * 100 / -d_res if saved else None,
            }
        )
    rows.sort(key=lambda r: (not r["saves"], r["cost"] if r["cost"] is not None else 0.0, r["target"]))
    body["moves"] = rows
    if not rows:
        body["note"] = "the anchor is chosen; its single moves are not scored yet"
    return body
