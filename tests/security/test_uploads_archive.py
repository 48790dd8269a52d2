"""The static archive check (``compression.archive_check``) on its own: what it refuses and why.

Each hostile archive is a real ``.pt2`` or ``.npz`` with one thing changed; the check must
name the problem before torch or numpy read anything.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compression.archive_check import MAX_MEMBERS, ArchiveLimits, rebuild_pt2
from compression.data import DataError, DataTooLargeError, load_npz
from compression.model_io import ModelLoadError, ModelTooLargeError, load_pt2
from tests.security.conftest import (
    WEIGHTS,
    Zeros,
    build_zip,
    npy_bytes,
    npz_arrays,
    npz_bomb,
    npz_bytes,
    pt2_huge_declared,
    rewrite_zip,
)

MODEL = "models/model.json"


def _nodes(doc: Any, fn: Callable[[dict[str, Any]], None]) -> Any:
    for node in doc["graph_module"]["graph"]["nodes"]:
        fn(node)
    return doc


def _retarget(target: str) -> Callable[[Any], Any]:
    def edit(doc: Any) -> Any:
        def one(node: dict[str, Any]) -> None:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = target

        return _nodes(doc, one)

    return edit


def _custom_obj(doc: Any) -> Any:
    doc["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {
        "as_custom_obj": {"name": "x", "class_fqn": "a.B"}
    }
    return doc


def _namedtuple_spec(doc: Any) -> Any:
    sig = doc["graph_module"]["module_call_graph"][0]["signature"]
    sig["out_spec"] = '[1, {"type": "collections.namedtuple", "context": "null", "children_spec": []}]'
    return doc


def _expr(text: str) -> Callable[[Any], Any]:
    def edit(doc: Any) -> Any:
        for meta in doc["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = text
        return doc

    return edit


def _weight_meta(**changes: Any) -> Callable[[Any], Any]:
    def edit(doc: Any) -> Any:
        doc["config"]["0.weight"]["tensor_meta"].update(changes)
        return doc

    return edit


def _rename_weight(doc: Any) -> Any:
    doc["config"]["__class__"] = doc["config"].pop("0.weight")
    return doc


def _forward_args(doc: Any) -> Any:
    doc["graph_module"]["module_call_graph"][0]["signature"]["forward_arg_names"] = ["input=open('x', 'w')"]
    return doc


def _range(doc: Any) -> Any:
    doc["range_constraints"]["__import__('os')"] = {"min_val": 1, "max_val": 2}
    return doc


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "call target outside aten": (
        {"edit_json": {MODEL: _retarget("torch.os.system")}},
        "not an aten operator",
    ),
    "aten op reading files": (
        {"edit_json": {MODEL: _retarget("torch.ops.aten.from_file.default")}},
        "unchecked",
    ),
    "dunder call target": ({"edit_json": {MODEL: _retarget("torch.ops.aten.__class__.x")}}, "not an aten"),
    "custom object argument": ({"edit_json": {MODEL: _custom_obj}}, "custom objects"),
    "named tuple tree spec": ({"edit_json": {MODEL: _namedtuple_spec}}, "tree spec type"),
    "expression calling a builtin": ({"edit_json": {MODEL: _expr("exec(Symbol('s1'))")}}, "uses 'exec'"),
    "expression with attribute access": (
        {"edit_json": {MODEL: _expr("Symbol('s1').__class__")}},
        "forbidden",
    ),
    "expression with a string argument": ({"edit_json": {MODEL: _expr("Max('s1', Integer(2))")}}, "string"),
    "range on a non-symbol": ({"edit_json": {MODEL: _range}}, "not a shape symbol"),
    "forward argument names": ({"edit_json": {MODEL: _forward_args}}, "not identifiers"),
    "weight path with a dunder": ({"edit_json": {WEIGHTS: _rename_weight}}, "not a module path"),
    "weight on another device": ({"edit_json": {WEIGHTS: _weight_meta(device={"type": "cuda"})}}, "CPU"),
    "weight of a complex dtype": ({"edit_json": {WEIGHTS: _weight_meta(dtype=10)}}, "dtype code 10"),
    "weight larger than its bytes": (
        {"edit_json": {WEIGHTS: _weight_meta(storage_offset={"as_int": 9})}},
        "span",
    ),
    "AOTInductor code": ({"replace": {"data/aotinductor/model/model.so": b"\x7fELF"}}, "not part of a plain"),
    "a second model": ({"replace": {"models/other.json": b"{}"}}, "not part of a plain"),
    "extra files": ({"replace": {"extra/notes.txt": b"hi"}}, "not part of a plain"),
    "legacy pickled weights": ({"replace": {"data/weights/model.pt": b"\x80\x04N."}}, "not part of a plain"),
    "big-endian archive": ({"replace": {"byteorder": b"big"}}, "little-endian"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_pt2_outside_the_allow_list_is_refused(case: str, real_pt2: Path, tmp_path: Path) -> None:
    changes, needle = REFUSED[case]
    path = tmp_path / "m.pt2"
    path.write_bytes(rewrite_zip(real_pt2, **changes))
    with pytest.raises(ModelLoadError, match=r"not a loadable torch\.export archive") as info:
        load_pt2(path)
    assert needle in str(info.value), str(info.value)


def test_the_rebuilt_archive_holds_only_checked_parts(real_pt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean.pt2"
    rebuild_pt2(real_pt2, out, ArchiveLimits())
    with zipfile.ZipFile(out) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
        assert zf.read(next(n for n in zf.namelist() if n.endswith("sample_inputs/model.pt"))) == b""
        program = zf.read(next(n for n in zf.namelist() if n.endswith(MODEL)))
    assert {n for n in names if not n.startswith("data/weights/weight_")} == {
        MODEL,
        WEIGHTS,
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
        "byteorder",
        "archive_format",
        "archive_version",
        ".data/version",
        ".data/serialization_id",
    }
    assert b'"guards_code": []' in program and b"stack_trace" not in program


def test_limits_are_checked_before_anything_is_read(real_pt2: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    path.write_bytes(pt2_huge_declared(real_pt2, [1, 8192, 65536]))
    with pytest.raises(ModelTooLargeError, match=r"536,870,912.*MODELTAILOR_MAX_MODEL_PARAMS"):
        load_pt2(path, limits=ArchiveLimits(max_model_params=100_000_000))
    with pytest.raises(ModelLoadError, match="spanning 2,147,483,648 bytes"):  # no limit: still inconsistent
        load_pt2(path)
    with pytest.raises(ModelTooLargeError, match="MODELTAILOR_MAX_UNPACKED_BYTES"):
        load_pt2(real_pt2, limits=ArchiveLimits(max_unpacked_bytes=10_000))


def test_a_directory_with_too_many_members_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "many.pt2"
    path.write_bytes(build_zip({"a/x": b""}))
    data = bytearray(path.read_bytes())
    struct.pack_into("<HH", data, len(data) - 22 + 8, MAX_MEMBERS + 1, MAX_MEMBERS + 1)  # the end record
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="at most 10,000"):
        load_pt2(path)


def _npz(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "d.npz"
    path.write_bytes(payload)
    return path


def test_npz_headers_are_checked_against_the_member_size(tmp_path: Path) -> None:
    arrays = npz_arrays()
    header_lies = npy_bytes(np.zeros((10, 10), np.uint8)).replace(b"(10, 10)", b"(10000, 10000)")
    members: dict[str, bytes | Zeros] = {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()}
    with pytest.raises(DataError, match=r"x_train declares shape \(10000, 10000\)"):
        load_npz(_npz(tmp_path, build_zip({**members, "x_train.npy": header_lies})))
    with pytest.raises(DataError, match="x_train declares shape"):  # the zip size lies, the header does not
        load_npz(_npz(tmp_path, npz_bomb(100_000_000, declared=5_000)))
    with pytest.raises(DataError, match="CRC"):  # both lie together: the read stops at the size and fails
        header = npy_bytes(np.zeros((50,), np.uint8))[:-50]
        load_npz(
            _npz(
                tmp_path,
                build_zip({**members, "x_train.npy": Zeros(100_000_000, header, declared=len(header) + 50)}),
            )
        )
    with pytest.raises(DataError, match="only plain numeric"):
        load_npz(_npz(tmp_path, npz_bytes({**arrays, "x_val": np.array(["a", "b"])})))


def test_npz_limits_name_their_setting(tmp_path: Path) -> None:
    path = _npz(tmp_path, npz_bytes(npz_arrays()))
    with pytest.raises(
        DataTooLargeError, match=r"3,900, over the limit of 3,899 \(MODELTAILOR_MAX_DATASET_ELEMENTS\)"
    ):
        load_npz(path, limits=ArchiveLimits(max_dataset_elements=3899))
    with pytest.raises(DataTooLargeError, match="MODELTAILOR_MAX_UNPACKED_BYTES"):
        load_npz(path, limits=ArchiveLimits(max_unpacked_bytes=1000))
    assert (
        load_npz(path, limits=ArchiveLimits(max_dataset_elements=3900, max_unpacked_bytes=10**6)).num_classes
        == 3
    )
