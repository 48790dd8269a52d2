"""Static checks of users' zip archives (``.pt2``, ``.npz``) before anything is inflated or unpickled.

Every limit is checked from the zip directory and the archive's own metadata first, and
every member is then read through a reader that never returns more than the size the
directory declares (Python's ``zipfile`` stops at that size and checks the CRC), so a
member whose header lies about its size is refused instead of inflated.

``.pt2`` (:func:`rebuild_pt2`): ``torch.export.load`` unpickles the sample inputs (with a
silent ``weights_only=False`` fallback), weights and constants marked ``use_pickle``,
opaque constants (``pickle.loads``) and custom objects; it ``eval``s every symbolic-shape
expression (``sympy.sympify``) and ``exec``s the archive's ``guards_code``; and the graph
may name any ``torch.*`` attribute as a call target. So the archive is validated against an
allow-list and then **rebuilt** from its checked parts into a fresh archive, which is the
only thing torch reads:

* members: ``models/model.json``, ``data/weights/model_weights_config.json`` +
  ``weight_<n>``, ``data/constants/model_constants_config.json`` + ``tensor_constant_<n>``,
  ``data/sample_inputs/model.pt`` (dropped: the rebuilt archive has no sample inputs, so
  nothing is unpickled) and the format's small marker files; anything else (AOTInductor
  code, custom or opaque objects, legacy pickled weights, extra files, other models) is refused;
* payload configs: raw tensors only (``use_pickle`` false), CPU, strided, numeric dtypes,
  concrete sizes whose strided span fits in the member's bytes;
* ``model.json``: call targets are ``torch.ops.aten`` operators (except those that read or
  write files or skip bounds checks) and a few ``operator`` / ``math`` / ``torch.sym_*``
  functions; no custom objects, operator or subgraph arguments; symbolic expressions are
  sympy ``srepr`` text over an allow-list of names (no attribute access, calls only of known
  sympy / torch shape functions); tree specs only of tuples, lists and dicts; names, dict
  keys and forward argument names (FX writes them into generated source) are identifiers,
  module paths dotted identifiers; ``guards_code`` and node metadata are dropped;
* limits: the members' declared sizes add up to at most ``max_unpacked_bytes``; weights and
  constants declare at most ``max_model_params`` elements together, and no graph value more
  than that per sample.

``.npz`` (:func:`read_npz`): each ``.npy`` header is parsed first (no object or structured
dtypes), its declared shape x itemsize must equal the member's size, and the data is read
into an array of exactly that size, never through a pickle.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ArchiveError",
    "ArchiveLimitError",
    "ArchiveLimits",
    "open_zip",
    "read_member",
    "read_npz",
    "rebuild_pt2",
]

# Format ceilings that hold whatever the settings say: a real archive is far below them.
MAX_MEMBERS = 10_000
MAX_CENTRAL_DIRECTORY_BYTES = 16 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_EXPR_CHARS = 4096
_CHUNK = 1024 * 1024


class ArchiveError(ValueError):
    """The archive is malformed or holds something that is not allowed; says which member and why."""


class ArchiveLimitError(ArchiveError):
    """The archive is over a size limit; the message names the limit and its setting."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Resource limits of one archive (None: no limit; the format ceilings above still hold).

    The messages name the service settings these come from (``MODELTAILOR_<FIELD>``).
    """

    max_unpacked_bytes: int | None = None
    max_model_params: int | None = None
    max_dataset_elements: int | None = None


def _over(what: str, value: int, limit: int, setting: str) -> ArchiveLimitError:
    return ArchiveLimitError(f"{what} is {value:,}, over the limit of {limit:,} (MODELTAILOR_{setting})")


# --------------------------------------------------------------------------- zip reading


def _directory_size(path: Path) -> tuple[int, int]:
    """(entries, central directory bytes) from the end record, found as ``zipfile`` finds it.

    ``zipfile.ZipFile`` builds an object per directory entry up front, so a small file with
    millions of tiny entries would exhaust memory before any other check could run.
    """
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        tail_len = min(size, 22 + 65535 + 20 + 56)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    no_comment = tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\0\0"
    pos = len(tail) - 22 if no_comment else tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise ArchiveError("not a zip archive (no end-of-directory record)")
    entries, cd_size = struct.unpack("<HI", tail[pos + 10 : pos + 16])
    if pos >= 20 + 56 and tail[pos - 20 : pos - 16] == b"PK\x06\x07":  # zip64: its counts win
        record = tail[pos - 20 - 56 : pos - 20]
        if record[:4] == b"PK\x06\x06":
            entries, cd_size = struct.unpack("<QQ", record[32:48])
    return int(entries), int(cd_size)


def open_zip(path: Path, limits: ArchiveLimits) -> zipfile.ZipFile:
    """Open a zip after checking its directory: entry count, encryption, methods, unpacked total.

    Raises:
        ArchiveError: not a zip, encrypted members, unsupported compression, too many members.
        ArchiveLimitError: the members' declared sizes add up to more than ``max_unpacked_bytes``.
    """
    entries, cd_size = _directory_size(path)
    if entries > MAX_MEMBERS or cd_size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise ArchiveError(
            f"the archive declares {entries:,} members in a {cd_size:,}-byte directory; "
            f"at most {MAX_MEMBERS:,} members are accepted"
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ArchiveError(f"corrupt zip archive: {exc}") from None
    try:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveError(
                f"the archive has {len(infos):,} members; at most {MAX_MEMBERS:,} are accepted"
            )
        for info in infos:
            if info.flag_bits & 0x1:
                raise ArchiveError(f"member {info.filename!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArchiveError(
                    f"member {info.filename!r} uses compression method {info.compress_type}; "
                    "only stored and deflate are accepted"
                )
        total = sum(info.file_size for info in infos)
        if limits.max_unpacked_bytes is not None and total > limits.max_unpacked_bytes:
            raise _over(
                "the archive's unpacked size (bytes)", total, limits.max_unpacked_bytes, "MAX_UNPACKED_BYTES"
            )
    except BaseException:
        zf.close()
        raise
    return zf


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's bytes in chunks: exactly its declared size, CRC checked, never more."""
    left = info.file_size
    try:
        with zf.open(info) as f:
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise ArchiveError(
                        f"member {info.filename!r} is shorter than its declared {info.file_size:,} bytes"
                    )
                left -= len(chunk)
                yield chunk
            if f.read(1):  # ZipExtFile stops at the declared size; this also runs the CRC check
                raise ArchiveError(f"member {info.filename!r} is longer than its declared size")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ArchiveError(f"member {info.filename!r} is corrupt: {exc}") from None


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, at most its declared size (see :func:`_chunks`)."""
    return b"".join(_chunks(zf, info))


# --------------------------------------------------------------------------- .npz


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length) of a ``.npy`` member, read from its first bytes."""
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ArchiveError(f"{info.filename}: .npy format version {version} is not supported")
            header_len = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
        raise ArchiveError(f"{info.filename}: not a valid .npy array: {exc}") from None
    return tuple(int(d) for d in shape), bool(fortran), dtype, header_len


