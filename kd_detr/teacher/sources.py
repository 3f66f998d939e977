"""Where a distillation's teacher outputs come from: one :class:`TeacherSource` interface, three sources.

The trainer asks its source three things, the same way for all three:

1. :meth:`TeacherSource.prepare`: check the teacher against the data and the student, and say what it is
   (:attr:`config`, the teacher's :class:`~kd_detr.models.ModelConfig`: the methods refuse pairs that
   do not fit before any training);
2. :meth:`TeacherSource.start`: get ready to deliver maps of the kind a method asks (``per_head`` |
   ``mean`` | ``none``), on the training device;
3. per batch, :meth:`TeacherSource.outputs`: the :class:`TeacherOutputs` of a :class:`~kd_detr.data.Batch`.

* :class:`InProcessSource`: the frozen teacher runs in the training process on the student's batch.
* :class:`CacheSource`: outputs were computed once (``kd-detr cache``) and are read with the batch in the
  loader's workers; no teacher model is loaded. It also fixes the view plan the run trains on.
* :class:`RaySource`: Ray actors compute the outputs of upcoming batches while the student trains
  (:meth:`TeacherSource.batches` wraps the loader).
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Iterable, Optional

from torch import nn

from kd_detr.data import Batch, LabelMap
from kd_detr.models import ModelConfig, config_from_dict

from .loading import TeacherSpec, check_teacher_fits, describe_teacher, load_teacher, teacher_weights_sha256
from .inprocess import InProcessTeacher
from .outputs import TeacherOutputs

log = logging.getLogger("kd_detr.teacher")

__all__ = ["InProcessTeacher", "TeacherSource", "InProcessSource", "CacheSource", "RaySource",
           "check_cache_serves"]


class TeacherSource(abc.ABC):
    """Provides the teacher outputs of each training batch (see the module docstring for the protocol).

    Attributes:
        kind: ``inprocess`` | ``cache`` | ``ray``.
        spec: the teacher (``None`` for a cache opened without ``--teacher``).
        config: the teacher's :class:`ModelConfig`, set by :meth:`prepare`.
    """

    kind: str = ""

    def __init__(self, spec: Optional[TeacherSpec]):
        self.spec = spec
        self.config: Optional[ModelConfig] = None

    @abc.abstractmethod
    def prepare(self, data_label_map: LabelMap, student_num_classes: int, image_size: Optional[int],
                check_image_size: bool = True) -> None:
        """Check the teacher against the data and the student; set :attr:`config`."""

    def start(self, attn_mode: str, device: str) -> None:
        """Get ready to deliver outputs with attention maps of kind ``attn_mode``, on ``device``."""
        self.device = device

    def batches(self, loader: Iterable) -> Iterable:
        """The training batches of an epoch (a source may compute ahead: Ray)."""
        return loader

    def outputs(self, batch: Batch) -> TeacherOutputs:
        """The teacher outputs of ``batch`` (its images and mask already on the training device)."""
        if batch.teacher is None:
            raise RuntimeError(f"the {self.kind} teacher source delivered a batch without teacher outputs")
        return batch.teacher.to(self.device)

    def eval_model(self) -> Optional[nn.Module]:
        """A teacher model to evaluate (``teacher_check.eval_images``), or ``None`` when there is none here."""
        return None

    def close(self) -> None:
        """Release what :meth:`start` acquired (actors, Ray, open files)."""

    def describe(self) -> dict[str, Any]:
        """What the run record says of this source."""
        return {"mode": self.kind, "teacher": self.spec.to_dict() if self.spec is not None else None}


class InProcessSource(TeacherSource):
    """The frozen teacher in the training process, on the student's padded batch."""

    kind = "inprocess"

    def __init__(self, spec: TeacherSpec):
        super().__init__(spec)
        self.model: Optional[nn.Module] = None
        self.teacher: Optional[InProcessTeacher] = None

    def prepare(self, data_label_map, student_num_classes, image_size, check_image_size=True) -> None:
        model, t_label_map, t_image_size = load_teacher(self.spec, data_label_map)
        check_teacher_fits(self.spec, t_label_map, t_image_size, data_label_map, student_num_classes, image_size,
                           check_image_size=check_image_size)
        self.model, self.config = model, model.config

    def start(self, attn_mode: str, device: str) -> None:
        super().start(attn_mode, device)
        self.teacher = InProcessTeacher(self.model, attn=attn_mode).to(device)

    def outputs(self, batch: Batch) -> TeacherOutputs:
        return self.teacher(batch.images, batch.mask)

    def eval_model(self) -> Optional[nn.Module]:
        return self.model


