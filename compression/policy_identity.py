"""The identity of a policy as the model it builds: two policies that build the same model are one.

``Policy.hash`` tells policies apart by their JSON, so widths 0.503 and 0.505 of a 64-channel
group are two policies although both keep 32 channels, as are two policies that differ only in
a layer of a skipped block. A search that cached by that hash scored both. :func:`resolved_key`
is the hash of the policy *resolved* against the model's graph, as ``compression.apply``
builds it:

* widths become kept channel counts per channel group (the count ``apply_policy`` keeps:
  ``max(1, round(width · n / tied))`` per tied segment, taken from the group's leader; a group
  that cannot be pruned, or whose every producer sits in a skipped block, has none);
* a layer inside a skipped block has no settings (it is gone);
* every remaining layer keeps its fine-grained fields exactly (scheme, sparsity, N:M, block,
  bits: the scheme plug-ins already reset the fields they do not use);
* ``act_bits`` counts only when some remaining layer has quantized weights (it quantizes
  their inputs).

Sparsities are not rounded to mask counts: what a scheme's mask keeps is the plug-in's
business, so equal keys never merge two policies that could build different models, while a
few that do build the same model may stay apart.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from compression.graph import ModelGraph
from compression.policy import Policy


def kept_channels(width: float, size: int, tied: int) -> int:
    """Channels ``compression.apply`` keeps of a group of ``size`` in ``tied`` equal segments."""
    per = size // max(1, tied)
    if width >= 1.0:
        return size
    k_per = max(1, round(width * per))
    return size if k_per >= per else k_per * max(1, tied)


def resolved_form(graph: ModelGraph, policy: Policy) -> dict[str, Any]:
    """The policy as the model it builds (JSON-stable): kept channels per group, layer settings
    of the layers still present, skipped blocks, activation bits where they act."""
    skipped = {name for block in graph.blocks if block.name in policy.skip for name in block.layers}
    channels: dict[str, int] = {}
    for root in graph.groups.roots():
        data = graph.groups.data(root)
        if data.blocked_by or all(p in skipped for p in data.producers):
            continue
        width = policy.for_layer(graph.group_leader(root)).width
        kept = kept_channels(width, data.size, data.tied_segments)
        if kept < data.size:
            channels[str(root)] = kept
    layers: dict[str, Any] = {}
    for info in graph.layers:
        if info.name in skipped:
            continue
        fields = policy.for_layer(info.name).to_dict()
        fields.pop("width")  # the group's kept count above says what width does
        layers[info.name] = fields
    quantized = any(spec["bits"] is not None for spec in layers.values())
    return {
        "channels": channels,
        "layers": layers,
        "skip": sorted(policy.skip),
        "act_bits": policy.act_bits if quantized else None,
    }


def resolved_key(graph: ModelGraph, policy: Policy) -> str:
    """16 hex digits naming the model ``policy`` builds on ``graph`` (equal for policies that
    build the same model; see the module docstring for what is resolved)."""
    text = json.dumps(resolved_form(graph, policy), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
