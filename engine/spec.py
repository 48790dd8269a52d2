"""The job: one typed object from the REST request to the engine and back.

:class:`JobSpec` is the body of ``POST /v1/jobs``, what the ``jobs.spec`` column stores
(``model_dump(mode="json")``) and what the runner and the engine read back
(``JobSpec.model_validate(job.spec)``). It accepts exactly what the engine honours, so a
spec that validates here runs; :meth:`JobSpec.objective` and :meth:`JobSpec.space_options`
turn it into the engine's own types.

Imports only pydantic at module level (no torch), so the CLI and the API load it cheaply.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from agents import Objective
    from compression.policy import Scheme
    from compression.space import SpaceOptions

Algorithm = Literal["ddpg", "agmc", "optuna-tpe", "optuna-nsga2", "random", "rule"]
Metric = Literal["accuracy", "latency_ms", "size_bytes", "macs"]
# The bounds agents.Objective enforces; an accuracy floor or a MACs cap would be ignored.
ConstraintMetric = Literal["latency_ms", "size_bytes", "accuracy_drop"]
SchemeName = Literal["dense", "unstructured", "nm", "block", "pattern", "channel"]
MAX_BUDGET_CANDIDATES = 1_000_000
MAX_BUDGET_SECONDS = 7 * 24 * 3600
MAX_CHOICES = 16  # entries of any list of choices in a space

# Strict: a JSON ``true`` or ``4.0`` is not a block size.
NmPart = Annotated[int, Field(strict=True, ge=1, le=32)]
BlockSize = Annotated[int, Field(strict=True, ge=2, le=64)]
Bits = Annotated[int, Field(strict=True, ge=2, le=8)]


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _default_schemes() -> list[SchemeName]:
    return ["dense", "unstructured", "nm", "block", "pattern"]


class _Spec(BaseModel):
    """Unknown fields and non-finite numbers are errors (a 422 over REST), never ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, protected_namespaces=())


