"""Sine position encodings: the 2-D image encoding and the reference-point embedding.

Both use the same per-axis function and channel order ``[y-part, x-part]`` as the official code,
``PE(v)[2i] = sin(v / T^(2i/F))``, ``PE(v)[2i+1] = cos(v / T^(2i/F))`` with ``F`` features per axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_embed_points"]


def _dim_t(num_pos_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_pos_feats)


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine encoding of the unpadded area of each image (no parameters).

    ``forward(mask [B,h,w] bool, True = pad) -> [B, 2*num_pos_feats, h, w]`` (float32).
    Coordinates are cumulative counts of valid pixels, divided by the valid extent (+1e-6) and
    scaled to ``(0, 2pi]``, so padding does not change the encoding of the valid area.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: int = 10000,
                 normalize: bool = True, scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = _dim_t(self.num_pos_feats, self.temperature, mask.device)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed_points(points: Tensor, num_pos_feats: int = 128, temperature: int = 10000) -> Tensor:
    """Sine embedding of reference points (official ``gen_sineembed_for_position``).

    ``points [..., 2]`` as ``(x, y)`` in ``[0, 1]`` -> ``[..., 2*num_pos_feats]`` ordered ``[y, x]``.
    The official code hard-codes 128 features per axis (d=256); we use ``d/2`` so smaller models work
    (identical for d=256).
    """
    scale = 2 * math.pi
    dim_t = _dim_t(num_pos_feats, temperature, points.device)
    x_embed = points[..., 0] * scale
    y_embed = points[..., 1] * scale
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1)
