"""Write a family (``compression.family``) as one bundle: shared weights once, one graph per point.

Each point is first exported as the product exports any compressed model (float ONNX, then
every layer at the precision its bits run at: ``compression.mixed_precision``); that file is
the point's *standalone* file. Its layer weights are then replaced by a few constant ops
computing them from the shared weights, so the bundle holds:

* ``weights.bin``: the master weight of every conv / linear layer once, as ONNX external data
  (point 0's slice of it, at point 0's precision: int8 integers and a float scale per output
  channel for a layer point 0 quantizes, float32 otherwise), plus, for a layer some point
  masks, one uint8 *level* per weight (point k keeps a weight where ``level > k``);
* ``point_<k>.onnx``: point k's graph. Its private tensors stay inside it (folded BatchNorm
  shifts, biases, quantization scales, kept-channel indices: vectors), and each layer weight
  is ``Gather`` (kept channels) → mask → rounding on the point's grid → per-output-channel
  scale (the folded BatchNorm) → ``QuantizeLinear`` where the standalone file runs the layer
  in int8. ONNX Runtime folds these constant ops when a session is created, so the session
  runs the same kernels on the same weights as the standalone file (checked on inputs, and
  timed in ``bench/family_bench.py``).

A layer whose weight cannot be reproduced that way (a 4-bit ``MatMulNBits`` layer, or a weight
that matches nothing) keeps its own initializer in its point's graph and is listed in the
point's ``private_layers``; the bundle is then larger, never wrong.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from compression.apply import get_tensor
from compression.family import Family
from compression.mixed_precision import export_policy_onnx, float_graph
from compression.onnx_export import OnnxModel, export_onnx, max_relative_error
from compression.quantize_onnx import full_range_weights

__all__ = ["WEIGHTS_FILE", "BundleFiles", "PointFiles", "write_bundle"]

WEIGHTS_FILE = "weights.bin"
_ALIGN = 64
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: Least |cosine| between a point's weight rows and an ONNX weight's rows to call them the same.
_MATCH = 0.9999
#: Largest relative residual of ``onnx ≈ scale · torch`` row by row for a float weight.
_FLOAT_RESIDUAL = 1e-5


@dataclass(frozen=True)
class PointFiles:
    """One point of a written bundle.

    Attributes:
        file: the point's graph, relative to the bundle folder.
        graph_bytes: its size (private tensors included).
        standalone_bytes: the size of the same point exported alone (weights inside).
        shared_layers / private_layers: layers computed from the shared weights / kept inside.
        max_rel_error: worst relative error of the bundle graph's outputs against the
            standalone file's on the check inputs.
    """

    file: str
    graph_bytes: int
    standalone_bytes: int
    shared_layers: tuple[str, ...]
    private_layers: tuple[str, ...]
    max_rel_error: float


@dataclass(frozen=True)
class BundleFiles:
    """What :func:`write_bundle` wrote: the folder, its points and its sizes."""

    folder: Path
    points: tuple[PointFiles, ...]
    weights_bytes: int
    weights_sha256: str
    dense_file: Path | None = None
    standalone: tuple[Path, ...] = field(default=())

    @property
    def bundle_bytes(self) -> int:
        """Shared weights plus every point's graph (the manifest aside)."""
        return self.weights_bytes + sum(p.graph_bytes for p in self.points)

    @property
    def separate_bytes(self) -> int:
        """The K standalone files together: what shipping the points one by one costs."""
        return sum(p.standalone_bytes for p in self.points)

    @property
    def largest_point_bytes(self) -> int:
        return max(p.standalone_bytes for p in self.points)

    def sizes(self) -> dict[str, Any]:
        return {
            "bundle_bytes": self.bundle_bytes,
            "weights_bytes": self.weights_bytes,
            "separate_bytes": self.separate_bytes,
            "largest_point_bytes": self.largest_point_bytes,
            "bundle_over_largest": round(self.bundle_bytes / self.largest_point_bytes, 4),
            "bundle_over_separate": round(self.bundle_bytes / self.separate_bytes, 4),
        }


# ----------------------------------------------------------------------------- shared store


