"""Multi-scale adapter: Conditional DETR's single-scale encoder memory -> a 5-level feature pyramid.

Co-DETR's auxiliary heads work on a pyramid ``F_1..F_5`` at strides 8..128 (docs/methods.md 4.1.1). Conditional
DETR has one C5 map (stride 32; 16 with DC5), so we build the pyramid ViTDet-style (docs/methods.md 4.2):
finer levels by bilinear upsampling + 3x3 conv + GroupNorm, the input's own level as is, coarser levels
by chained 3x3 stride-2 convs + GroupNorm. The channel and norm details are ours (Co-DETR has no
single-scale config): GroupNorm with 32 groups like its multi-scale path, fewer when ``d`` is small.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PYRAMID_STRIDES", "PyramidAdapter", "gn_groups"]

PYRAMID_STRIDES = (8, 16, 32, 64, 128)


def gn_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm groups: ``max_groups`` (32) if every group keeps ``>= min_group_size`` channels, else fewer.

    With one channel per group (e.g. 32 groups at ``d = 32``) GroupNorm is an instance norm and turns the
    1x1 coarse levels of small images into constants; at ``d = 256`` this is GN(32) as in Co-DETR.
    """
    return math.gcd(max_groups, max(channels // min_group_size, 1))


def _conv_gn(d: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(d, d, 3, stride=stride, padding=1), nn.GroupNorm(gn_groups(d), d))


class _Upsample(nn.Module):
    """Bilinear x``factor`` then 3x3 conv + GroupNorm: ``[B,d,h,w] -> [B,d,h*f,w*f]``."""

    def __init__(self, d: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = _conv_gn(d)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return self.conv(x)


class PyramidAdapter(nn.Module):
    """Encoder memory ``[S,B,d]`` (``S = h*w`` tokens at ``in_stride``) -> pyramid at ``strides``.

    Levels finer than ``in_stride`` are upsampled from the input directly; coarser levels are a chain of
    stride-2 convs starting at the input (each level from the previous one). ``strides`` must be powers
    of two times ``in_stride`` and must contain it.
    """

    def __init__(self, d: int, in_stride: int = 32, strides: Sequence[int] = PYRAMID_STRIDES):
        super().__init__()
        self.in_stride = in_stride
        self.strides = tuple(strides)
        if in_stride not in self.strides or list(self.strides) != sorted(self.strides):
            raise ValueError(f"pyramid strides {self.strides} must be increasing and contain the memory's "
                             f"stride {in_stride}")
        self.levels = nn.ModuleList()
        for s in self.strides:
            ratio = in_stride / s if s < in_stride else s / in_stride
            if ratio != 2 ** round(math.log2(ratio)):
                raise ValueError(f"pyramid stride {s} is not a power-of-two multiple of {in_stride}")
            if s < in_stride:
                self.levels.append(_Upsample(d, in_stride // s))
            elif s == in_stride:
                self.levels.append(nn.Identity())
            else:
                self.levels.append(_conv_gn(d, stride=2))

    def forward(self, memory: Tensor, memory_mask: Tensor, feature_size: tuple[int, int]) -> list[Tensor]:
        """``memory [S,B,d]``, ``memory_mask [B,S]`` (True = pad), ``feature_size (h, w)`` -> one
        ``[B,d,h_j,w_j]`` map per stride (``h_j = h * in_stride / s`` up, ``ceil`` halvings down)."""
        h, w = feature_size
        # Padding tokens carry encoder outputs no one attends to; zero them so the convs see image-like
        # zero padding at the border instead of arbitrary values.
        x = memory.masked_fill(memory_mask.transpose(0, 1)[..., None], 0.0)
        x = x.permute(1, 2, 0).reshape(memory.shape[1], memory.shape[2], h, w)
        out: list[Tensor] = []
        prev = x
        for s, level in zip(self.strides, self.levels):
            if s <= self.in_stride:
                out.append(level(x))
            else:
                prev = level(prev)
                out.append(prev)
        return out
