"""Compression policies: what to do to each layer, as JSON-stable typed values.

A ``Policy`` maps layer names (as found by :func:`compression.space_for`) to a
``LayerPolicy``. The JSON form, which users write by hand and agents emit, is::

    {"default": {"width": 0.5},
     "layers": {"layer1.0.conv1": {"scheme": "nm", "nm": [2, 4], "bits": 8}},
     "skip": ["layer2.1"],
     "act_bits": null}

``default`` applies to every layer not named in ``layers``. A named layer's
fields override the default field by field (fields it does not name keep the
default's value), so ``{"default": {"bits": 8}, "layers": {"fc": {"width": 1}}}``
quantizes ``fc`` too. ``scheme: "channel"`` with a ``sparsity`` is accepted as a
synonym of ``width = 1 - sparsity``. What each scheme means and checks lives in its plug-in
(``compression.schemes``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

from compression import schemes as _schemes

#: A registered scheme's name (``compression.schemes.names()``): the plug-ins decide what is valid.
SchemeName = str
Scheme = SchemeName  # the older name of this alias (the scheme objects are ``compression.schemes.Scheme``)
MAX_SPARSITY = 0.95
MIN_BITS, MAX_BITS = 2, 8


class PolicyError(ValueError):
    """A policy that cannot be applied: names the layer and the field at fault."""


@dataclass(frozen=True)
class LayerPolicy:
    """What happens to one prunable layer.

    Attributes:
        width: kept fraction of output channels (0, 1]; channels are physically removed.
        scheme: fine-grained sparsity pattern applied to the (narrowed) weight: the name of a
            registered ``compression.schemes.Scheme``, which validates the fields it uses.
        sparsity: fraction of weights zeroed for ``unstructured`` and ``block``.
        nm: ``(N, M)``: at most N non-zeros in every M consecutive input weights.
        block: N of a 1×N block: N consecutive output channels at one input index.
        patterns: K of scheme ``pattern``: the 4-of-9 kernel patterns a layer may use (1–8).
        bits: weight bit-width (2–8, symmetric per output channel), None = float32.
        pow2: the ``bits`` code is a sign and a power of two: levels ± 2^-j · scale per output
            channel and 0 (``compression.pow2``) instead of the uniform grid; needs ``bits``.
    """

    width: float = 1.0
    scheme: SchemeName = _schemes.DENSE
    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    block: int | None = None
    patterns: int | None = None
    bits: int | None = None
    pow2: bool = False

    def validate(self, where: str = "default") -> LayerPolicy:
        """Raise PolicyError naming ``where`` if any value is impossible."""
        if not 0.0 < self.width <= 1.0:
            raise PolicyError(f"{where}: width must be in (0, 1], got {self.width}")
        if self.scheme not in _schemes.names():
            raise PolicyError(f"{where}: unknown scheme {self.scheme!r}; use one of {_schemes.names()}")
        if not 0.0 <= self.sparsity <= MAX_SPARSITY:
            raise PolicyError(f"{where}: sparsity must be in [0, {MAX_SPARSITY}], got {self.sparsity}")
        problem = _schemes.get(self.scheme).validate(self)
        if problem is not None:
            raise PolicyError(f"{where}: {problem}")
        if self.bits is not None and not MIN_BITS <= self.bits <= MAX_BITS:
            raise PolicyError(
                f"{where}: bits must be in [{MIN_BITS}, {MAX_BITS}] or null (float), got {self.bits}"
            )
        if self.pow2 and self.bits is None:
            raise PolicyError(
                f"{where}: pow2 needs bits (the code width, sign included, {MIN_BITS}-{MAX_BITS}); "
                'e.g. {"bits": 4, "pow2": true}, or drop pow2 for a float layer'
            )
        return self

    @property
    def target_sparsity(self) -> float:
        """Fraction of the narrowed weight that the scheme zeroes (0 for an unknown scheme)."""
        if self.scheme not in _schemes.names():
            return 0.0
        return _schemes.get(self.scheme).target_sparsity(self)

    def to_dict(self) -> dict[str, Any]:
        """Full JSON form (canonical types): every field, except ``patterns`` and ``pow2`` at
        their defaults (null, false), so policies written before those fields existed keep
        their JSON form and hash."""
        out: dict[str, Any] = {
            "width": self.width,
            "scheme": self.scheme,
            "sparsity": self.sparsity,
            "nm": list(self.nm) if self.nm is not None else None,
            "block": self.block,
            "bits": self.bits,
        }
        if self.patterns is not None:
            out["patterns"] = self.patterns
        if self.pow2:
            out["pow2"] = True
        return out

    def merged(self, overrides: Mapping[str, Any], where: str) -> LayerPolicy:
        """This policy with the fields named in ``overrides`` (JSON form) replaced."""
        return _parse_layer(overrides, where, base=self)


_FIELD_NAMES = {f.name for f in fields(LayerPolicy)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LayerPolicy)}


def _num(value: Any, where: str, name: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{where}: {name} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise PolicyError(f"{where}: {name} must be an integer, got {value!r}")
    return kind(value)


def _parse_layer(raw: Mapping[str, Any], where: str, base: LayerPolicy) -> LayerPolicy:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = set(raw) - _FIELD_NAMES
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)}; allowed {sorted(_FIELD_NAMES)}")
    kw: dict[str, Any] = {}
    if "width" in raw:
        kw["width"] = _num(raw["width"], where, "width", float)
    if "sparsity" in raw:
        kw["sparsity"] = _num(raw["sparsity"], where, "sparsity", float)
    if "scheme" in raw:
        scheme = raw["scheme"]
        if scheme == _schemes.CHANNEL:  # structured pruning expressed as kept width, not a scheme
            kw["width"] = 1.0 - float(kw.pop("sparsity", raw.get("sparsity", 0.0)))
            kw["sparsity"] = 0.0
            scheme = _schemes.DENSE
        if scheme not in _schemes.names():
            known = (*_schemes.names(), _schemes.CHANNEL)
            raise PolicyError(f"{where}: unknown scheme {scheme!r}; use one of {known}")
        kw["scheme"] = scheme
    if "nm" in raw:
        nm = raw["nm"]
        if nm is None:
            kw["nm"] = None
        else:
            if not isinstance(nm, (list, tuple)) or len(nm) != 2:
                raise PolicyError(f"{where}: nm must be [N, M], got {nm!r}")
            kw["nm"] = (_num(nm[0], where, "nm[0]", int), _num(nm[1], where, "nm[1]", int))
    if "block" in raw:
        kw["block"] = None if raw["block"] is None else _num(raw["block"], where, "block", int)
    if "patterns" in raw:
        patterns = raw["patterns"]
        kw["patterns"] = None if patterns is None else _num(patterns, where, "patterns", int)
    if "bits" in raw:
        bits = raw["bits"]
        if bits is not None and _num(bits, where, "bits", int) in (16, 32):
            bits = None  # float
        kw["bits"] = None if bits is None else _num(bits, where, "bits", int)
        if kw["bits"] is None and "pow2" not in raw:
            kw["pow2"] = False  # a layer made float has no code to round (the default's pow2 lapses)
    if "pow2" in raw:
        if not isinstance(raw["pow2"], bool):
            raise PolicyError(f"{where}: pow2 must be true or false, got {raw['pow2']!r}")
        kw["pow2"] = raw["pow2"]
    policy = replace(base, **kw)
    # Fields the scheme does not use are irrelevant; reset them so equal policies hash equal.
    used = _schemes.get(policy.scheme).fields
    unused = {name: _DEFAULTS[name] for name in _schemes.PARAM_FIELDS if name not in used}
    if unused:
        policy = replace(policy, **unused)
    return policy.validate(where)


@dataclass(frozen=True)
class Policy:
    """A whole-model policy: per-layer choices, skipped blocks, activation bits.

    Attributes:
        default: applies to every layer not in ``layers``.
        layers: per-layer policies (already merged with ``default``).
        skip: residual blocks replaced by identity.
        act_bits: 8 to fake-quantize the inputs of every quantized layer, else None.
    """

    default: LayerPolicy = field(default_factory=LayerPolicy)
    layers: Mapping[str, LayerPolicy] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    act_bits: int | None = None

    def for_layer(self, name: str) -> LayerPolicy:
        """The policy that applies to layer ``name``."""
        return self.layers.get(name, self.default)

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form: full layer entries, sorted names."""
        return {
            "default": self.default.to_dict(),
            "layers": {k: self.layers[k].to_dict() for k in sorted(self.layers)},
            "skip": sorted(self.skip),
            "act_bits": self.act_bits,
        }

    def to_json(self) -> str:
        """Deterministic JSON string (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit identity of the policy, for caching."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_json() == other.to_json()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Policy:
        """Parse the JSON form; raises PolicyError on anything malformed."""
        if not isinstance(raw, Mapping):
            raise PolicyError(f"policy must be a JSON object, got {type(raw).__name__}")
        unknown = set(raw) - {"default", "layers", "skip", "act_bits"}
        if unknown:
            raise PolicyError(
                f"policy: unknown key(s) {sorted(unknown)}; allowed default, layers, skip, act_bits"
            )
        default = _parse_layer(raw.get("default") or {}, "default", LayerPolicy())
        layers_raw = raw.get("layers") or {}
        if not isinstance(layers_raw, Mapping):
            raise PolicyError("policy: layers must be an object of layer name -> settings")
        layers = {
            str(name): _parse_layer(spec, f"layer {name!r}", default) for name, spec in layers_raw.items()
        }
        skip_raw = raw.get("skip") or []
        if not isinstance(skip_raw, (list, tuple)) or not all(isinstance(s, str) for s in skip_raw):
            raise PolicyError("policy: skip must be a list of block names")
        act_bits = raw.get("act_bits")
        if act_bits is not None and act_bits != 8:
            raise PolicyError(f"policy: act_bits must be 8 or null, got {act_bits!r}")
        return cls(default=default, layers=layers, skip=frozenset(skip_raw), act_bits=act_bits)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """Parse a JSON string; malformed JSON raises PolicyError."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from exc
        return cls.from_dict(cast(Mapping[str, Any], raw))

    @classmethod
    def dense(cls) -> Policy:
        """The identity policy (nothing compressed)."""
        return cls()

    def check_names(self, layers: Iterable[str], blocks: Iterable[str]) -> None:
        """Raise PolicyError if the policy names a layer or block the model does not have."""
        known_layers, known_blocks = sorted(layers), sorted(blocks)
        unknown = sorted(set(self.layers) - set(known_layers))
        if unknown:
            hints = difflib.get_close_matches(unknown[0], known_layers, n=3)
            raise PolicyError(
                f"policy names unknown layer(s) {unknown}"
                + (f"; did you mean {hints}?" if hints else f"; layers are e.g. {known_layers[:6]}")
            )
        bad = sorted(set(self.skip) - set(known_blocks))
        if bad:
            hints = difflib.get_close_matches(bad[0], known_blocks, n=3)
            raise PolicyError(
                f"policy skips unknown block(s) {bad}; skippable blocks: {known_blocks}"
                + (f" (did you mean {hints}?)" if hints else "")
            )
