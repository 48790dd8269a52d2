"""A small Vision Transformer (Dosovitskiy et al. 2021) for small images.

Conv patch embedding, a cls token, learned position embeddings, pre-LN encoder
blocks whose attention has separate q, k, v and output nn.Linear layers (so each
projection is its own prunable layer), a GELU MLP, final LayerNorm and a linear
head. Attention is written with matmul + softmax so torch.export yields plain
aten ops rather than a fused SDPA kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.zoo._common import check_dims


def patch_size_for(image_size: int) -> int:
    """4 px patches for MNIST/CIFAR sizes (7x7 or 8x8 tokens), 2 px for 8x8 digits."""
    if image_size >= 16:
        return 4
    if image_size >= 4:
        return 2
    return 1


class Attention(nn.Module):
    """Multi-head self-attention with explicit q, k, v and output projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class ViT(nn.Module):
    """Patch embedding + cls token + position embedding, ``depth`` blocks, LN, head on cls."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 128,
    ) -> None:
        super().__init__()
        patch = patch_size_for(image_size)
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.patch_embed(x)
        out = torch.flatten(out, 2).transpose(1, 2)
        cls = self.cls_token.expand(out.shape[0], -1, -1)
        out = torch.cat([cls, out], dim=1) + self.pos_embed
        out = self.norm(self.blocks(out))
        return self.head(out[:, 0])


def vit(*, in_channels: int, image_size: int, num_classes: int) -> ViT:
    """ViT with dim 64, 4 blocks, 4 heads, MLP 128 (~0.2 M parameters)."""
    check_dims("vit", in_channels=in_channels, image_size=image_size, num_classes=num_classes, min_size=1)
    return ViT(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
