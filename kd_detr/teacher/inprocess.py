"""A frozen teacher model run on the images of a padded batch: ``(images, mask) -> TeacherOutputs``. Used by the
in-process source, inside the Ray teacher actors and by the cache builder, so all three give the same numbers.

The teacher sees every image alone (its region of the padded batch, unpadded): a DETR's outputs for an image
depend on the padding of its batch (convolutions see the padded region, the transformer attends over the
padded grid's size), and a teacher output that does not is one a cache can store per (image, view) and serve
to any batch size. The image's cross-attention maps are then over its own C5 grid
(:meth:`~kd_detr.teacher.outputs.TeacherOutputs.stack_views`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .outputs import ATTN_MODES, TeacherOutputs

__all__ = ["InProcessTeacher", "PRECISIONS", "check_precision", "image_regions"]

# ``teacher.precision``: the dtype the teacher's forward autocasts to (``None``: float32, autocast off). Every
# source applies it the same way (in process, in a Ray actor, in a cache build), so their outputs agree.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_precision(precision: str, option: str = "teacher.precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{option} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


class InProcessTeacher:
    """Runs a frozen teacher model on each image of a padded batch alone: ``(images, mask) -> TeacherOutputs``.

    The teacher runs at its own ``precision`` whatever ``torch.autocast`` its caller is under (the student's
    ``--amp`` step must not change the teacher's numbers): float32 with autocast off, or autocast to bfloat16 /
    float16 (tensor cores on a GPU). Its outputs are float32 either way. The Ray actors and the cache build run
    this same class, so the three teacher sources give the same numbers at the same precision.

    Args:
        model: the teacher detector; put in eval mode, parameters frozen.
        attn: ``per_head`` | ``mean`` | ``none``: how attention maps are returned (``mean`` saves
            memory when the recipe compares head-averaged maps).
        precision: ``float32`` | ``bfloat16`` | ``float16`` (:data:`PRECISIONS`).
        features: also return the encoder's output maps (``features``, for feature distillation).
    """

    def __init__(self, model: nn.Module, attn: str = "per_head", precision: str = "float32", features: bool = False):
        if attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {attn!r}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.attn = attn
        self.precision = check_precision(precision)
        self.features = bool(features)

    @property
    def config(self):
        return self.model.config

    def to(self, device: Any) -> "InProcessTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor, mask: Tensor) -> TeacherOutputs:
        """``images [B,3,H,W]``, ``mask [B,H,W]`` (True = pad) -> :class:`TeacherOutputs` of every image run
        alone (``image_grids`` set), stacked in batch order."""
        return TeacherOutputs.stack_views([self.view(image) for image in image_regions(images, mask)])

    @torch.no_grad()
    def view(self, image: Tensor) -> TeacherOutputs:
        """``image [3,H,W]`` (one view, unpadded) -> :class:`TeacherOutputs` with ``B = 1``."""
        from kd_detr.models import DetectorRequest

        self.model.eval()  # the trainer's model.train() never reaches the teacher, but be sure
        h, w = image.shape[-2:]
        mask = torch.zeros((1, h, w), dtype=torch.bool, device=image.device)
        dtype = PRECISIONS[self.precision]
        # the teacher's own precision, not its caller's autocast: see the class docstring
        with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.model(image[None].float(), mask,
                             request=DetectorRequest(attention=self.attn != "none", features=self.features))
        outputs = TeacherOutputs.from_model_output(out, self.attn, features=self.features)
        return outputs if dtype is None else outputs.float()


def image_regions(images: Tensor, mask: Tensor) -> list[Tensor]:
    """The images of a padded batch without their padding: ``[3,h_b,w_b]`` each (``collate_fn`` puts an image in
    the top-left corner; ``mask`` is True at padding)."""
    out = []
    for b in range(images.shape[0]):
        valid = ~mask[b]
        h = int(valid.any(1).sum())
        w = int(valid.any(0).sum())
        if h == 0 or w == 0:
            raise ValueError(f"image {b} of the batch is all padding (its mask has no valid pixel)")
        out.append(images[b, :, :h, :w])
    return out
