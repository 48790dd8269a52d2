"""Hostile uploads built at test time from a real ``.pt2``, and the fixtures that send them.

Each code-execution payload's object creates a marker file (named after the payload) in
``markers`` when it is unpickled or evaluated, so a test only has to look for files there.
Bombs are zip archives written here byte by byte: their zero-filled members are deflate
streams made of one repeated block, so a 2 GiB member costs milliseconds to build, and a
member's declared size can differ from what it inflates to. ``bench/upload_bombs.py``
reuses these builders.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.testing import BACKENDS, fresh_database

_BLOCK = 16 * 1024 * 1024


class Touch:
    """Unpickling this opens ``path`` for writing, i.e. creates the marker file: code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@dataclass(frozen=True)
class Zeros:
    """A deflated member: ``prefix`` then ``count`` zero bytes; its headers claim ``declared``
    bytes (default: the truth)."""

    count: int
    prefix: bytes = b""
    declared: int | None = None


def _deflated_zeros(member: Zeros) -> tuple[bytes, int]:
    """(raw deflate stream, CRC-32) of ``prefix + count`` zeros, from one repeated flushed block."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(member.prefix) + co.flush(zlib.Z_FULL_FLUSH)
    chunk = bytes(_BLOCK)
    block = co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH)  # a full flush makes it repeatable
    whole, rest = divmod(member.count, _BLOCK)
    tail = co.compress(bytes(rest)) + co.flush()
    crc = zlib.crc32(member.prefix)
    for _ in range(whole):
        crc = zlib.crc32(chunk, crc)
    return head + block * whole + tail, zlib.crc32(bytes(rest), crc)


def build_zip(members: dict[str, bytes | Zeros]) -> bytes:
    """A zip of ``members`` (bytes: stored; :class:`Zeros`: deflated), without zip64."""
    out = io.BytesIO()
    central = []
    for name, member in members.items():
        if isinstance(member, Zeros):
            data, crc = _deflated_zeros(member)
            method, size = zipfile.ZIP_DEFLATED, len(member.prefix) + member.count
            size = size if member.declared is None else member.declared
        else:
            data, crc, method, size = member, zlib.crc32(member), zipfile.ZIP_STORED, len(member)
        raw = name.encode()
        fields = (20, 0, method, 0, 0x21, crc, len(data), size, len(raw))
        central.append(
            struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, 0, out.tell()) + raw
        )
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + raw + data)
    start = out.tell()
    for entry in central:
        out.write(entry)
    out.write(
        struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0)
    )
    return out.getvalue()


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


def rewrite_zip(
    src: Path,
    *,
    replace: dict[str, bytes | Zeros] | None = None,
    edit_json: dict[str, Callable[[Any], Any]] | None = None,
) -> bytes:
    """A copy of the archive ``src`` with members (named relative to its root folder) replaced
    or added, or their JSON edited."""
    replace = dict(replace or {})
    members: dict[str, bytes | Zeros] = {}
    with zipfile.ZipFile(src) as zin:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename[len(root) + 1 :]
            data = replace.pop(rel) if rel in replace else zin.read(info)
            if edit_json and rel in edit_json and isinstance(data, bytes):
                data = json.dumps(edit_json[rel](json.loads(data))).encode()
            members[info.filename] = data
    members.update({f"{root}/{rel}": data for rel, data in replace.items()})
    return build_zip(members)


def torch_saved(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
# Variants the rebuilt archive leaves out (the upload is accepted without them); the others are refused.
STRIPPED = {"sample inputs", "guards code"}


def _add_pickled(name: str, path_name: str) -> Callable[[Any], Any]:
    def edit(doc: Any) -> Any:
        doc["config"][name] = {
            "path_name": path_name,
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
        return doc

    return edit


def code_execution_payloads(src: Path, markers: Path) -> dict[str, bytes]:
    """Copies of the real archive ``src`` that run code in plain ``torch.export.load`` and a
    call of the loaded module's ``forward``: each creates ``markers/<its name>``."""

    def touch(name: str) -> Touch:
        return Touch(markers / re.sub(r"\W", "-", name))

    def pickled_weight(doc: Any) -> Any:
        doc["config"]["0.weight"]["use_pickle"] = True
        return doc

    def evil_expr(doc: Any) -> Any:
        path = str(markers / "shape-expression")
        for meta in doc["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = f"open({path!r}, 'w') and {size['as_expr']['expr_str']}"
        return doc

    def evil_guard(doc: Any) -> Any:
        doc["guards_code"] = [f"open({str(markers / 'guards-code')!r}, 'w') is not None"]
        return doc

    def evil_keys(doc: Any) -> Any:  # FX writes the input spec's dict keys into forward's source
        key = f"x': open({str(markers / 'tree-spec-keys')!r}, 'w'), 'input"
        leaf: dict[str, Any] = {"type": None, "context": None, "children_spec": []}
        args = {"type": "builtins.tuple", "context": "null", "children_spec": []}
        kwargs = {"type": "builtins.dict", "context": json.dumps([key]), "children_spec": [leaf]}
        spec = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [args, kwargs]}]
        doc["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = json.dumps(spec)
        return doc

    return {
        "sample inputs": rewrite_zip(
            src, replace={"data/sample_inputs/model.pt": torch_saved(((touch("sample inputs"),), {}))}
        ),
        "use_pickle weight": rewrite_zip(
            src,
            replace={"data/weights/weight_0": torch_saved(touch("use_pickle weight"))},
            edit_json={WEIGHTS: pickled_weight},
        ),
        "use_pickle tensor constant": rewrite_zip(
            src,
            replace={"data/constants/tensor_constant_0": torch_saved(touch("use_pickle tensor constant"))},
            edit_json={CONSTANTS: _add_pickled("c0", "tensor_constant_0")},
        ),
        "opaque constant": rewrite_zip(
            src,
            replace={"data/constants/opaque_obj_0": pickle.dumps(touch("opaque constant"))},
            edit_json={CONSTANTS: _add_pickled("o0", "opaque_obj_0")},
        ),
        # Found while studying the format: sympify evals shapes, the guards function execs code,
        # FX pastes spec keys into the generated forward.
        "shape expression": rewrite_zip(src, edit_json={"models/model.json": evil_expr}),
        "guards code": rewrite_zip(src, edit_json={"models/model.json": evil_guard}),
        "tree spec keys": rewrite_zip(src, edit_json={"models/model.json": evil_keys}),
    }


def _resize_weight(sizes: list[int]) -> Callable[[Any], Any]:
    def edit(doc: Any) -> Any:
        meta = doc["config"]["0.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": s} for s in sizes]
        meta["strides"] = [{"as_int": int(np.prod(sizes[i + 1 :]))} for i in range(len(sizes))]
        return doc

    return edit


