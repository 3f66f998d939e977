"""The training batch the loop passes around: padded images, mask, targets and, when a teacher source
supplies them with the data (a cache read in the loader, Ray actors ahead of the student), the
teacher's outputs for exactly these images."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

__all__ = ["Batch"]


class Batch(NamedTuple):
    """``images [B,3,H,W]`` (zero-padded bottom/right), ``mask [B,H,W]`` (True = padding), ``targets``
    (per image: ``labels [N]``, ``boxes [N,4]`` normalised cxcywh, ...), ``teacher``: the teacher's
    outputs for the batch or ``None`` (computed later, or no teacher). A NamedTuple, so DataLoader
    workers, ``pin_memory`` and ``batch[:3]`` handle it like the plain tuples it replaces."""

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, Any]]
    teacher: Optional[Any] = None

    @classmethod
    def of(cls, item: Any) -> "Batch":
        """A loader item: ``(images, mask, targets[, teacher])`` or already a :class:`Batch`."""
        return item if isinstance(item, cls) else cls(*item)

    def to(self, device: Any) -> "Batch":
        """Images, mask and target tensors on ``device`` (the teacher outputs stay where they are: their
        source moves them when they are used)."""
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in self.targets]
        return self._replace(images=self.images.to(device, non_blocking=True),
                             mask=self.mask.to(device, non_blocking=True), targets=targets)
