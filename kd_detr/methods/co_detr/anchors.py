"""Anchors on the adapter's pyramid, with the pyramid's strides given rather than inferred.

torchvision's :class:`AnchorGenerator` infers each level's stride as ``image_size // grid_size``. The
adapter's coarse levels are ``ceil`` halvings of the C5 map, so on small images that division is wrong
(a 64 px image has 1x1 maps at both stride 64 and 128). We keep torchvision's cell anchors and grid
layout (anchor centres at ``(i * stride, j * stride)``, top-left corner of the cell, as mmdet) and only
pass the true strides.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["PyramidAnchorGenerator"]


class PyramidAnchorGenerator(AnchorGenerator):
    """:class:`AnchorGenerator` for known ``strides`` (one per level, same order as ``sizes``).

    ``sizes[l]`` / ``aspect_ratios[l]``: anchor sizes (sqrt of the area, pixels) and ratios h/w of level
    ``l``; every location gets ``len(sizes[l]) * len(aspect_ratios[l])`` anchors.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int]):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        if len(strides) != len(sizes):
            raise ValueError(f"{len(strides)} strides for {len(sizes)} anchor levels")
        self.strides = tuple(int(s) for s in strides)

    def per_level(self, feature_maps: Sequence[Tensor]) -> list[Tensor]:
        """Anchors of each level, ``[h_l * w_l * A_l, 4]`` absolute xyxy, location-major (as the heads'
        ``permute(0, 2, 3, 1)`` flattening)."""
        ref = feature_maps[0]
        self.set_cell_anchors(ref.dtype, ref.device)
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, device=ref.device), torch.tensor(s, device=ref.device)] for s in self.strides]
        return self.grid_anchors(grid_sizes, strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """torchvision's interface (used by :class:`RegionProposalNetwork`): one ``[A,4]`` per image."""
        anchors = torch.cat(self.per_level(feature_maps))
        return [anchors for _ in image_list.image_sizes]