class SpaceSpec(_Spec):
    """What a search may choose (``compression.space.SpaceOptions``); every key is optional."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"schemes": ["unstructured", "nm"], "bits": [None, 8], "depth": False},
                {"schemes": ["channel"], "round_to": 16},
            ]
        }
    )

    schemes: Annotated[list[SchemeName], Field(max_length=MAX_CHOICES)] | None = Field(
        default=None,
        description='fine-grained sparsity schemes ("dense" is always allowed; "channel" turns on width); '
        "null = every registered scheme, less those the device's calibration found size-only (no "
        "faster than dense) when latency is an objective or a bound",
    )
    bits: Annotated[list[Bits | None], Field(min_length=1, max_length=MAX_CHOICES)] | None = Field(
        default=None,
        description="weight bit-widths (null = float32); null = [null, 8], less 8 when the device's "
        "calibration found int8 size-only and latency is an objective or a bound",
    )
    width: bool = Field(default=True, description="channel pruning: a kept-width fraction per group")
    depth: bool = Field(default=True, description="skipping residual blocks")
    min_width: float = Field(default=0.2, gt=0.0, le=1.0, description="smallest kept-width fraction")
    max_sparsity: float = Field(
        default=0.9, ge=0.0, le=0.95, description="largest unstructured / block sparsity"
    )
    nm_choices: list[tuple[NmPart, NmPart]] = Field(
        default_factory=lambda: [(1, 4), (2, 4), (4, 8)],
        max_length=MAX_CHOICES,
        description="N:M patterns, 1 <= N < M <= 32",
    )
    block_choices: list[BlockSize] = Field(
        default_factory=lambda: [4, 8, 16], max_length=MAX_CHOICES, description="1×N block sizes"
    )
    round_to: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=64,
        description="kept channels are a multiple of this; null = the multiple the device's "
        "calibration measured its kernels to reward (1 without one)",
    )

    @field_validator("schemes", "bits", "block_choices")
    @classmethod
    def _dedupe(cls, values: list[Any] | None) -> list[Any] | None:
        return None if values is None else _unique(values)

    @field_validator("nm_choices")
    @classmethod
    def _nm(cls, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        bad = [list(p) for p in pairs if p[0] >= p[1]]
        if bad:
            raise ValueError(f"an N:M pattern needs N < M, got {bad}")
        return _unique(pairs)

    def space_options(self) -> SpaceOptions:
        """The engine's options for this space, unset keys at their device-free defaults (every
        scheme, ``[null, 8]``, ``round_to`` 1; ``engine.device_space`` resolves them for a device)."""
        from compression.space import SpaceOptions

        schemes = self.schemes if self.schemes is not None else _default_schemes()
        fine = cast("tuple[Scheme, ...]", tuple(s for s in schemes if s not in ("dense", "channel")))
        return SpaceOptions(
            schemes=("dense", *fine),
            bits=tuple(self.bits if self.bits is not None else [None, 8]),
            width=self.width or "channel" in schemes,
            depth=self.depth,
            min_width=self.min_width,
            max_sparsity=self.max_sparsity,
            nm_choices=tuple(self.nm_choices),
            block_choices=tuple(self.block_choices),
            round_to=self.round_to or 1,
        )


def parse_space(text: str) -> SpaceSpec:
    """A space from JSON text (the CLI's ``--options``), by the same rules as a job's ``space``.

    Raises ValueError with one line per problem, naming the key, so the CLI can print it.
    """
    from pydantic import ValidationError

    try:
        return SpaceSpec.model_validate_json(text)
    except ValidationError as e:
        lines = []
        for err in e.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "space"
            if err["type"] == "json_invalid":
                lines.append(f"not valid JSON ({err['msg']})")
            elif err["type"] == "extra_forbidden":
                lines.append(f"unknown option {where!r}; allowed: {', '.join(SpaceSpec.model_fields)}")
            else:
                lines.append(f"{where}: {err['msg']}")
        raise ValueError("; ".join(lines)) from None


class GoalSpec(_Spec):
    """One metric to optimise (``agents.Goal``): accuracy is maximised, the others minimised."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"metric": "latency_ms", "direction": "min"}]})

    metric: Metric
    direction: Literal["max", "min"]

    @model_validator(mode="after")
    def _sensible(self) -> GoalSpec:
        want = "max" if self.metric == "accuracy" else "min"
        if self.direction != want:
            raise ValueError(f"{self.metric} can only be {'maximized' if want == 'max' else 'minimized'}")
        return self


class Bound(_Spec):
    """A hard upper bound; a candidate above it is infeasible and never on the front."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"max": 0.01}, {"max": 2.0}]})

    max: float


class Budget(_Spec):
    """Stop at ``candidates`` evaluated or ``seconds`` of search, whichever comes first.

    ``candidates: null`` means no candidate limit; ``seconds`` must then be set.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"candidates": 200, "seconds": 900}, {"candidates": None, "seconds": 3600}]
        }
    )

    candidates: int | None = Field(default=200, ge=1, le=MAX_BUDGET_CANDIDATES)
    seconds: float | None = Field(default=900.0, gt=0, le=MAX_BUDGET_SECONDS)

    @model_validator(mode="after")
    def _bounded(self) -> Budget:
        if self.candidates is None and self.seconds is None:
            raise ValueError("a budget needs 'candidates' or 'seconds' (an unbounded search never ends)")
        return self


def _default_objectives() -> list[GoalSpec]:
    return [GoalSpec(metric="accuracy", direction="max"), GoalSpec(metric="latency_ms", direction="min")]


class FinetuneSpec(_Spec):
    """Knowledge-distillation fine-tuning of the front after the search (``engine.finetune_front``).

    The ``top_k`` front points (spread from fastest to most accurate, as ``remeasure_top_k``)
    are fine-tuned from their compressed weights with the dense model as teacher, masks and
    quantizers held, and re-scored on the same validation images; each keeps both accuracies.
    """

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"top_k": 5, "epochs": 1.0}, {"top_k": 0}, {"top_k": 1, "steps": 20}]}
    )

    top_k: int = Field(default=5, ge=0, le=50, description="front points fine-tuned (0 = off)")
    epochs: float = Field(
        default=2.0,
        gt=0.0,
        le=50.0,
        description="passes over the train split per point (ResNet-20 on the MNIST split: 110 steps, "
        "under a minute a point on 2 cores)",
    )
    steps: int | None = Field(
        default=None, ge=1, le=100_000, description="optimizer steps per point; overrides epochs when set"
    )


