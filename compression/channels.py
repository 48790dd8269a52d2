"""Channel spaces: which physical channels a tensor dimension carries.

A prunable layer's output channels form a *group*. Ops that pass channels on
(BatchNorm, ReLU, pooling, depthwise convs, reshapes that keep the channel dim)
keep the same space; a residual add unites two groups (they must be pruned
together); a concat along channels makes a space of several *segments*. When a
concat's segments meet one layer's channels (a squeeze-excitation gate, a shortcut
added to a concat), that layer's output is *split* at the segment boundaries into
one group per run, each united with its segment's group (as in Torch-Pruning's
dependency graph); ``graph.analyze`` finds the cut points and re-runs. Every
tensor that must be sliced when channels go (weights, BN statistics, biases,
positional embeddings) records the space of the dimension to slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    """A run of channels: ``length`` channels of ``group`` from ``start``.

    ``group`` None marks channels that are never pruned (e.g. a concat with the
    model input).
    """

    group: int | None
    start: int
    length: int


@dataclass(frozen=True)
class ChanSpace:
    """The channel layout of one tensor dimension.

    Attributes:
        dim: the tensor dimension (non-negative) that carries channels.
        segments: the channel runs, in order.
        expand: each channel occupies ``expand`` consecutive positions (after a
            flatten of C×H×W, ``expand`` is H·W).
    """

    dim: int
    segments: tuple[Segment, ...]
    expand: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segments)

    def with_dim(self, dim: int) -> ChanSpace:
        return ChanSpace(dim, self.segments, self.expand)


@dataclass
class Group:
    """A set of channels that must be pruned as one (after unions, the root's data)."""

    size: int
    producers: list[str] = field(default_factory=list)
    blocked_by: list[str] = field(default_factory=list)
    tied_segments: int = 1
    # Row of each producer's output where this group starts (parallel to ``producers``;
    # non-zero only for a layer whose output was split among several groups).
    offsets: list[int] = field(default_factory=list)


class Groups:
    """Union-find over channel groups, with the facts needed to prune each root."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._data: list[Group] = []
        # (group, channel index): a merge needs this group cut before that channel.
        self.split_requests: list[tuple[int, int]] = []

    def new(self, size: int, producer: str, offset: int = 0) -> int:
        gid = len(self._parent)
        self._parent.append(gid)
        self._data.append(Group(size=size, producers=[producer], offsets=[offset]))
        return gid

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def data(self, gid: int) -> Group:
        return self._data[self.find(gid)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra  # the older group (earlier producer) stays the root
        da, db = self._data[ra], self._data[rb]
        if da.size != db.size:  # cannot happen for a valid graph; keep it safe
            da.blocked_by.append(f"size mismatch {da.size} vs {db.size}")
        da.producers.extend(db.producers)
        da.offsets.extend(db.offsets)
        da.blocked_by.extend(db.blocked_by)
        da.tied_segments = _lcm(da.tied_segments, db.tied_segments)
        self._parent[rb] = ra
        return ra

    def block(self, space: ChanSpace | None, reason: str) -> None:
        if space is None:
            return
        for seg in space.segments:
            if seg.group is not None:
                self.data(seg.group).blocked_by.append(reason)

    def tie(self, gid: int, segments: int) -> None:
        d = self.data(gid)
        d.tied_segments = _lcm(d.tied_segments, segments)

    def request_split(self, gid: int, at: int) -> None:
        """Ask for group ``gid`` to be cut before its channel ``at`` (0 < at < size)."""
        if 0 < at < self.data(gid).size:
            self.split_requests.append((gid, at))

    def producer_cuts(self) -> dict[str, set[int]]:
        """The split requests as cut rows of each producing layer's output."""
        cuts: dict[str, set[int]] = {}
        for gid, at in self.split_requests:
            d = self.data(gid)
            for name, offset in zip(d.producers, d.offsets, strict=True):
                cuts.setdefault(name, set()).add(offset + at)
        return cuts

    def roots(self) -> list[int]:
        return sorted({self.find(g) for g in range(len(self._parent))})

    def is_full(self, seg: Segment) -> bool:
        return seg.group is not None and seg.start == 0 and seg.length == self.data(seg.group).size


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def boundaries(space: ChanSpace) -> list[int]:
    """Where each segment of ``space`` starts, and its end: ``[0, l0, l0 + l1, ..., channels]``."""
    out = [0]
    for seg in space.segments:
        out.append(out[-1] + seg.length)
    return out


def request_cuts(groups: Groups, space: ChanSpace, cuts: list[int], reason: str) -> bool:
    """Ask for the groups of ``space`` to be split at channel positions ``cuts`` of the space.

    Returns True if some segment is cut (the channels do not line up yet: the space is
    blocked for this pass, and ``graph.analyze`` re-runs with the producers split).
    """
    asked = False
    start = 0
    for seg in space.segments:
        inside = [c for c in cuts if start < c < start + seg.length]
        if inside:
            asked = True
            if seg.group is not None:
                for c in inside:
                    groups.request_split(seg.group, seg.start + c - start)
        start += seg.length
    if asked:
        groups.block(space, reason + " (channel runs not split alike yet)")
    return asked


def merge_spaces(groups: Groups, a: ChanSpace, b: ChanSpace, reason: str) -> ChanSpace | None:
    """Unite two spaces that an elementwise op adds together; None if impossible.

    Runs that cover the same channels but are cut differently (a concat's slices against
    one layer's output) are not united here: each side asks for its groups to be cut where
    the other side's runs start, and the analysis runs again with those layers split.
    """
    if a.expand == b.expand and a.channels == b.channels:
        ca, cb = boundaries(a), boundaries(b)
        if ca != cb:
            request_cuts(groups, a, cb, reason)
            request_cuts(groups, b, ca, reason)
            groups.block(a, reason)
            groups.block(b, reason)
            return None
    if (
        a.expand != b.expand
        or len(a.segments) != len(b.segments)
        or any(sa.length != sb.length for sa, sb in zip(a.segments, b.segments, strict=True))
    ):
        groups.block(a, reason)
        groups.block(b, reason)
        return None
    merged: list[Segment] = []
    for sa, sb in zip(a.segments, b.segments, strict=True):
        if sa.group is None or sb.group is None:
            if sa.group is not None or sb.group is not None:  # pruned meets fixed: keep all
                groups.block(ChanSpace(a.dim, (sa, sb)), reason + " (with unprunable channels)")
            merged.append(Segment(None, 0, sa.length))
        elif groups.is_full(sa) and groups.is_full(sb):
            merged.append(Segment(groups.union(sa.group, sb.group), 0, sa.length))
        elif groups.find(sa.group) == groups.find(sb.group) and sa.start == sb.start:
            merged.append(sa)
        else:
            groups.block(ChanSpace(a.dim, (sa, sb)), reason + " (partial channel runs)")
            merged.append(sa)
    return ChanSpace(a.dim, tuple(merged), a.expand)


def reshape_dim_groups(ins: list[int], outs: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up input and output dims of a reshape whose products match, in order."""
    i = j = 0
    pairs: list[tuple[list[int], list[int]]] = []
    while i < len(ins) or j < len(outs):
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        if i < len(ins):
            gi.append(i)
            pi *= ins[i]
            i += 1
        if j < len(outs):
            gj.append(j)
            pj *= outs[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(i)
                pi *= ins[i]
                i += 1
            elif pj < pi and j < len(outs):
                gj.append(j)
                pj *= outs[j]
                j += 1
            else:
                return None
        pairs.append((gi, gj))
    return pairs
