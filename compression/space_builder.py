"""Build the :class:`SearchSpace` of a model from its graph (nothing hand-listed)."""

from __future__ import annotations

from compression.model_io import CompressibleModel
from compression.policy import Scheme
from compression.space import BlockSpace, LayerSpace, SearchSpace, SpaceOptions


def space_for(model: CompressibleModel, options: SpaceOptions | None = None) -> SearchSpace:
    """The decision points of ``model`` under ``options``.

    A layer gets ``nm`` only if it has at least M input weights per output
    position for some offered M (not depthwise), and ``block`` sizes no larger
    than its output channels. Width is a free choice only for the first layer
    (in topological order) of each prunable channel group.
    """
    opts = options or SpaceOptions()
    graph = model.graph
    layers: list[LayerSpace] = []
    for info in graph.layers:
        f = info.features
        in_per_group = f.in_channels // f.groups
        nm = tuple(p for p in opts.nm_choices if info.op != "dwconv" and in_per_group >= p[1])
        blocks = tuple(b for b in opts.block_choices if b <= f.out_channels)
        schemes: list[Scheme] = []
        for s in opts.schemes:
            if (s == "nm" and not nm) or (s == "block" and not blocks):
                continue
            schemes.append(s)
        if "dense" not in schemes:
            schemes.insert(0, "dense")
        gid = graph.group_of(info)
        prunable = opts.width and graph.width_prunable(info)
        leader = graph.group_leader(gid) if prunable and gid is not None else None
        layers.append(
            LayerSpace(
                name=info.name,
                features=f,
                width_prunable=prunable,
                width_leader=leader,
                schemes=tuple(schemes),
                nm_choices=nm,
                block_choices=blocks,
                bits_choices=tuple(opts.bits) or (None,),
            )
        )
    blocks_out = tuple(BlockSpace(b.name, tuple(b.layers)) for b in graph.blocks) if opts.depth else ()
    return SearchSpace(layers=tuple(layers), blocks=blocks_out, edges=tuple(graph.edges), options=opts)
