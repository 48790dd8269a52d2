"""Latency predictors behind one interface (``Predictor``); importing registers every kind."""

from latency_models.predictors.base import (
    REGISTRY,
    LatencyRecord,
    Predictor,
    evaluate,
    group_split,
    holdout_metrics,
    load_predictor,
)
from latency_models.predictors.baselines import MacsLinear, ShapeLookup
from latency_models.predictors.gnn import GraphGNN
from latency_models.predictors.kernel_gbdt import KernelGBDT

#: Every built-in kind, in the order reports list them.
KINDS: tuple[str, ...] = ("kernel_gbdt", "gnn", "macs", "lookup")

__all__ = [
    "KINDS",
    "REGISTRY",
    "GraphGNN",
    "KernelGBDT",
    "LatencyRecord",
    "MacsLinear",
    "Predictor",
    "ShapeLookup",
    "evaluate",
    "group_split",
    "holdout_metrics",
    "load_predictor",
]
