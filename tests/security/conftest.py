"""Hostile uploads built at test time from a real ``.pt2``, and the servers they are sent to.

Each code-execution payload's object creates ``marker`` when it is unpickled or evaluated, so
a test only has to look for that file. The bench ``bench/upload_bombs.py`` reuses the bombs.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.testing import BACKENDS, fresh_database


class Touch:
    """Unpickling this opens ``path`` for writing, i.e. creates the marker file: code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def tiny_model_pt2(path: Path) -> Path:
    """A small conv net saved with ``torch.export.save`` (dynamic batch)."""
    import torch

    from compression.model_io import save_pt2

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    )
    return save_pt2(net, torch.randn(2, 1, 8, 8), path)


def _write_zeros(zout: zipfile.ZipFile, name: str, count: int) -> None:
    """A deflated member of ``count`` zero bytes, streamed (never ``count`` bytes in memory)."""
    chunk = bytes(16 * 1024 * 1024)
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zout.open(info, "w", force_zip64=count >= 2**31) as f:
        while count > 0:
            f.write(chunk[: min(count, len(chunk))])
            count -= len(chunk)


def rewrite_zip(
    src: Path,
    *,
    replace: dict[str, bytes | int] | None = None,
    edit_json: dict[str, Callable[[Any], Any]] | None = None,
) -> bytes:
    """A copy of the archive ``src`` with members (named relative to its root folder) replaced
    or added (an int: that many zero bytes, deflated) or their JSON edited."""
    replace = dict(replace or {})
    edit_json = edit_json or {}
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename[len(root) + 1 :]
            data = replace.pop(rel, None)
            if isinstance(data, int):
                _write_zeros(zout, info.filename, data)
                continue
            if data is None:
                data = zin.read(info)
                if rel in edit_json:
                    data = json.dumps(edit_json[rel](json.loads(data))).encode()
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=zipfile.ZIP_STORED)
        for rel, data in replace.items():
            if isinstance(data, int):
                _write_zeros(zout, f"{root}/{rel}", data)
            else:
                zout.writestr(f"{root}/{rel}", data)
    return out.getvalue()


def torch_saved(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _meta(path_name: str) -> dict[str, Any]:
    return {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}


def _add_const(name: str, path_name: str) -> Callable[[Any], Any]:
    def edit(doc: Any) -> Any:
        doc["config"][name] = _meta(path_name)
        return doc

    return edit


def _pickle_weight(doc: Any) -> Any:
    doc["config"]["0.weight"]["use_pickle"] = True
    return doc


def code_execution_payloads(src: Path, marker: Path) -> dict[str, bytes]:
    """Copies of the real archive ``src`` that run code (create ``marker``) in plain ``torch.export.load``."""
    evil = Touch(marker)
    weights, consts = "data/weights/model_weights_config.json", "data/constants/model_constants_config.json"

    def evil_expr(doc: Any) -> Any:
        for meta in doc["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = (
                        f"open({str(marker)!r}, 'w') and {size['as_expr']['expr_str']}"
                    )
        return doc

    def evil_guard(doc: Any) -> Any:
        doc["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
        return doc

    return {
        "sample inputs": rewrite_zip(
            src, replace={"data/sample_inputs/model.pt": torch_saved(((evil,), {}))}
        ),
        "use_pickle weight": rewrite_zip(
            src, replace={"data/weights/weight_0": torch_saved(evil)}, edit_json={weights: _pickle_weight}
        ),
        "use_pickle tensor constant": rewrite_zip(
            src,
            replace={"data/constants/tensor_constant_0": torch_saved(evil)},
            edit_json={consts: _add_const("c0", "tensor_constant_0")},
        ),
        "opaque constant": rewrite_zip(
            src,
            replace={"data/constants/opaque_obj_0": pickle.dumps(evil)},
            edit_json={consts: _add_const("o0", "opaque_obj_0")},
        ),
        # Found while studying the format: sympify evals shapes, ExportedProgram.module() execs guards.
        "shape expression": rewrite_zip(src, edit_json={"models/model.json": evil_expr}),
        "guards code": rewrite_zip(src, edit_json={"models/model.json": evil_guard}),
    }


def pt2_huge_weight(src: Path, numel: int) -> bytes:
    """The archive with its first weight grown to ``numel`` float zeros, deflated (small on the wire)."""

    def grow(doc: Any) -> Any:
        meta = doc["config"]["0.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": numel}]
        meta["strides"] = [{"as_int": 1}]
        return doc

    return rewrite_zip(
        src,
        replace={"data/weights/weight_0": 4 * numel},
        edit_json={"data/weights/model_weights_config.json": grow},
    )


def pt2_lying_member(src: Path, inflates_to: int) -> bytes:
    """The archive whose first weight inflates to ``inflates_to`` bytes while the zip directory
    and local header still declare its real 144 bytes."""
    return lying_zip(rewrite_zip(src, replace={"data/weights/weight_0": inflates_to}), "/weight_0", 144)


def pt2_huge_declared(src: Path, sizes: list[int]) -> bytes:
    """The archive declaring a weight of ``sizes`` over an empty record (torch fills it with zeros)."""

    def grow(doc: Any) -> Any:
        meta = doc["config"]["0.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": s} for s in sizes]
        strides, acc = [], 1
        for s in reversed(sizes):
            strides.insert(0, {"as_int": acc})
            acc *= s
        meta["strides"] = strides
        return doc

    return rewrite_zip(
        src,
        replace={"data/weights/weight_0": b""},
        edit_json={"data/weights/model_weights_config.json": grow},
    )


def lying_zip(data: bytes, member_suffix: str, declared: int) -> bytes:
    """``data`` (a zip) with the uncompressed size of the member ending in ``member_suffix``
    rewritten to ``declared`` in its local header and its central directory entry."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    size = declared.to_bytes(4, "little")
    buf[info.header_offset + 22 : info.header_offset + 26] = size
    name = info.filename.encode()
    pos = bytes(buf).find(b"PK\x01\x02")
    while bytes(buf[pos + 46 : pos + 46 + len(name)]) != name:
        pos = bytes(buf).find(b"PK\x01\x02", pos + 4)
    buf[pos + 24 : pos + 28] = size
    return bytes(buf)


def npz_arrays(n: int = 40, size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 255, (n, 1, size, size), dtype=np.uint8),
        "y_train": np.arange(n) % 3,
        "x_val": rng.integers(0, 255, (n // 2, 1, size, size), dtype=np.uint8),
        "y_val": np.arange(n // 2) % 3,
    }


def npz_bytes(arrays: dict[str, np.ndarray], *, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)  # type: ignore[operator]
    return buf.getvalue()


def npz_bomb(unpacked_bytes: int) -> bytes:
    """A valid .npz whose uint8 x_train (64 zero images) inflates to about ``unpacked_bytes``."""
    side = int((unpacked_bytes // 64) ** 0.5)
    arrays = npz_arrays(64)
    del arrays["x_train"]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (64, 1, side, side)}
    )
    out = io.BytesIO()
    info = zipfile.ZipInfo("x_train.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open(info, "w", force_zip64=64 * side * side >= 2**31) as f:
            f.write(header.getvalue())
            chunk, left = bytes(16 * 1024 * 1024), 64 * side * side
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{key}.npy", buf.getvalue())
    return out.getvalue()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database; each test runs on SQLite and on PostgreSQL."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def real_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_pt2(tmp_path_factory.mktemp("pt2") / "tiny.pt2")
