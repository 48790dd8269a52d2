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
        in_segments: list[tuple[str | None, int]] = []
        if info.in_space is not None:
            for seg in info.in_space.segments:
                root = graph.groups.find(seg.group) if seg.group is not None else None
                free = opts.width and root is not None and not graph.groups.data(root).blocked_by
                in_segments.append(
                    (graph.group_leader(root) if free and root is not None else None, seg.length)
                )
        else:
            in_segments.append((None, f.in_channels))
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
                in_segments=tuple(in_segments),
                in_expand=info.in_space.expand if info.in_space is not None else 1,
            )
        )
    blocks_out = tuple(BlockSpace(b.name, tuple(b.layers)) for b in graph.blocks) if opts.depth else ()
    return SearchSpace(layers=tuple(layers), blocks=blocks_out, edges=tuple(graph.edges), options=opts)