def pt2_huge_weight(src: Path, numel: int) -> bytes:
    """The archive with its first weight grown to ``numel`` float zeros, deflated (small on the wire)."""
    return rewrite_zip(
        src, replace={"data/weights/weight_0": Zeros(4 * numel)}, edit_json={WEIGHTS: _resize_weight([numel])}
    )


def pt2_huge_declared(src: Path, sizes: list[int]) -> bytes:
    """The archive declaring a weight of ``sizes`` over an empty record (torch fills it with zeros)."""
    return rewrite_zip(
        src, replace={"data/weights/weight_0": b""}, edit_json={WEIGHTS: _resize_weight(sizes)}
    )


def pt2_lying_member(src: Path, inflates_to: int) -> bytes:
    """The archive whose first weight inflates to ``inflates_to`` bytes while its zip headers
    still declare the real 144."""
    return rewrite_zip(src, replace={"data/weights/weight_0": Zeros(inflates_to, declared=144)})


def npz_arrays(n: int = 40, size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 255, (n, 1, size, size), dtype=np.uint8),
        "y_train": np.arange(n) % 3,
        "x_val": rng.integers(0, 255, (n // 2, 1, size, size), dtype=np.uint8),
        "y_val": np.arange(n // 2) % 3,
    }


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npz_bomb(unpacked_bytes: int, *, declared: int | None = None) -> bytes:
    """A valid .npz whose uint8 x_train (64 zero images) inflates to about ``unpacked_bytes``
    (``declared``: the member size its zip headers claim instead)."""
    side = int((unpacked_bytes // 64) ** 0.5)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (64, 1, side, side)}
    )
    members: dict[str, bytes | Zeros] = {
        "x_train.npy": Zeros(64 * side * side, prefix=header.getvalue(), declared=declared)
    }
    for key, arr in npz_arrays(64).items():
        if key != "x_train":
            members[f"{key}.npy"] = npy_bytes(arr)
    return build_zip(members)


def issue_bombs(src: Path) -> dict[str, tuple[str, bytes]]:
    """The issue's bombs made from the archive ``src``: name -> (endpoint, payload), each a few
    MB inflating to gigabytes."""
    return {
        "npz inflating to 2.4 GB": ("datasets", npz_bomb(2_400_000_000)),
        "pt2 with a 2 GiB weight": ("models", pt2_huge_weight(src, 512 * 1024**2)),
        "pt2 declaring a [1, 8192, 65536] weight": ("models", pt2_huge_declared(src, [1, 8192, 65536])),
        "pt2 whose weight member lies about its size": ("models", pt2_lying_member(src, 2 * 1024**3)),
        "npz whose x_train member lies about its size": ("datasets", npz_bomb(860_000_000, declared=10_000)),
        "npz inflating to 0.86 GB": ("datasets", npz_bomb(860_000_000)),
    }


class PeakRss:
    """Peak resident memory of a process (VmHWM) and of its children, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def hwm(pid: int) -> int:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0
        line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
        return int(line.split()[1]) * 1024

    def children(self) -> list[int]:
        pids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return pids

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            for child in self.children():
                self.children_peak = max(self.children_peak, self.hwm(child))

    @property
    def server_peak(self) -> int:
        return self.hwm(self.pid)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database; each test runs on SQLite and on PostgreSQL."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def real_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``torch.export.save`` archive every payload is made from."""
    return tiny_model_pt2(tmp_path_factory.mktemp("pt2") / "tiny.pt2")