class RaySource(TeacherSource):
    """Ray actors run the teacher on upcoming batches (:class:`~kd_detr.teacher.ray_serving.RayTeacherServer`).

    No teacher model is loaded in the training process, except for ``teacher_check.eval_images``
    (:meth:`eval_model`)."""

    kind = "ray"

    def __init__(self, spec: TeacherSpec, actors: int = 1, prefetch: int = 2, address: Optional[str] = None):
        super().__init__(spec)
        if actors < 1 or prefetch < 1:
            raise ValueError("--teacher-actors and the prefetch depth must be >= 1")
        self.actors, self.prefetch, self.address = actors, prefetch, address
        self.server = None
        self._label_map: Optional[LabelMap] = None

    def prepare(self, data_label_map, student_num_classes, image_size, check_image_size=True) -> None:
        self.config, t_label_map, t_image_size = describe_teacher(self.spec, data_label_map)
        check_teacher_fits(self.spec, t_label_map, t_image_size, data_label_map, student_num_classes, image_size,
                           check_image_size=check_image_size)
        self._label_map = data_label_map

    def start(self, attn_mode: str, device: str) -> None:
        from .ray_serving import RayTeacherServer

        super().start(attn_mode, device)
        self.server = RayTeacherServer(self.spec, attn_mode, actors=self.actors, prefetch=self.prefetch,
                                       address=self.address, label_map=self._label_map)

    def batches(self, loader: Iterable) -> Iterable:
        return self.server.prefetching(iter(loader))

    def eval_model(self) -> Optional[nn.Module]:
        model, _, _ = load_teacher(self.spec, self._label_map)  # only for the AP check: then dropped
        return model

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "actors": self.actors, "prefetch": self.prefetch, "address": self.address}


class CacheSource(TeacherSource):
    """Teacher outputs replayed from a teacher cache (``kd-detr cache``), read with each batch in the loader.

    ``spec`` (``--teacher``) is optional: given, the cache must have been built from its checkpoint.
    """

    kind = "cache"

    def __init__(self, cache: str, spec: Optional[TeacherSpec] = None):
        super().__init__(spec)
        self.cache = cache
        self.reader = None

    def open(self, dataset, label_map: LabelMap, image_size: Optional[int]):
        """Open the cache for a run on ``dataset``, refusing one built for other data, labels, sizes or teacher
        (any batch size reads it: it holds one entry per image view). Returns the
        :class:`~kd_detr.teacher.cache.CacheReader` (it also fixes the view plan)."""
        from .cache import CacheReader, sha256_file
        from .cache.fingerprint import images_problem

        reader = CacheReader(self.cache)
        m = reader.manifest
        problems = []
        ds = m["dataset"]
        if ds.get("images") != len(dataset):
            problems.append(f"images: cache has {ds.get('images')}, this data set has {len(dataset)}")
        if ds.get("annotations_sha256") != sha256_file(dataset.ann_file):
            problems.append(f"annotations: the cache was built from another annotation file ({ds.get('annotations')})")
        problem = images_problem(m, dataset)  # the images themselves (names, sizes, modification times)
        if problem:
            problems.append(problem)
        if ds.get("label_map") != label_map.to_dict():
            problems.append("label_map: the cache's label map differs from this run's (--label-map)")
        if ds.get("image_size") != image_size:
            problems.append(f"image_size: cache has {ds.get('image_size')}, this run uses {image_size} (--image-size)")
        recorded = m["teacher"].get("transformers_version")
        if recorded:
            import transformers

            if recorded != transformers.__version__:
                problems.append(f"transformers: the cache's teacher ran under transformers {recorded}, this is "
                                f"{transformers.__version__} (its numbers may differ): rebuild the cache or install "
                                f"transformers=={recorded}")
        if self.spec is not None:
            sha = teacher_weights_sha256(self.spec)
            if m["teacher"].get("checkpoint_sha256") != sha:
                problems.append(f"teacher: the cache was built with {m['teacher'].get('checkpoint')} "
                                f"(sha256 {str(m['teacher'].get('checkpoint_sha256'))[:12]}...), not {self.spec.checkpoint}")
        if problems:
            raise ValueError(f"teacher cache {self.cache} does not match this run:\n  " + "\n  ".join(problems))
        self.reader = reader
        return reader

    def prepare(self, data_label_map, student_num_classes, image_size, check_image_size=True) -> None:
        if self.reader is None:
            raise RuntimeError("CacheSource.open() must come before prepare(): the cache fixes the run's view plan")
        self.config = config_from_dict(self.reader.manifest["teacher"]["config"])

    def start(self, attn_mode: str, device: str) -> None:
        super().start(attn_mode, device)
        check_cache_serves(self.reader.manifest, attn_mode, self.cache)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cache": self.cache}


def check_cache_serves(manifest: dict, attn_mode: str, cache: str) -> None:
    """Refuse a cache without the attention maps a method distils (or with coarser ones)."""
    store = manifest["store"]
    if attn_mode == "none":
        return
    if store.get("attention") == "none":
        raise ValueError(f"teacher cache {cache} stores no attention maps but the recipe distils them "
                         "(distill.self_attn / distill.cross_attn): rebuild with --attention full or topk:K, "
                         "or disable those terms")
    if attn_mode == "per_head" and store.get("heads") != "per_head":
        raise ValueError(f"teacher cache {cache} stores head-averaged attention maps but the recipe compares them "
                         "per head (per_head = true): rebuild with --heads per_head, or set per_head = false")
