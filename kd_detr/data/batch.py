"""The training batch the loop passes around: padded images, mask, targets and the teacher's outputs for
exactly these images, set by the run's teacher source (``TeacherSource.batches``: a cache read in the loader,
Ray actors ahead of the student, or the teacher in process).

The data layer does not know what a teacher output is: it sees it through two small protocols,
:class:`TeacherPayload` (what a batch carries) and :class:`ViewOutputsReader` (what the loader's workers read
with each view, e.g. a teacher cache)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Batch", "TeacherPayload", "ViewOutputsReader"]


@runtime_checkable
class TeacherPayload(Protocol):
    """The teacher's outputs for a batch (:class:`~kd_detr.teacher.outputs.TeacherOutputs`)."""

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "TeacherPayload": ...

    @classmethod
    def stack_views(cls, views: Sequence["TeacherPayload"]) -> "TeacherPayload": ...


@runtime_checkable
class ViewOutputsReader(Protocol):
    """Reads the teacher's outputs of one recorded view, ``B = 1`` (a teacher cache's reader). Called in the
    loader's workers: it must be picklable and open its files lazily."""

    root: Any  # where the outputs are read from, for error messages

    def view_outputs(self, index: int, view: int) -> TeacherPayload: ...


class Batch(NamedTuple):
    """``images [B,3,H,W]`` (zero-padded bottom/right), ``mask [B,H,W]`` (True = padding), ``targets``
    (per image: ``labels [N]``, ``boxes [N,4]`` normalised cxcywh, ...), ``teacher``: the teacher's
    outputs for the batch or ``None`` (not set yet, or no teacher). A NamedTuple, so DataLoader
    workers, ``pin_memory`` and ``batch[:3]`` handle it like the plain tuples it replaces."""

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, Any]]
    teacher: Optional[TeacherPayload] = None

    @classmethod
    def of(cls, item: Any) -> "Batch":
        """A loader item: ``(images, mask, targets[, teacher])`` or already a :class:`Batch`."""
        return item if isinstance(item, cls) else cls(*item)

    def to(self, device: Any) -> "Batch":
        """Images, mask, target tensors and teacher outputs on ``device``."""
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in self.targets]
        teacher = self.teacher.to(device) if self.teacher is not None else None
        return self._replace(images=self.images.to(device, non_blocking=True),
                             mask=self.mask.to(device, non_blocking=True), targets=targets, teacher=teacher)
