"""View plans: K recorded augmentation views per image, each a cache entry of its own.

A :class:`ViewPlan` fixes the pixels of every view, so the cache builder, a Ray teacher and the student
all see view ``(i, k)`` of image ``i`` identically: ``policy.sample(view_generator(seed, k, i), size_i)``.
It fixes nothing about batches: a teacher sees every view alone (its outputs do not depend on the images it
was batched with, see :class:`~kd_detr.teacher.inprocess.InProcessTeacher`), so one cache serves any batch
size, number of processes and nodes.

Training on a plan uses the ordinary batch sampler (any batch size, rank-aware, resumable);
:class:`PlanViewSampler` draws for each image one of its K views per epoch: each cycle of K epochs visits
every view of every image once, in a seeded order of its own per image.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .batch import Batch, ViewOutputsReader
from .coco import DatasetError, _one_line
from .collate import collate_fn
from .transforms import AugmentationPolicy, View, view_generator

__all__ = ["ViewPlan", "PlanViewSampler", "PlanViews", "ViewKey"]

ViewKey = tuple[int, int]  # (dataset index i, view k)


def _rng(*numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(n) for n in numbers]))


class ViewPlan:
    """K recorded views per image.

    Args:
        image_sizes: ``(h, w)`` of every dataset image, in dataset order.
        policy: the training augmentation policy the views are drawn from.
        num_views: K.
        seed: seeds the views.
        image_ids: dataset image ids (recorded in the fingerprint so a plan is tied to its data).
    """

    def __init__(self, image_sizes: Sequence[tuple[int, int]], policy: AugmentationPolicy, num_views: int,
                 seed: int = 0, image_ids: Optional[Sequence[int]] = None):
        if num_views < 1:
            raise ValueError(f"the number of views must be >= 1, got {num_views}")
        if not image_sizes:
            raise ValueError("a view plan needs at least one image")
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self.policy = policy
        self.num_views = int(num_views)
        self.seed = int(seed)
        self.image_ids = [int(i) for i in (image_ids if image_ids is not None else range(len(image_sizes)))]
        self._epoch_views: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def for_dataset(cls, dataset, num_views: int, seed: int = 0) -> "ViewPlan":
        """A plan over a :class:`CocoDetection` with its training policy."""
        if dataset.transforms is None:
            raise ValueError("a view plan needs a dataset with an augmentation policy")
        sizes = [dataset.image_size(i) for i in range(len(dataset))]
        return cls(sizes, dataset.transforms, num_views, seed, dataset.image_ids)

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

    def all_views(self) -> list[ViewKey]:
        """Every ``(i, k)``: view 0 of every image first, then view 1, ..."""
        return [(i, k) for k in range(self.num_views) for i in range(self.num_images)]

    def epoch_views(self, epoch: int, run_seed: int) -> np.ndarray:
        """``[N]`` the view each image uses in training epoch ``epoch``: every cycle of K epochs visits each
        image's K views once, in a seeded order drawn per image (so views of different images mix in a batch)."""
        cycle, pos = divmod(int(epoch), self.num_views)
        key = (int(run_seed), cycle)
        if key not in self._epoch_views:
            # one row of K uniform draws per image; argsort gives each image its own permutation of the views
            draws = _rng(run_seed, cycle, 2).random((self.num_images, self.num_views))
            self._epoch_views = {key: np.argsort(draws, axis=1)}  # keep one cycle: epochs come in order
        return self._epoch_views[key][:, pos].copy()

    def to_dict(self) -> dict[str, Any]:
        return {"num_views": self.num_views, "seed": self.seed, "policy": self.policy.to_dict(),
                "num_images": self.num_images, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides the pixels of the views: K, seed, policy, images and sizes."""
        blob = json.dumps({"num_views": self.num_views, "seed": self.seed, "policy": self.policy.to_dict(),
                           "image_ids": self.image_ids, "image_sizes": self.image_sizes}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class PlanViewSampler(Sampler[list[ViewKey]]):
    """Batches of ``(i, k)``: the image indices of an ordinary batch sampler, each with its view of the epoch.

    Args:
        batches: the run's batch sampler of dataset indices (seeded, rank-aware, with
            ``set_epoch(epoch, start_batch)``, ``batches_per_epoch()`` and ``epoch``, e.g.
            :class:`~kd_detr.engine.sampler.ResumableBatchSampler`): it decides batch size, order,
            ranks and resuming, exactly as without a plan.
        plan: the view plan.
        seed: the run's seed (which view each image takes per epoch).
    """

    def __init__(self, batches, plan: ViewPlan, seed: int):
        self.batches, self.plan, self.seed = batches, plan, int(seed)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.batches.set_epoch(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        return self.batches.batches_per_epoch()

    def __iter__(self) -> Iterator[list[ViewKey]]:
        views = self.plan.epoch_views(self.batches.epoch, self.seed)
        for batch in self.batches:
            yield [(int(i), int(views[i])) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class PlanViews(Dataset):
    """Item ``(i, k)`` -> view ``k`` of image ``i`` as ``(image [3,H,W], target)``, plus the teacher's outputs for
    that view alone when a ``teacher_source`` (a :class:`~kd_detr.data.ViewOutputsReader`, e.g. a teacher cache
    reader) is given: ``(image, target, TeacherOutputs)`` with ``B = 1``. :meth:`collate` pads a list of items into a
    batch (and stacks the teacher outputs: :meth:`~kd_detr.teacher.outputs.TeacherOutputs.stack_views`).

    Use with ``DataLoader(PlanViews(...), batch_sampler=PlanViewSampler(...), collate_fn=PlanViews.collate)``:
    the loader workers then read the images and the cached teacher tensors.
    """

    def __init__(self, dataset, plan: ViewPlan, teacher_source: Optional[ViewOutputsReader] = None):
        if len(dataset) != plan.num_images:
            raise ValueError(f"the view plan covers {plan.num_images} images but the data set has {len(dataset)}")
        self.dataset, self.plan, self.teacher_source = dataset, plan, teacher_source

    def __len__(self) -> int:
        return self.plan.num_views * self.plan.num_images

    def __getitem__(self, key: ViewKey):
        # every failure is a one-line DatasetError naming the image file or the cache entry, also when it
        # happens in a DataLoader worker (see DatasetError)
        i, k = int(key[0]), int(key[1])
        try:
            image, target = self.dataset.get_view(i, self.plan.view(i, k))
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"cannot build view {k} of image {i}: {_one_line(e)}") from e
        if self.teacher_source is None:
            return image, target
        try:
            outputs = self.teacher_source.view_outputs(i, k)
        except Exception as e:
            root = getattr(self.teacher_source, "root", None)
            src = f" of {root}" if root is not None else f" ({type(self.teacher_source).__name__})"
            raise DatasetError(f"cannot read teacher outputs of view {k} of image {i}{src}: {_one_line(e)}") from e
        return image, target, outputs

    @staticmethod
    def collate(items: Sequence[tuple]):
        """Items of :meth:`__getitem__` -> ``(images, mask, targets)`` or a :class:`Batch` with the teacher's
        outputs stacked over the batch."""
        images, mask, targets = collate_fn([(item[0], item[1]) for item in items])
        if len(items[0]) == 2:
            return images, mask, targets
        outputs = [item[2] for item in items]
        return Batch(images, mask, targets, type(outputs[0]).stack_views(outputs))