class ActiveMeasurementSpec(_Spec):
    """Measuring the job's own candidates on the device during the search (``engine.active_measurement``).

    At most ``min(max, ceil(share x the candidate budget))`` candidates are timed on the device,
    at most ``per_round`` at a time (the total split evenly) in rounds spread evenly over the
    budget (candidates or seconds, whichever is further along): the front points not yet
    measured first, then the candidates the predictor is least sure about. After each round
    the job's predictor is refitted on the device's measurements, stored as a new version, and
    every candidate of the job is re-predicted with it. ``share`` 0 (or ``max`` 0) turns it off.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"share": 0.15, "max": 30}, {"share": 0.0}, {"max": 8, "per_round": 4}]
        }
    )

    share: float = Field(
        default=0.15,
        ge=0.0,
        le=0.5,
        description="largest share of the candidate budget measured on the device in the search (0 = off)",
    )
    max: int = Field(default=30, ge=0, le=500, description="at most this many measurements per job (0 = off)")
    per_round: int = Field(
        default=8,
        ge=1,
        le=100,
        description="most measurements per round; one predictor refit follows each round",
    )

    @property
    def on(self) -> bool:
        return self.share > 0.0 and self.max > 0

    def limit(self, candidates: int | None) -> int:
        """Measurements a job with a budget of ``candidates`` may make (None: no candidate limit)."""
        if not self.on:
            return 0
        if candidates is None:
            return self.max
        return min(self.max, math.ceil(self.share * candidates - 1e-9))


MAX_FAMILY_BUDGETS = 8  # engine.family.MAX_BUDGETS (not imported: that module loads torch)
MAX_FAMILY_EPOCHS = 20


class FamilySpec(_Spec):
    """A family job (``engine.family``): K nested operating points for K latency budgets, one
    shared weight set, instead of a front.

    The search follows one chain of the rule agent's tightening moves from the dense model; the
    policy that first meets budget k is point k, and the chain goes on from it, so each point
    keeps a subset of the previous one's channels and weights (``compression.family``). Each
    point is a candidate of the job (its ``extra.family`` names the point and its siblings);
    ``POST /v1/jobs/{id}/family-export`` shares their weights, fine-tunes them jointly
    (``finetune_epochs``) and writes the bundle ``modeltailor.switch.FamilySwitch`` runs.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"budgets": [1.0, 0.7, 0.5, 0.35]}, {"budgets": [1.0, 0.6], "finetune_epochs": 2}]
        }
    )

    budgets: list[float] = Field(
        min_length=2,
        max_length=MAX_FAMILY_BUDGETS,
        description="latency budgets as fractions of the dense model's latency on the device, each in "
        "(0, 1], strictly decreasing (e.g. [1.0, 0.7, 0.5, 0.35]); one point per budget",
    )
    finetune_epochs: int = Field(
        default=0,
        ge=0,
        le=MAX_FAMILY_EPOCHS,
        description="joint distillation fine-tuning of the shared weights (every point in each step) "
        "when the family is exported, in passes over the train split; 0 = the joint refit alone",
    )

    @field_validator("budgets")
    @classmethod
    def _decreasing(cls, budgets: list[float]) -> list[float]:
        # engine.family.check_budgets' rules, without importing torch here
        if any(not 0.0 < b <= 1.0 for b in budgets):
            raise ValueError(f"each budget is a fraction of the dense latency in (0, 1], got {budgets}")
        if any(b <= c for b, c in itertools.pairwise(budgets)):
            raise ValueError(f"budgets must decrease strictly (e.g. 1.0, 0.7, 0.5, 0.35), got {budgets}")
        return budgets


