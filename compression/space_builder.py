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
            in_segments = [(lead if opts.width else None, n) for lead, n in graph.run_leaders(info.in_space)]
        else:
            in_segments.append((None, f.in_channels))
        # Output channels in several runs (a layer split where a concat's runs meet it, a
        # depthwise conv after a concat): each run follows its own leader.
        out_segments: tuple[tuple[str | None, int], ...] = ()
        if not prunable and info.out_space is not None and len(info.out_space.segments) > 1:
            runs = [(lead if opts.width else None, n) for lead, n in graph.run_leaders(info.out_space)]
            if any(lead is not None for lead, _ in runs):
                out_segments = tuple(runs)
        draft = LayerSpace(
            name=info.name,
            features=f,
            width_prunable=prunable,
            width_leader=leader,
            schemes=(),
            bits_choices=tuple(opts.bits) or (None,),
            in_segments=tuple(in_segments),
            in_expand=info.in_space.expand if info.in_space is not None else 1,
            out_segments=out_segments,
            **owned,  # type: ignore[arg-type]
        )
        offered = [s for s in opts.schemes if _schemes.get(s).offered(draft)]
        if _schemes.DENSE not in offered:
            offered.insert(0, _schemes.DENSE)
        layers.append(replace(draft, schemes=tuple(offered)))
    blocks_out = tuple(BlockSpace(b.name, tuple(b.layers)) for b in graph.blocks) if opts.depth else ()
    return SearchSpace(layers=tuple(layers), blocks=blocks_out, edges=tuple(graph.edges), options=opts)
