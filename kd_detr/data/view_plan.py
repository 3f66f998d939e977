"""View plans: K recorded augmentation views per image and fixed padded batches per view.

A teacher output is only valid for the pixels and the padded batch the teacher saw (DETR outputs
depend on the batch's padding: convolutions see the padded region). A :class:`ViewPlan` fixes both,
so the cache builder, a Ray teacher and the student all see batch ``(k, j)`` identically:

* view ``(i, k)`` of image ``i``: ``policy.sample(view_generator(seed, k, i), size_i)``;
* batches of view ``k``: the image indices permuted by a generator seeded with ``(seed, k)``, cut
  into batches of ``batch_size`` (the last may be smaller), padded by :func:`collate_fn`;
* training epoch ``e`` uses one view ``k`` for every image (a seeded permutation of the K views,
  repeated) and visits that view's batches in a seeded order. Each image thus sees one of its K
  recorded views per epoch, and batch composition varies from view to view.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .batch import Batch
from .coco import DatasetError, _one_line
from .collate import collate_fn
from .transforms import AugmentationPolicy, View, view_generator

__all__ = ["ViewPlan", "PlanBatchSampler", "PlanBatches"]

BatchKey = tuple[int, int]  # (view k, batch j)


def _rng(*numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(n) for n in numbers]))


class ViewPlan:
    """K views per image and the fixed batches of every view.

    Args:
        image_sizes: ``(h, w)`` of every dataset image, in dataset order.
        policy: the training augmentation policy the views are drawn from.
        num_views: K.
        batch_size: images per batch (per process).
        seed: seeds the views and the batch composition.
        image_ids: dataset image ids (recorded in the fingerprint so a plan is tied to its data).
    """

    def __init__(self, image_sizes: Sequence[tuple[int, int]], policy: AugmentationPolicy, num_views: int,
                 batch_size: int, seed: int = 0, image_ids: Optional[Sequence[int]] = None):
        if num_views < 1:
            raise ValueError(f"the number of views must be >= 1, got {num_views}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if not image_sizes:
            raise ValueError("a view plan needs at least one image")
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self.policy = policy
        self.num_views = int(num_views)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.image_ids = [int(i) for i in (image_ids if image_ids is not None else range(len(image_sizes)))]
        self._orders: dict[int, list[int]] = {}

    @classmethod
    def for_dataset(cls, dataset, num_views: int, batch_size: int, seed: int = 0) -> "ViewPlan":
        """A plan over a :class:`CocoDetection` with its training policy."""
        if dataset.transforms is None:
            raise ValueError("a view plan needs a dataset with an augmentation policy")
        sizes = [dataset.image_size(i) for i in range(len(dataset))]
        return cls(sizes, dataset.transforms, num_views, batch_size, seed, dataset.image_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    def view(self, index: int, k: int) -> View:
        """The recorded view ``k`` of image ``index``."""
        if not 0 <= k < self.num_views:
            raise IndexError(f"view {k} outside [0, {self.num_views})")
        if not self.policy.train:
            return self.policy.sample(None, self.image_sizes[index])
        return self.policy.sample(view_generator(self.seed, k, index), self.image_sizes[index])

    def num_batches(self) -> int:
        """Batches per view (every view has the same count)."""
        return math.ceil(self.num_images / self.batch_size)

    def batch(self, k: int, j: int) -> list[int]:
        """Dataset indices of batch ``j`` of view ``k``, in batch order."""
        if not 0 <= j < self.num_batches():
            raise IndexError(f"batch {j} outside [0, {self.num_batches()})")
        if k not in self._orders:
            if not 0 <= k < self.num_views:
                raise IndexError(f"view {k} outside [0, {self.num_views})")
            self._orders[k] = _rng(self.seed, k, 1).permutation(self.num_images).tolist()
        return self._orders[k][j * self.batch_size:(j + 1) * self.batch_size]

    def all_batches(self) -> list[BatchKey]:
        return [(k, j) for k in range(self.num_views) for j in range(self.num_batches())]

    def view_of_epoch(self, epoch: int, run_seed: int) -> int:
        """The view every image uses in training epoch ``epoch``: each cycle of K epochs visits every view once."""
        cycle, pos = divmod(int(epoch), self.num_views)
        return int(_rng(run_seed, cycle, 2).permutation(self.num_views)[pos])

    def epoch_batches(self, epoch: int, run_seed: int, rank: int = 0, world_size: int = 1) -> list[BatchKey]:
        """This rank's batches of ``epoch``, in order (padded by repetition to a multiple of ``world_size``)."""
        k = self.view_of_epoch(epoch, run_seed)
        order = _rng(run_seed, epoch, 3).permutation(self.num_batches()).tolist()
        per_rank = math.ceil(len(order) / world_size)
        order = order + order[: per_rank * world_size - len(order)]
        return [(k, j) for j in order[rank::world_size]]

    def to_dict(self) -> dict[str, Any]:
        return {"num_views": self.num_views, "batch_size": self.batch_size, "seed": self.seed,
                "policy": self.policy.to_dict(), "num_images": self.num_images, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides the pixels and batches: K, B, seed, policy, images and sizes."""
        blob = json.dumps({"num_views": self.num_views, "batch_size": self.batch_size, "seed": self.seed,
                           "policy": self.policy.to_dict(), "image_ids": self.image_ids,
                           "image_sizes": self.image_sizes}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class PlanBatchSampler(Sampler[BatchKey]):
    """Yields this rank's plan batches ``(k, j)`` of an epoch; ``set_epoch(epoch, start_batch)`` resumes
    mid-epoch (the interface of :class:`~kd_detr.engine.sampler.ResumableBatchSampler`)."""

    def __init__(self, plan: ViewPlan, seed: int, rank: int = 0, world_size: int = 1):
        self.plan, self.seed, self.rank, self.world_size = plan, int(seed), rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return math.ceil(self.plan.num_batches() / self.world_size)

    def __iter__(self) -> Iterator[BatchKey]:
        batches = self.plan.epoch_batches(self.epoch, self.seed, self.rank, self.world_size)
        yield from batches[self.start_batch:]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


class PlanBatches(Dataset):
    """Item ``(k, j)`` -> the collated batch ``(images, mask, targets)`` of the plan, plus the teacher's
    outputs for it when a ``teacher_source`` (e.g. a teacher cache reader with
    ``teacher_outputs(k, j)``) is given: ``(images, mask, targets, TeacherOutputs)``.

    Use with ``DataLoader(PlanBatches(...), batch_size=None, sampler=PlanBatchSampler(...))``: the
    loader workers then read the images and the cached teacher tensors.
    """

    def __init__(self, dataset, plan: ViewPlan, teacher_source=None):
        if len(dataset) != plan.num_images:
            raise ValueError(f"the view plan covers {plan.num_images} images but the data set has {len(dataset)}")
        self.dataset, self.plan, self.teacher_source = dataset, plan, teacher_source

    def __len__(self) -> int:
        return self.plan.num_views * self.plan.num_batches()

    def items(self, k: int, j: int) -> list[tuple[torch.Tensor, dict]]:
        return [self.dataset.get_view(i, self.plan.view(i, k)) for i in self.plan.batch(k, j)]

    def __getitem__(self, key: BatchKey):
        # every failure is a one-line DatasetError naming the image file or the cache batch, also when it
        # happens in a DataLoader worker (see DatasetError)
        k, j = int(key[0]), int(key[1])
        try:
            images, mask, targets = collate_fn(self.items(k, j))
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"cannot build plan batch {j} of view {k}: {_one_line(e)}") from e
        if self.teacher_source is None:
            return images, mask, targets
        try:
            outputs = self.teacher_source.teacher_outputs(k, j)
        except Exception as e:
            root = getattr(self.teacher_source, "root", None)
            src = f" of {root}" if root is not None else f" ({type(self.teacher_source).__name__})"
            raise DatasetError(f"cannot read teacher outputs of plan batch {j} of view {k}{src}: "
                               f"{_one_line(e)}") from e
        return Batch(images, mask, targets, outputs)
