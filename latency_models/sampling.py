"""Which models to measure so that a few hundred timings cover the space a search explores.

Two sources, mixed:

* the zoo (ResNet-20, MobileNetV2, VGG, LeNet-5, ViT) at several input resolutions, with
  random policies: the models users actually bring;
* ``random_architecture``: small generated networks varying depth, widths, kernels, strides,
  depthwise / grouped convolutions, residual adds, inverted residuals and token-MLP /
  attention blocks, so that the predictors see kernel shapes no zoo model has and can be
  judged on architectures they never trained on.

Policies are drawn to cover schemes, sparsities, widths, skipped blocks and bits. A mode is
drawn per model (``random_policy``): all float, mixed (some layers quantized) or mostly
quantized; each layer then runs at the precision its bits give it
(``compression.mixed_precision.layer_precision``: int8 QDQ, 4-bit MatMulNBits for linear
layers, fp32), so float, int8 and int4 kernels and the boundaries between them are covered.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from compression.model_io import CompressibleModel, ModelTraceError, from_module
from compression.policy import LayerPolicy, Policy
from compression.space import SearchSpace, SpaceOptions
from compression.space_builder import space_for
from compression.zoo import build_model

__all__ = [
    "ZOO_FOR_CALIBRATION",
    "CalibrationSample",
    "random_architecture",
    "random_policy",
    "sample_plan",
]

#: Zoo models and resolutions used for calibration (ResNet-56 is ResNet-20's kernels, thrice).
ZOO_FOR_CALIBRATION: tuple[str, ...] = ("resnet20", "mobilenetv2", "vgg", "lenet5", "vit")
ZOO_RESOLUTIONS: tuple[int, ...] = (16, 24, 32)
SPACE_OPTIONS = SpaceOptions(bits=(None, 8, 4))


@dataclass
class CalibrationSample:
    """One model to measure: a policy applied to one model at one resolution.

    Attributes:
        arch_id: architecture family (the held-out grouping key).
        space_id: this exact model (family @ resolution).
        model: the exported model.
        space: its search space.
        policy: the policy to apply.
    """

    arch_id: str
    space_id: str
    model: CompressibleModel
    space: SearchSpace
    policy: Policy


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.a = _ConvBN(c, c, k, 1)
        self.b = _ConvBN(c, c, k, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(self.a(x)))


class _Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.expand = _ConvBN(cin, hidden, 1, 1)
        self.dw = _ConvBN(hidden, hidden, k, stride, groups=hidden)
        self.project = _ConvBN(hidden, cout, 1, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return out + x if self.residual else out


class _TokenBlock(nn.Module):
    """Pre-LN token block: optional single-head attention, then a GELU MLP (both residual)."""

    def __init__(self, dim: int, hidden: int, attention: bool) -> None:
        super().__init__()
        self.attention = attention
        self.norm1 = nn.LayerNorm(dim)
        if attention:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.proj = nn.Linear(dim, dim)
            self.scale = dim**-0.5
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention:
            h = self.norm1(x)
            attn = torch.softmax(torch.matmul(self.q(h), self.k(h).transpose(-2, -1)) * self.scale, dim=-1)
            x = x + self.proj(torch.matmul(attn, self.v(h)))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class RandomNet(nn.Module):
    """A generated CNN (optionally ending in token blocks) built from a recipe."""

    def __init__(self, body: nn.Module, tokens: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.tokens = tokens
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.tokens is not None:
            out = self.tokens(torch.flatten(out, 2).transpose(1, 2)).mean(dim=1)
        else:
            out = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.head(out)


def random_architecture(rng: random.Random) -> tuple[nn.Module, tuple[int, int, int]]:
    """A small random network and its input shape (C, H, W); batch-1 latency ~0.05-5 ms here."""
    in_ch = rng.choice((1, 3, 3))
    size = rng.choice((16, 24, 32, 40))
    width = rng.choice((8, 12, 16, 24, 32, 48))
    k = rng.choice((3, 3, 5))
    stem_stride = rng.choice((1, 1, 2))
    layers: list[nn.Module] = [_ConvBN(in_ch, width, k, stem_stride)]
    res = (size - 1) // stem_stride + 1
    c = width
    for _stage in range(rng.randint(1, 4)):
        stride = 2 if res >= 8 and rng.random() < 0.7 else 1
        cout = min(256, max(8, int(c * rng.choice((1.0, 1.5, 2.0)))))
        kind = rng.choice(("plain", "residual", "inverted", "grouped"))
        kk = rng.choice((1, 3, 3, 5)) if kind == "plain" else rng.choice((3, 5))
        if kind == "inverted":
            layers.append(_Inverted(c, cout, kk, stride, rng.choice((2, 4, 6))))
            for _ in range(rng.randint(0, 2)):
                layers.append(_Inverted(cout, cout, kk, 1, rng.choice((2, 4, 6))))
        elif kind == "grouped" and c % 4 == 0 and cout % 4 == 0:
            layers.append(_ConvBN(c, cout, kk, stride, groups=rng.choice((2, 4))))
            layers.append(_ConvBN(cout, cout, 1, 1))
        else:
            layers.append(_ConvBN(c, cout, kk, stride))
            if kind == "residual":
                for _ in range(rng.randint(1, 2)):
                    layers.append(_Residual(cout, kk))
        res = (res - 1) // stride + 1
        c = cout
    tokens: nn.Module | None = None
    if rng.random() < 0.3 and res * res <= 256:
        dim = c
        tokens = nn.Sequential(
            *[
                _TokenBlock(dim, dim * rng.choice((1, 2)), rng.random() < 0.6)
                for _ in range(rng.randint(1, 2))
            ]
        )
    head: nn.Module
    if rng.random() < 0.4:
        hidden = rng.choice((32, 64, 128))
        head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    else:
        head = nn.Linear(c, 10)
    return RandomNet(nn.Sequential(*layers), tokens, head).eval(), (in_ch, size, size)


def random_policy(space: SearchSpace, rng: random.Random) -> Policy:
    """A policy covering widths, schemes, skips and bits, with the bits mode drawn per model."""
    base = space.sample(rng)
    # Per-layer precision (compression.mixed_precision): all-float, mixed and mostly
    # quantized models, so the predictors see int8 / int4 kernels beside float ones.
    mode = rng.choice(("fp32", "mixed", "int8"))
    keep_width = rng.random() < 0.3
    uniform_width = round(rng.uniform(0.25, 1.0), 3) if rng.random() < 0.3 else None
    layers: dict[str, LayerPolicy] = {}
    for ls in space.layers:
        lp = base.for_layer(ls.name)
        if mode == "int8":
            bits: int | None = rng.choice((8, 8, 8, 4)) if rng.random() < 0.9 else None
        elif mode == "mixed":
            bits = rng.choice((8, 8, 4)) if rng.random() < 0.4 else None
        else:
            bits = None
        width = lp.width
        if ls.decides_width and (keep_width or uniform_width is not None):
            width = 1.0 if keep_width else float(uniform_width or 1.0)
        layers[ls.name] = replace(lp, bits=bits, width=width)
    skip = base.skip if rng.random() < 0.5 else frozenset()
    return Policy(layers=layers, skip=skip)


def _export(module: nn.Module, shape: tuple[int, int, int], name: str) -> CompressibleModel:
    return from_module(module, torch.randn(2, *shape), name)


def sample_plan(n: int, seed: int = 0, zoo_fraction: float = 0.3) -> Iterator[CalibrationSample]:
    """``n`` samples: zoo models at several resolutions plus random architectures (1-2 policies each).

    Models are exported lazily, so the first sample is ready in seconds. Generated
    architectures that ``torch.export`` or the graph analysis cannot handle are replaced.
    """
    rng = random.Random(seed)
    zoo_cache: dict[str, tuple[CompressibleModel, SearchSpace]] = {}
    produced = 0
    arch_counter = 0
    while produced < n:
        if rng.random() < zoo_fraction:
            arch = rng.choice(ZOO_FOR_CALIBRATION)
            res = rng.choice(ZOO_RESOLUTIONS)
            sid = f"{arch}@{res}"
            if sid not in zoo_cache:
                module = build_model(arch, in_channels=3, image_size=res, num_classes=10)
                cm = _export(module, (3, res, res), sid)
                zoo_cache[sid] = (cm, space_for(cm, SPACE_OPTIONS))
            cm, space = zoo_cache[sid]
            yield CalibrationSample(arch, sid, cm, space, random_policy(space, rng))
            produced += 1
            continue
        arch_seed = rng.randrange(2**31)
        arch_counter += 1
        module, shape = random_architecture(random.Random(arch_seed))
        arch_id = f"random-{arch_seed}"
        try:
            cm = _export(module, shape, arch_id)
            space = space_for(cm, SPACE_OPTIONS)
        except (ModelTraceError, ValueError, RuntimeError):
            continue
        for _ in range(min(rng.choice((1, 2)), n - produced)):
            yield CalibrationSample(arch_id, f"{arch_id}@{shape[1]}", cm, space, random_policy(space, rng))
            produced += 1