class _Store:
    """Arrays appended to the shared external-data file, each once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = path.open("wb")
        self.offset = 0
        self.entries: dict[str, tuple[np.ndarray, int, int]] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.entries:
            return
        data = np.ascontiguousarray(array).tobytes()
        pad = (-self.offset) % _ALIGN
        self.fh.write(b"\0" * pad)
        self.offset += pad
        self.fh.write(data)
        self.entries[name] = (np.asarray(array), self.offset, len(data))
        self.offset += len(data)

    def tensor(self, name: str) -> onnx.TensorProto:
        """A TensorProto that points into the shared file (no data of its own)."""
        array, offset, length = self.entries[name]
        t = onnx.TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def close(self) -> None:
        self.fh.close()


# ----------------------------------------------------------------------------- weight sites


@dataclass
class _Site:
    """Where a layer weight enters an ONNX graph."""

    node: onnx.NodeProto  # the Conv / Gemm / MatMul
    init: str  # the initializer: float weight, or the int8 weight of a DequantizeLinear
    dq: onnx.NodeProto | None  # the DequantizeLinear between them, if quantized
    rows: np.ndarray  # float values as torch's (out, rest) rows
    transposed: bool  # ONNX stores it (in, out): MatMul, or Gemm without transB


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _sites(model: onnx.ModelProto) -> list[_Site]:
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: list[_Site] = []
    for node in model.graph.node:
        if node.op_type not in _LAYER_OPS or len(node.input) < 2:
            continue
        name, dq = node.input[1], None
        if name in inits:
            value = numpy_helper.to_array(inits[name]).astype(np.float64)
        else:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            name = dq.input[0]
            value = _dequantize(dq, inits)
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0))
        if node.op_type != "Conv" and value.ndim != 2:
            continue
        rows = (value.T if transposed else value).reshape(value.shape[1 if transposed else 0], -1)
        out.append(_Site(node, name, dq, rows, transposed))
    return out


def _dequantize(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 else 0.0
    if np.ndim(scale) == 1 and scale.size > 1:
        axis = _attr(dq, "axis", 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = np.reshape(zp, shape) if np.ndim(zp) == 1 else zp
    return np.asarray((q - zp) * scale)


def _row_scale(onnx_rows: np.ndarray, torch_rows: np.ndarray) -> np.ndarray | None:
    """``s`` with ``onnx_rows ≈ s[:, None] · torch_rows`` when the rows match, else None."""
    if onnx_rows.shape != torch_rows.shape:
        return None
    na, nb = np.linalg.norm(onnx_rows, axis=1), np.linalg.norm(torch_rows, axis=1)
    if np.any((na < 1e-30) != (nb < 1e-30)):
        return None
    live = nb >= 1e-30
    dots = np.sum(onnx_rows * torch_rows, axis=1)
    if live.any() and np.min(np.abs(dots[live]) / (na[live] * nb[live])) < _MATCH:
        return None
    scale = np.zeros(len(torch_rows))
    scale[live] = dots[live] / (nb[live] ** 2)
    return scale


# ----------------------------------------------------------------------------- graph rewrite


class _Rewriter:
    """Adds the constant ops computing one point's shared layer weights to its graph."""

    def __init__(self, family: Family, k: int, store: _Store, model: onnx.ModelProto) -> None:
        self.family = family
        self.k = k
        self.store = store
        self.model = model
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.externals: dict[str, onnx.TensorProto] = {}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def _const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def _op(self, op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _shared(self, name: str) -> str:
        if name not in self.externals:
            self.externals[name] = self.store.tensor(name)
        return name

    def master(self, target: str, first: int) -> str:
        """The stored master slice of ``target`` as a float tensor (dequantized where stored int8)."""
        fam = self.family
        region = fam.master[target]
        index = fam.points[first].index[target]
        for dim, pos in index:
            region = region.index_select(dim, pos)
        bits = fam.bits(first, target)
        base = f"shared/{target}"
        if bits is None:
            self.store.add(base, region.detach().numpy().astype(np.float32))
            return self._shared(base)
        qmax = 2 ** (bits - 1) - 1
        flat = region.detach().reshape(region.shape[0], -1).double()
        scale = (flat.abs().amax(dim=1).clamp(min=1e-12) / qmax).float()
        q = torch.clamp(
            torch.round(region.detach() / scale.reshape(-1, *[1] * (region.dim() - 1))), -qmax, qmax
        )
        self.store.add(f"{base}.q", q.numpy().astype(np.int8))
        self.store.add(f"{base}.scale", scale.reshape(-1, *[1] * (region.dim() - 1)).numpy())
        cast = self._op(
            "Cast", [self._shared(f"{base}.q")], f"p{self.k}/{target}/master_f", to=onnx.TensorProto.FLOAT
        )
        return self._op("Mul", [cast, self._shared(f"{base}.scale")], f"p{self.k}/{target}/master")

    def gather(self, source: str, target: str, first: int, tag: str) -> str:
        """Point k's slice of a tensor stored as point ``first``'s slice."""
        fam = self.family
        mine = dict(fam.points[self.k].index[target])
        stored = dict(fam.points[first].index[target])
        out = source
        for dim in sorted(mine):
            base = stored.get(dim)
            pos = mine[dim]
            rel = pos if base is None else torch.searchsorted(base, pos)
            if base is not None and not bool((base[rel.clamp(max=len(base) - 1)] == pos).all()):
                raise ValueError(
                    f"point {self.k}: {target} keeps positions point {first} does not (not nested)"
                )
            size = fam.master[target].shape[dim] if base is None else len(base)
            if len(rel) == size and bool((rel == torch.arange(size)).all()):
                continue
            idx = self._const(f"p{self.k}/{target}/{tag}{dim}", rel.numpy().astype(np.int32))
            out = self._op("Gather", [out, idx], f"p{self.k}/{target}/{tag}_g{dim}", axis=dim)
        return out

    def weight(self, target: str, site: _Site, scale: np.ndarray) -> str:
        """The float weight of ``site`` (ONNX layout), computed from the shared tensors."""
        fam, k = self.family, self.k
        first = fam.first_point(target)
        assert first is not None
        w = self.gather(self.master(target, first), target, first, "w")
        rank = fam.master[target].dim()
        if target in fam.points[k].cm.masks:
            levels = fam.mask_levels(target)
            assert levels is not None
            for dim, pos in fam.points[first].index[target]:
                levels = levels.index_select(dim, pos)
            self.store.add(f"shared/{target}.levels", levels.numpy())
            lv = self.gather(self._shared(f"shared/{target}.levels"), target, first, "m")
            kk = self._const(f"p{k}/{target}/k", np.array(k, dtype=np.uint8))
            keep = self._op("Greater", [lv, kk], f"p{k}/{target}/keep")
            keep_f = self._op("Cast", [keep], f"p{k}/{target}/keep_f", to=onnx.TensorProto.FLOAT)
            w = self._op("Mul", [w, keep_f], f"p{k}/{target}/masked")
        bits = fam.bits(k, target)
        if bits is not None:
            w = self._round(w, target, bits, rank)
        shape = [-1] + [1] * (rank - 1)
        s = self._const(f"p{k}/{target}/row_scale", scale.astype(np.float32).reshape(shape))
        w = self._op("Mul", [w, s], f"p{k}/{target}/scaled")
        if site.transposed:
            w = self._op("Transpose", [w], f"p{k}/{target}/t", perm=[1, 0])
        return w

    def _round(self, w: str, target: str, bits: int, rank: int) -> str:
        """``fake_quantize``'s symmetric per-output-channel rounding, in ONNX ops."""
        p = f"p{self.k}/{target}/fq"
        qmax = float(2 ** (bits - 1) - 1)
        absw = self._op("Abs", [w], f"{p}_abs")
        axes = list(range(1, rank))
        if self.opset >= 18:  # ReduceMax takes its axes as an input from opset 18
            ax = self._const(f"{p}_axes", np.array(axes, dtype=np.int64))
            amax = self._op("ReduceMax", [absw, ax], f"{p}_amax", keepdims=1)
        else:
            amax = self._op("ReduceMax", [absw], f"{p}_amax", axes=axes, keepdims=1)
        tiny = self._const(f"{p}_tiny", np.array(1e-12, dtype=np.float32))
        qm = self._const(f"{p}_qmax", np.array(qmax, dtype=np.float32))
        lo = self._const(f"{p}_lo", np.array(-qmax, dtype=np.float32))
        scale = self._op("Div", [self._op("Max", [amax, tiny], f"{p}_clamp"), qm], f"{p}_scale")
        q = self._op("Round", [self._op("Div", [w, scale], f"{p}_div")], f"{p}_round")
        q = self._op("Clip", [q, lo, qm], f"{p}_clip")
        return self._op("Mul", [q, scale], f"{p}_q")

    def finish(self, replaced: dict[str, str]) -> None:
        """Point the layer nodes at the computed weights; drop initializers nothing reads now."""
        graph = self.model.graph
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in replaced:
                    node.input[i] = replaced[name]
        body = list(self.nodes) + list(graph.node)
        del graph.node[:]
        graph.node.extend(body)  # constant ops first: topological order holds
        graph.initializer.extend(self.inits)
        graph.initializer.extend(self.externals.values())
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _rewrite_point(
    family: Family, k: int, standalone: Path, store: _Store
) -> tuple[onnx.ModelProto, list[str], list[str]]:
    model = onnx.load(str(standalone))
    point = family.points[k]
    sites = _sites(model)
    used: set[int] = set()
    rw = _Rewriter(family, k, store, model)
    replaced: dict[str, str] = {}
    shared_layers: list[str] = []
    private_layers: list[str] = []
    for layer in family.source.graph.layers:
        target = layer.weight
        if target not in point.index:
            continue
        w = get_tensor(point.cm.gm, target).detach().double().numpy()
        rows = w.reshape(w.shape[0], -1)
        hit: tuple[int, np.ndarray] | None = None
        for i, site in enumerate(sites):
            if i in used:
                continue
            scale = _row_scale(site.rows, rows)
            if scale is not None:
                hit = (i, scale)
                break
        if hit is None:
            private_layers.append(layer.name)
            continue
        i, scale = hit
        site = sites[i]
        if site.dq is None:
            resid = np.abs(site.rows - scale[:, None] * rows).max() / max(np.abs(site.rows).max(), 1e-30)
            if resid > _FLOAT_RESIDUAL:
                private_layers.append(layer.name)
                continue
        used.add(i)
        w_out = rw.weight(target, site, scale)
        if site.dq is not None:
            dq = site.dq
            extra = list(dq.input[1:3])
            axis = [a for a in dq.attribute if a.name == "axis"]
            quant = helper.make_node(
                "QuantizeLinear", [w_out, *extra], [f"p{k}/{target}/int8"], name=f"p{k}/{target}/int8"
            )
            quant.attribute.extend(axis)
            rw.nodes.append(quant)
            replaced[site.init] = quant.output[0]
        else:
            replaced[site.init] = w_out
        shared_layers.append(layer.name)
    rw.finish(replaced)
    return model, shared_layers, private_layers


def _check_inputs(example: torch.Tensor, x_check: np.ndarray | None) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    randoms = torch.randn((4, *example.shape[1:]), generator=generator).numpy()
    if x_check is None or len(x_check) == 0:
        return randoms
    return np.concatenate([np.asarray(x_check[:28], dtype=np.float32), randoms])


def write_bundle(
    family: Family,
    folder: Path,
    calibration: Sequence[np.ndarray],
    *,
    x_check: np.ndarray | None = None,
    keep_standalone: bool = False,
    with_dense: bool = True,
) -> BundleFiles:
    """Write ``family`` into ``folder`` (created; files of an earlier bundle are replaced).

    Args:
        calibration: input batches for the int8 activation ranges of quantized layers (the
            product's export uses 8 batches of 64 training images).
        x_check: real inputs on which every bundle graph must agree with its standalone file
            (plus 4 random inputs).
        keep_standalone: also leave each point's standalone file as ``standalone/point_<k>.onnx``
            (not part of the bundle: the K separate files it is compared with).
        with_dense: write the dense model as ``standalone/dense.onnx`` too (for timing
            the points against it; not part of the bundle).

    Raises:
        ExportError: a point cannot be exported, or a bundle graph disagrees with its
            standalone file by more than 1e-3 (relative, on the logits).
    """
    from compression.onnx_export import ExportError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("point_*.onnx"):
        old.unlink()
    side = folder / "standalone"
    if side.exists():
        shutil.rmtree(side)
    if keep_standalone or with_dense:
        side.mkdir()
    example = family.source.example_input(2)
    check = _check_inputs(example, x_check)
    store = _Store(folder / WEIGHTS_FILE)
    points: list[PointFiles] = []
    standalone: list[Path] = []
    dense_file: Path | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="mt-family-") as tmp:
            if with_dense:
                dense_file = export_onnx(family.source.gm, example, side / "dense.onnx")
            for k, point in enumerate(family.points):
                fp32 = export_onnx(float_graph(point.cm.gm), example, Path(tmp) / f"fp32_{k}.onnx")
                alone = Path(tmp) / f"point_{k}.onnx"
                if point.cm.bits:
                    with full_range_weights():  # the master grid is 8-bit (see full_range_weights)
                        export_policy_onnx(point.cm, fp32, calibration, alone)
                else:
                    shutil.copyfile(fp32, alone)
                model, shared_layers, private_layers = _rewrite_point(family, k, alone, store)
                store.fh.flush()
                out = folder / f"point_{k}.onnx"
                out.write_bytes(model.SerializeToString())
                want = OnnxModel(alone).run(check)
                got = OnnxModel(out).run(check)
                err = max_relative_error(got, want)
                if not err <= 1e-3:
                    raise ExportError(
                        f"bundle graph of point {k} disagrees with its standalone export: max relative "
                        f"error {err:.3g} > 1e-3"
                    )
                if keep_standalone:
                    standalone.append(Path(shutil.copyfile(alone, side / f"point_{k}.onnx")))
                points.append(
                    PointFiles(
                        file=out.name,
                        graph_bytes=out.stat().st_size,
                        standalone_bytes=alone.stat().st_size,
                        shared_layers=tuple(shared_layers),
                        private_layers=tuple(private_layers),
                        max_rel_error=err,
                    )
                )
    finally:
        store.close()
    data = (folder / WEIGHTS_FILE).read_bytes()
    return BundleFiles(
        folder=folder,
        points=tuple(points),
        weights_bytes=len(data),
        weights_sha256=hashlib.sha256(data).hexdigest(),
        dense_file=dense_file,
        standalone=tuple(standalone),
    )
