"""A tiny Conditional DETR (``cond_detr_r10_tiny``, 5 classes) and a two-image batch, for the tests that run the
methods' objectives on real models."""

from __future__ import annotations

import torch

from kd_detr.models import build_model

NUM_CLASSES = 5


def tiny_detector(seed, **kw):
    """``cond_detr_r10_tiny`` with 5 classes, 8 queries and a 64-wide FFN unless ``kw`` says otherwise, its
    weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model("cond_detr_r10_tiny", num_classes=NUM_CLASSES, **{"num_queries": 8, "dim_feedforward": 64, **kw})


def tiny_batch(seed=0, b=2, size=64):
    """``b`` random ``size`` px images (the second padded on the right by 16 px) and their ground truth
    (with ``size``, as the data pipeline gives it)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    mask = torch.zeros(b, size, size, dtype=torch.bool)
    mask[1, :, size - 16:] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]),
                "size": torch.tensor([size, size])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.4]]),
                "size": torch.tensor([size, size - 16])}]
    return images, mask, targets