def read_npz(
    path: Path, keys: Iterable[str], limits: ArchiveLimits
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read the arrays ``keys`` (those present) of an ``.npz``, checking every header first.

    Returns the arrays read and the names of all the archive's arrays.

    Raises:
        ArchiveError: corrupt members, object / structured arrays, a header that disagrees
            with the member's size.
        ArchiveLimitError: more than ``max_unpacked_bytes`` unpacked, or more than
            ``max_dataset_elements`` elements in the arrays read.
    """
    with open_zip(path, limits) as zf:
        members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
        wanted = [(key, members[key]) for key in keys if key in members]
        headers = {}
        elements = 0
        for key, info in wanted:
            shape, fortran, dtype, header_len = _npy_header(zf, info)
            if dtype.hasobject:
                raise ArchiveError(f"{key} is an object array (pickled data), refused")
            if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
                raise ArchiveError(f"{key} has dtype {dtype}; only plain numeric arrays are accepted")
            count = math.prod(shape)
            if header_len + count * dtype.itemsize != info.file_size:
                raise ArchiveError(
                    f"{key} declares shape {shape} of {dtype} ({count * dtype.itemsize:,} bytes) but its "
                    f"member holds {info.file_size - header_len:,} bytes"
                )
            elements += count
            headers[key] = (shape, fortran, dtype, header_len)
        if limits.max_dataset_elements is not None and elements > limits.max_dataset_elements:
            raise _over(
                "the data set's element count", elements, limits.max_dataset_elements, "MAX_DATASET_ELEMENTS"
            )
        arrays: dict[str, np.ndarray] = {}
        for key, info in wanted:
            shape, fortran, dtype, header_len = headers[key]
            buf = bytearray(info.file_size)
            view = memoryview(buf)
            pos = 0
            for chunk in _chunks(zf, info):
                view[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            flat = np.frombuffer(buf, dtype=dtype, offset=header_len)
            arrays[key] = flat.reshape(shape, order="F" if fortran else "C")
    return arrays, sorted(members)


# --------------------------------------------------------------------------- .pt2

_ROOT_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_MODEL_JSON = "models/model.json"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_WEIGHT_FILE = re.compile(r"weight_\d{1,6}")
_CONSTANT_FILE = re.compile(r"tensor_constant_\d{1,6}")
_PAYLOAD_MEMBERS = (
    ("weights", re.compile(r"data/weights/(weight_\d{1,6})")),
    ("constants", re.compile(r"data/constants/(tensor_constant_\d{1,6})")),
)

# ScalarType codes of torch's export schema -> element size: plain numeric types only.
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2, 28: 2, 34: 4, 35: 8}
_STRIDED = 7

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|\d+)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\d+))*")
_SYMBOL = re.compile(r"[a-z]{1,8}\d{1,9}")
_FLOAT = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
# aten operators that touch the file system or skip their bounds / invariant checks.
_DENIED_ATEN = re.compile(
    r"from_file|save|set_|set_data|_unsafe_index\w*|_unsafe_masked_index\w*|_index_put_impl_|"
    r"_sparse_\w*_unsafe|_nested_\w*"
)
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_OTHER_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pow")]
    + [f"_operator.{n}" for n in ("eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")]
    + [f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite")]
)
# Argument kinds that make the deserializer resolve callables, subgraphs or pickled objects.
_DENIED_KEYS = frozenset({"as_custom_obj", "custom_obj", "as_graph", "as_operator", "token"})
# Names a sympy ``srepr`` of a shape expression uses (sympy core + torch's shape functions).
_SYMPY_NAMES = frozenset(
    [
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Mod",
        "Abs",
        "floor",
        "ceiling",
        "Piecewise",
        "ExprCondPair",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "true",
        "false",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "One",
        "Zero",
        "NegativeOne",
        "Half",
        "int_oo",
        "IntInfinity",
        "NegativeIntInfinity",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    ]
)
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<str>'[A-Za-z0-9_.+\-]*')"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[(),=\-]))"
)
_SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})


def _check_expr(expr: object) -> None:
    """A symbolic-shape expression: sympy ``srepr`` text the deserializer may ``sympify`` (eval)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise ArchiveError("a symbolic shape expression is not a short string")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise ArchiveError(f"symbolic shape expression {expr[:80]!r} has a forbidden character at {pos}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and nxt != "=" and text not in _SYMPY_NAMES:
            raise ArchiveError(f"symbolic shape expression {expr[:80]!r} uses {text!r}, which is not allowed")
        if kind == "str" and not (
            i >= 2
            and tokens[i - 1][1] == "("
            and (
                (tokens[i - 2][1] == "Symbol" and _SYMBOL.fullmatch(text[1:-1]))
                or (tokens[i - 2][1] == "Float" and _FLOAT.fullmatch(text[1:-1]))
            )
        ):
            raise ArchiveError(
                f"symbolic shape expression {expr[:80]!r} has a string that is not a shape symbol's "
                "name in Symbol() or a number in Float()"
            )
        if text == "=" and not (
            i >= 1
            and tokens[i - 1][0] == "name"
            and i + 1 < len(tokens)
            and (tokens[i + 1][0] == "num" or nxt in ("True", "False"))
        ):
            raise ArchiveError(
                f"symbolic shape expression {expr[:80]!r} has a keyword that is not an assumption"
            )


def _check_target(target: object) -> None:
    if not isinstance(target, str):
        raise ArchiveError("a graph node has no string target")
    if target in _OTHER_TARGETS:
        return
    m = _ATEN_TARGET.fullmatch(target)
    if m is None or m.group(1).startswith("__") or m.group(2).startswith("__"):
        raise ArchiveError(f"graph node target {target[:120]!r} is not an aten operator this service runs")
    if _DENIED_ATEN.fullmatch(m.group(1)):
        raise ArchiveError(f"graph node target {target!r} reads or writes memory or files unchecked; refused")


def _check_spec(spec: object) -> None:
    """A pytree spec (JSON text) of tuples, lists, dicts and leaves only, dict keys identifiers.

    FX writes the keys of the input spec's dict into the generated ``forward`` source.
    """
    try:
        parsed = json.loads(spec) if isinstance(spec, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, list) or len(parsed) != 2:
        raise ArchiveError("a module signature's tree spec is malformed")

    def walk(node: Any) -> None:
        kind = node.get("type") if isinstance(node, dict) else node
        if not isinstance(node, dict) or kind not in _SPEC_TYPES:
            raise ArchiveError(
                f"tree spec type {str(kind)[:80]!r} is not allowed (tuples, lists, dicts only)"
            )
        context = node.get("context")
        if kind in ("builtins.dict", "collections.OrderedDict"):
            try:
                keys = json.loads(context) if isinstance(context, str) else None
            except ValueError:
                keys = None
            if not isinstance(keys, list) or not all(
                isinstance(k, str) and _IDENT.fullmatch(k) for k in keys
            ):
                raise ArchiveError(f"tree spec dict keys {str(context)[:80]!r} are not identifiers")
        elif context not in (None, "null"):
            raise ArchiveError(f"tree spec context {str(context)[:80]!r} is not allowed for {kind}")
        for child in node.get("children_spec") or []:
            walk(child)

    walk(parsed[1])


def _walk_model_json(value: Any, key: str = "") -> None:
    """Check every expression, tree spec, name and denied argument kind, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in _DENIED_KEYS and v is not None:
                raise ArchiveError(f"the graph uses {k!r} (custom objects, operators or subgraphs); refused")
            if k == "expr_str":
                _check_expr(v)
            elif k in ("in_spec", "out_spec"):
                _check_spec(v)
            elif k == "forward_arg_names" and not (  # written into the generated forward's source
                isinstance(v, list) and all(isinstance(n, str) and _IDENT.fullmatch(n) for n in v)
            ):
                raise ArchiveError(f"forward argument names {str(v)[:80]!r} are not identifiers")
            elif k == "name" and isinstance(v, str) and not _IDENT.fullmatch(v):
                raise ArchiveError(f"graph name {v[:80]!r} is not an identifier")
            elif k in ("parameter_name", "buffer_name", "tensor_constant_name") and not (
                isinstance(v, str) and _FQN.fullmatch(v) and "__" not in v
            ):
                raise ArchiveError(f"{k} {str(v)[:80]!r} is not a module path")
            elif k == "fqn" and not (
                isinstance(v, str) and (v == "" or (_FQN.fullmatch(v) and "__" not in v))
            ):
                raise ArchiveError(f"module path {str(v)[:80]!r} is not allowed")
            _walk_model_json(v, k)
    elif isinstance(value, list):
        for item in value:
            _walk_model_json(item, key)


def _int_sizes(values: list[Any], what: str) -> list[int | None]:
    """Concrete ints (``as_int``) or None for a symbolic size (``as_expr``, checked elsewhere)."""
    out: list[int | None] = []
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("as_int"), int) and v["as_int"] >= 0:
            out.append(int(v["as_int"]))
        elif isinstance(v, dict) and "as_expr" in v:
            out.append(None)
        else:
            raise ArchiveError(f"{what} has a size that is neither a non-negative int nor an expression")
    return out


def _concrete(values: list[Any], what: str) -> list[int]:
    """Concrete non-negative ints only (stored tensors have no symbolic sizes)."""
    out = _int_sizes(values, what)
    if any(v is None for v in out):
        raise ArchiveError(f"{what} has a symbolic size")
    return [int(v or 0) for v in out]


def _check_model_json(doc: Any, limits: ArchiveLimits) -> dict[str, Any]:
    """Validate the serialized program; return it without guards code and node metadata."""
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ArchiveError("models/model.json is not a serialized exported program")
    _walk_model_json(doc)
    gm = doc["graph_module"]
    graph = gm.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ArchiveError("models/model.json has no graph")
    if graph.get("custom_obj_values") or gm.get("treespec_namedtuple_fields"):
        raise ArchiveError("the graph holds custom objects or named tuples; refused")
    ranges = doc.get("range_constraints") or {}
    if not isinstance(ranges, dict):
        raise ArchiveError("range_constraints is not an object")
    for name, bounds in ranges.items():
        if not _SYMBOL.fullmatch(name):
            raise ArchiveError(f"range constraint on {name[:80]!r}, which is not a shape symbol")
        if not (
            isinstance(bounds, dict)
            and all(isinstance(bounds.get(b), int | None) for b in ("min_val", "max_val"))
        ):
            raise ArchiveError(f"range constraint on {name} has bounds that are not integers")
    tensors = graph.get("tensor_values")
    if not isinstance(tensors, dict):
        raise ArchiveError("models/model.json has no tensor metadata")
    for name, meta in tensors.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sizes"), list):
            raise ArchiveError(f"tensor {name[:80]!r} has no sizes")
        numel = math.prod(d or 1 for d in _int_sizes(meta["sizes"], f"tensor {name[:80]!r}"))
        if limits.max_model_params is not None and numel > limits.max_model_params:
            raise _over(
                f"graph value {name[:80]!r}'s element count (per sample)",
                numel,
                limits.max_model_params,
                "MAX_MODEL_PARAMS",
            )
    for node in graph["nodes"]:
        if not isinstance(node, dict):
            raise ArchiveError("a graph node is not an object")
        _check_target(node.get("target"))
        node["metadata"] = {}  # stack traces and module paths: never needed, resolved by getattr
    gm["metadata"] = {}
    doc["guards_code"] = []  # exec'd by ExportedProgram.module(); shapes are checked by the graph itself
    return doc


def _check_payload_config(
    raw: bytes,
    what: str,
    files: dict[str, zipfile.ZipInfo],
    pattern: re.Pattern[str],
    counted: int,
    max_params: int | None,
) -> tuple[dict[str, Any], int]:
    """Validate a weights / constants config; return it and ``counted`` + the elements it declares.

    The running count is checked against ``max_params`` per entry, before the entry's sizes are
    compared with its bytes, so an over-limit tensor is reported as over the limit.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{what} is not JSON: {exc}") from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict) or set(doc) != {"config"}:
        raise ArchiveError(f"{what} is not a payload config")
    elements = counted
    for fqn, entry in config.items():
        label = f"{what}: {str(fqn)[:80]!r}"
        if not (isinstance(fqn, str) and _FQN.fullmatch(fqn) and "__" not in fqn):
            raise ArchiveError(f"{label} is not a module path")
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise ArchiveError(f"{label} is pickled (use_pickle); only raw tensors are accepted")
        path_name = entry.get("path_name")
        if not isinstance(path_name, str) or not pattern.fullmatch(path_name):
            raise ArchiveError(
                f"{label} points at {str(path_name)[:80]!r}; only raw tensor files are accepted"
            )
        if path_name not in files:
            raise ArchiveError(f"{label} points at {path_name}, which the archive lacks")
        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict):
            raise ArchiveError(f"{label} has no tensor metadata")
        dtype = meta.get("dtype")
        itemsize = _DTYPE_SIZES.get(dtype) if isinstance(dtype, int) else None
        if itemsize is None:
            raise ArchiveError(
                f"{label} has dtype code {meta.get('dtype')!r}; only plain numeric dtypes are accepted"
            )
        device = meta.get("device")
        if meta.get("layout") != _STRIDED or not isinstance(device, dict) or device.get("type") != "cpu":
            raise ArchiveError(f"{label} is not a strided CPU tensor")
        sizes = _concrete(meta.get("sizes") or [], label)
        strides = _concrete(meta.get("strides") or [], label)
        (offset,) = _concrete([meta.get("storage_offset")], label)
        if len(sizes) != len(strides):
            raise ArchiveError(f"{label} has {len(sizes)} sizes but {len(strides)} strides")
        numel = math.prod(sizes)
        elements += numel
        if max_params is not None and elements > max_params:
            raise _over(
                f"{label}: the model's declared parameter count", elements, max_params, "MAX_MODEL_PARAMS"
            )
        span = 0 if numel == 0 else offset + sum((s - 1) * t for s, t in zip(sizes, strides, strict=True)) + 1
        nbytes = files[path_name].file_size
        if nbytes % itemsize or span * itemsize > nbytes:
            raise ArchiveError(
                f"{label} declares {numel:,} elements spanning {span * itemsize:,} bytes but "
                f"{path_name} holds {nbytes:,} bytes"
            )
    return doc, elements


def rebuild_pt2(path: Path, out: Path, limits: ArchiveLimits) -> None:
    """Validate the ``torch.export`` archive ``path`` and write its checked parts to ``out``.

    ``out`` holds the model, its raw weights and constants and their configs, and an empty
    sample-inputs record: loading it with ``torch.export.load`` unpickles and evaluates nothing.

    Raises:
        ArchiveError: a member, config entry, call target or expression that is not allowed.
        ArchiveLimitError: over ``max_unpacked_bytes`` or ``max_model_params``.
    """
    with open_zip(path, limits) as zf:
        infos = zf.infolist()
        if not infos:
            raise ArchiveError("the archive is empty")
        root = infos[0].filename.split("/", 1)[0]
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if not name.startswith(root + "/") or "\\" in name or name.endswith("/"):
                raise ArchiveError(f"member {name[:120]!r} is outside the archive's folder {root!r}")
            rel = name[len(root) + 1 :]
            if rel in members:
                raise ArchiveError(f"member {name[:120]!r} appears twice")
            members[rel] = info
        known = {_MODEL_JSON, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, _SAMPLE_INPUTS} | _ROOT_FILES
        payloads: dict[str, dict[str, zipfile.ZipInfo]] = {"weights": {}, "constants": {}}
        for rel, info in members.items():
            for folder, pattern in _PAYLOAD_MEMBERS:
                if m := pattern.fullmatch(rel):
                    payloads[folder][m.group(1)] = info
                    break
            else:
                if rel not in known:
                    raise ArchiveError(
                        f"member {rel[:120]!r} is not part of a plain torch.export archive "
                        "(compiled code, pickled objects, extra files and other models are refused)"
                    )
        for required in (_MODEL_JSON, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, "archive_version"):
            if required not in members:
                raise ArchiveError(f"{required} is missing (not a torch.export.save archive)")
        for rel in (_MODEL_JSON, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
            if members[rel].file_size > MAX_JSON_BYTES:
                raise ArchiveError(
                    f"{rel} is {members[rel].file_size:,} bytes; at most {MAX_JSON_BYTES:,} are accepted"
                )
        if "byteorder" in members and read_member(zf, members["byteorder"]) != b"little":
            raise ArchiveError("only little-endian archives are accepted")

        import torch
        from torch.export.pt2_archive._package import PT2ArchiveWriter
        from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

        if read_member(zf, members["archive_version"]).decode(errors="replace") != ARCHIVE_VERSION_VALUE:
            raise ArchiveError(f"archive version is not {ARCHIVE_VERSION_VALUE} (torch {torch.__version__})")
        weights_doc, n_weights = _check_payload_config(
            read_member(zf, members[_WEIGHTS_CONFIG]),
            _WEIGHTS_CONFIG,
            payloads["weights"],
            _WEIGHT_FILE,
            0,
            limits.max_model_params,
        )
        consts_doc, _ = _check_payload_config(
            read_member(zf, members[_CONSTANTS_CONFIG]),
            _CONSTANTS_CONFIG,
            payloads["constants"],
            _CONSTANT_FILE,
            n_weights,
            limits.max_model_params,
        )
        raw_program = read_member(zf, members[_MODEL_JSON])
        try:
            program = json.loads(raw_program)
        except (ValueError, RecursionError) as exc:
            raise ArchiveError(f"{_MODEL_JSON} is not JSON: {exc}") from None
        try:
            program = _check_model_json(program, limits)
        except RecursionError:
            raise ArchiveError(f"{_MODEL_JSON} is nested too deeply") from None
        used_weights = {e["path_name"] for e in weights_doc["config"].values()}
        used_consts = {e["path_name"] for e in consts_doc["config"].values()}
        with PT2ArchiveWriter(str(out)) as writer:
            writer.write_string(_MODEL_JSON, json.dumps(program))
            writer.write_string(_WEIGHTS_CONFIG, json.dumps(weights_doc))
            writer.write_string(_CONSTANTS_CONFIG, json.dumps(consts_doc))
            writer.write_bytes(_SAMPLE_INPUTS, b"")
            writer.write_string("byteorder", "little")
            for folder, used in (("weights", used_weights), ("constants", used_consts)):
                for bare in sorted(used):
                    writer.write_bytes(f"data/{folder}/{bare}", read_member(zf, payloads[folder][bare]))
