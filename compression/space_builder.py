"""Build the :class:`SearchSpace` of a model from its graph (nothing hand-listed)."""

from __future__ import annotations

from dataclasses import replace

from compression import schemes as _schemes
from compression.model_io import CompressibleModel
from compression.space import BlockSpace, LayerSpace, SearchSpace, SpaceOptions


def space_for(model: CompressibleModel, options: SpaceOptions | None = None) -> SearchSpace:
    """The decision points of ``model`` under ``options``.

    Each registered scheme sets the choices it owns at a layer of that shape
    (``Scheme.space_fields``: ``nm`` patterns only where a layer has at least M input
    weights per output position, not depthwise; ``block`` sizes no larger than its output
    channels), and a searched scheme is offered only where it has a choice. Width is a free
    choice only for the first layer (in topological order) of each prunable channel group.
    """
    opts = options or SpaceOptions()
    graph = model.graph
    layers: list[LayerSpace] = []
    for info in graph.layers:
        f = info.features
        owned: dict[str, object] = {}
        for scheme in _schemes.schemes():
            owned.update(scheme.space_fields(f, opts))
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
        draft = LayerSpace(
            name=info.name,
            features=f,
            width_prunable=prunable,
            width_leader=leader,
            schemes=(),
            bits_choices=tuple(opts.bits) or (None,),
            in_segments=tuple(in_segments),
            in_expand=info.in_space.expand if info.in_space is not None else 1,
            **owned,  # type: ignore[arg-type]
        )
        offered = [s for s in opts.schemes if _schemes.get(s).offered(draft)]
        if _schemes.DENSE not in offered:
            offered.insert(0, _schemes.DENSE)
        layers.append(replace(draft, schemes=tuple(offered)))
    blocks_out = tuple(BlockSpace(b.name, tuple(b.layers)) for b in graph.blocks) if opts.depth else ()
    return SearchSpace(layers=tuple(layers), blocks=blocks_out, edges=tuple(graph.edges), options=opts)
