"""Batching of variable-size detection samples: zero padding bottom/right plus a padding mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_fn", "pad_images"]


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[C,H_i,W_i]`` images into ``[B,C,Hmax,Wmax]`` (zeros bottom/right) and a mask.

    Returns:
        ``(images [B,C,Hmax,Wmax], mask [B,Hmax,Wmax] bool)`` with ``mask`` True at padding (DETR
        convention: True = "not a real pixel").
    """
    if len(images) == 0:
        raise ValueError("cannot pad an empty list of images")
    c = images[0].shape[0]
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != c:
            raise ValueError(f"image {i} has shape {tuple(im.shape)}; expected [{c},H,W] like image 0")
    hmax = max(int(im.shape[1]) for im in images)
    wmax = max(int(im.shape[2]) for im in images)
    out = images[0].new_zeros((len(images), c, hmax, wmax))
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        h, w = im.shape[1], im.shape[2]
        out[i, :, :h, :w].copy_(im)
        mask[i, :h, :w] = False
    return out, mask


def collate_fn(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """``list of (image [3,H,W], target)`` -> ``(images [B,3,Hmax,Wmax], mask [B,Hmax,Wmax], targets)``.

    ``targets`` is the list of target dicts, unchanged (boxes stay normalised to each unpadded image).
    """
    images, targets = zip(*batch)
    padded, mask = pad_images(list(images))
    return padded, mask, list(targets)