class JobSpec(_Spec):
    """A search job: which model on which data for which device, how, and for how long."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": 1,
                    "dataset_id": 1,
                    "device_id": 1,
                    "algorithm": "random",
                    "space": {"schemes": ["unstructured", "nm"], "bits": [8], "width": True, "depth": True},
                    "objectives": [
                        {"metric": "accuracy", "direction": "max"},
                        {"metric": "latency_ms", "direction": "min"},
                    ],
                    "constraints": {"latency_ms": {"max": 2.0}, "accuracy_drop": {"max": 0.01}},
                    "budget": {"candidates": 200, "seconds": 900},
                    "seed": 0,
                },
                {
                    "model_id": 1,
                    "dataset_id": 1,
                    "device_id": 1,
                    "algorithm": "optuna-tpe",
                    "constraints": {"accuracy_drop": {"max": 0.01}},
                    "budget": {"candidates": 100},
                },
                {
                    "model_id": 1,
                    "dataset_id": 1,
                    "device_id": 1,
                    "algorithm": "rule",
                    "space": {"schemes": ["unstructured", "nm"], "bits": [None, 8]},
                    "budget": {"candidates": 150},
                    "family": {"budgets": [1.0, 0.7, 0.5, 0.35], "finetune_epochs": 2},
                },
            ]
        }
    )

    model_id: int
    dataset_id: int
    device_id: int
    algorithm: Algorithm
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    objectives: list[GoalSpec] = Field(default_factory=_default_objectives, min_length=1, max_length=4)
    constraints: dict[ConstraintMetric, Bound] = Field(
        default_factory=dict,
        description="upper bounds: latency_ms (ms, > 0), size_bytes (> 0), accuracy_drop "
        "(below the dense model's accuracy, 0..1: 0.01 = one point)",
    )
    budget: Budget = Field(default_factory=Budget)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    remeasure_top_k: int = Field(
        default=3,
        ge=0,
        le=50,
        description="front points measured on the device at the end, beside their predicted latency",
    )
    reconstruct: bool = Field(
        default=True,
        description="re-fit each layer whose inputs were pruned to the dense model's outputs on "
        "calibration images (least squares, as AMC / ThiNet) before scoring and export; about "
        "twice the scoring time, far higher accuracy for channel pruning without fine-tuning",
    )
    recovery: Literal["obc", "magnitude"] = Field(
        default="obc",
        description="how fine-grained masks and weight rounding are chosen before scoring and "
        "export: obc (per-layer Hessians on the calibration images, masks by OBS saliency and "
        "GPTQ rounding with weight updates; the MNIST ViT with 2:4 on every linear layer loses "
        "0.5 point instead of 14) or magnitude (magnitude masks, round to nearest; "
        "cheaper per candidate)",
    )
    calibrate: Literal["auto", "model", "never"] = Field(
        default="model",
        description=(
            "model (default): calibrate the device first if it has no predictor, and measure "
            "topup_samples policies of this model first (then refit) when the device's "
            "measurements have none of it; auto: only the calibration when there is no predictor; "
            "never: fail when there is no predictor"
        ),
    )
    calibration_samples: int | None = Field(
        default=None,
        ge=8,
        le=2000,
        description="size of the job's own calibration of a device without a predictor (default 48)",
    )
    topup_samples: int = Field(
        default=16,
        ge=4,
        le=2000,
        description="policies of the job's own model measured before the search when the device's "
        "measurements have none of it (calibrate 'model'); a predictor refit follows",
    )
    active_measurement: ActiveMeasurementSpec = Field(
        default_factory=ActiveMeasurementSpec,
        description="measure front points and the least certain candidates on the device during the "
        "search and refit the predictor; share 0 turns it off",
    )
    finetune: FinetuneSpec = Field(
        default_factory=FinetuneSpec,
        description="after the search, fine-tune the top-k front points by distillation from the dense "
        "model and re-score them (the candidate keeps both accuracies; top_k 0 turns it off)",
    )
    family: FamilySpec | None = Field(
        default=None,
        description="search K nested operating points for K latency budgets (one shared weight set) "
        "instead of a front; needs algorithm 'rule' and reconstruct. A family job scores with the "
        "device's predictor and magnitude masks (the shared weights' recovery; 'recovery' is not "
        "used), fine-tunes the family jointly at export (family.finetune_epochs) instead of the "
        "front ('finetune' is not used), measures no candidate during the search "
        "('active_measurement' is not used) and re-measures its K points at the end",
    )

    @field_validator("objectives")
    @classmethod
    def _unique_metrics(cls, objectives: list[GoalSpec]) -> list[GoalSpec]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once, got {metrics}")
        return objectives

    @field_validator("constraints")
    @classmethod
    def _sensible_bounds(cls, constraints: dict[str, Bound]) -> dict[str, Bound]:
        for name, bound in constraints.items():
            if name == "accuracy_drop" and not 0.0 <= bound.max <= 1.0:
                raise ValueError(f"accuracy_drop max must be in [0, 1] (0.01 = one point), got {bound.max}")
            if name != "accuracy_drop" and bound.max <= 0.0:
                raise ValueError(f"{name} max must be positive, got {bound.max}")
        return constraints

    @model_validator(mode="after")
    def _family_fits(self) -> JobSpec:
        if self.family is None:
            return self
        if self.algorithm != "rule":
            raise ValueError(
                f"a family job searches with the rule agent's moves: set algorithm 'rule' "
                f"(got {self.algorithm!r}), or drop 'family' for a front search"
            )
        if not self.reconstruct:
            raise ValueError(
                "a family job re-fits pruned layers (its shared weights are a joint refit): "
                "leave reconstruct true"
            )
        return self

    def bound(self, metric: ConstraintMetric) -> float | None:
        """The upper bound on ``metric``, None when unconstrained."""
        found = self.constraints.get(metric)
        return found.max if found is not None else None

    def objective(self) -> Objective:
        """The engine's objective: these goals under these bounds."""
        from agents import Goal, Objective

        return Objective(
            goals=tuple(Goal(g.metric, g.direction) for g in self.objectives),
            max_latency_ms=self.bound("latency_ms"),
            max_accuracy_drop=self.bound("accuracy_drop"),
            max_size_bytes=self.bound("size_bytes"),
        )

    def space_options(self) -> SpaceOptions:
        """The engine's space options."""
        return self.space.space_options()
