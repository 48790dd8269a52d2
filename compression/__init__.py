"""The model side of modeltailor: graph analysis, search space, applying policies.

Public names are re-exported here; implementation lives in the submodules.
"""

from compression.apply import CompressedModel, apply_policy
from compression.evaluate import accuracy, quantize_activations, recalibrate_bn
from compression.graph import GraphError
from compression.metrics import ModelMetrics, measure
from compression.model_io import (
    CompressibleModel,
    ModelLoadError,
    ModelTraceError,
    from_module,
    load_pt2,
    save_pt2,
)
from compression.policy import LayerPolicy, Policy, PolicyError
from compression.scoring import PolicyScore, compress, score_policy
from compression.space import BlockSpace, LayerFeatures, LayerSpace, SearchSpace, SpaceOptions
from compression.space_builder import space_for

__all__ = [
    "BlockSpace",
    "CompressedModel",
    "CompressibleModel",
    "GraphError",
    "LayerFeatures",
    "LayerPolicy",
    "LayerSpace",
    "ModelLoadError",
    "ModelMetrics",
    "ModelTraceError",
    "Policy",
    "PolicyError",
    "PolicyScore",
    "SearchSpace",
    "SpaceOptions",
    "accuracy",
    "apply_policy",
    "compress",
    "from_module",
    "load_pt2",
    "measure",
    "quantize_activations",
    "recalibrate_bn",
    "save_pt2",
    "score_policy",
    "space_for",
]
