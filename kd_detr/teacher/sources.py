"""Where a distillation's teacher outputs come from: one :class:`TeacherSource` interface, three sources.

The trainer asks every source the same things, in this order:

1. :meth:`TeacherSource.view_plan`: the view plan the run must train on, if the source fixes one (a cache
   was built on one: the source opens the cache and checks it against the data; the others fix none);
2. :meth:`TeacherSource.loader_hook`: what the loader's workers read with each view (a cache reader, after
   checking it holds every view the run reads; ``None`` for the others), typed by
   :class:`~kd_detr.data.ViewOutputsReader`;
3. :meth:`TeacherSource.prepare`: check the teacher against the data and the student, and say what it is
   (:attr:`config`, the teacher's :class:`~kd_detr.models.ModelConfig`: the methods refuse pairs that
   do not fit before any training);
4. :meth:`TeacherSource.start`: get ready to deliver maps of the kind a method asks (``per_head`` |
   ``mean`` | ``none``), and the encoder's feature maps when a method distils them (``features``);
5. every epoch, :meth:`TeacherSource.batches`: the loader's batches on the training device, each with
   ``batch.teacher`` set, the one channel teacher outputs reach the training step through.

* :class:`InProcessSource`: the frozen teacher runs in the training process, in :meth:`batches`, at its own
  precision (never under the student's autocast).
* :class:`CacheSource`: outputs were computed once (``kd-detr cache``) and are read with each view in the
  loader's workers (:meth:`loader_hook`); no teacher model is loaded.
* :class:`RaySource`: Ray actors compute the outputs of upcoming batches while the student trains.

Every source runs the teacher with :class:`InProcessTeacher` at ``spec.precision`` (``--teacher-precision``),
so the three give the same numbers.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Iterable, Iterator, Optional, Sequence

from torch import nn

from kd_detr.data import Batch, LabelMap, ViewOutputsReader
from kd_detr.data.view_plan import ViewKey, ViewPlan
from kd_detr.models import ModelConfig, config_from_dict

from .loading import TeacherSpec, check_teacher_fits, describe_teacher, load_teacher, teacher_weights_sha256
from .inprocess import InProcessTeacher, check_precision

log = logging.getLogger("kd_detr.teacher")

__all__ = ["InProcessTeacher", "TeacherSource", "InProcessSource", "CacheSource", "RaySource",
           "check_cache_serves"]


class TeacherSource(abc.ABC):
    """Provides the teacher outputs of each training batch (see the module docstring for the protocol).

    Attributes:
        kind: ``inprocess`` | ``cache`` | ``ray``.
        spec: the teacher (``None`` for a cache opened without ``--teacher``).
        config: the teacher's :class:`ModelConfig`, set by :meth:`prepare`.
        fixes_view_plan: the source decides the run's view plan (:meth:`view_plan`), so it is kept even for a
            recipe that does not distil (its baseline then trains on the same views as its distilled twins).
    """

    kind: str = ""
    fixes_view_plan: bool = False

    def __init__(self, spec: Optional[TeacherSpec]):
        self.spec = spec
        self.config: Optional[ModelConfig] = None

    def view_plan(self, dataset, label_map: LabelMap, image_size: Optional[int],
                  views: Optional[int]) -> Optional[ViewPlan]:
        """The view plan the run trains on when this source fixes one (``views``: ``--views``, checked against
        it), else ``None``."""
        return None

    @abc.abstractmethod
    def prepare(self, data_label_map: LabelMap, student_num_classes: int, image_size: Optional[int],
                check_image_size: bool = True) -> None:
        """Check the teacher against the data and the student; set :attr:`config`."""

    def start(self, attn_mode: str, device: str, features: bool = False) -> None:
        """Get ready to deliver outputs with attention maps of kind ``attn_mode`` (and with the teacher's encoder
        output maps when ``features``), on ``device``."""
        self.device = device
        self.features = bool(features)

    def loader_hook(self, plan: Optional[ViewPlan], reads: Sequence[ViewKey]) -> Optional[ViewOutputsReader]:
        """What the loader's workers read with each view of ``plan`` (``None``: nothing, the outputs come in
        :meth:`batches`). ``reads``: the ``(image, view)`` pairs the run will read, checked to be there."""
        return None

    def batches(self, loader: Iterable, device: str) -> Iterator[Batch]:
        """The loader's batches of an epoch on ``device``, each with ``batch.teacher`` (its
        :class:`~kd_detr.teacher.outputs.TeacherOutputs`, float32, on ``device``)."""
        for item in loader:
            batch = Batch.of(item)
            if batch.teacher is None:
                raise RuntimeError(f"the {self.kind} teacher source delivered a batch without teacher outputs")
            yield batch.to(device)

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

    def start(self, attn_mode: str, device: str, features: bool = False) -> None:
        super().start(attn_mode, device, features)
        self.teacher = InProcessTeacher(self.model, attn=attn_mode, precision=self.spec.precision,
                                        features=features).to(device)

    def batches(self, loader: Iterable, device: str) -> Iterator[Batch]:
        for item in loader:
            batch = Batch.of(item).to(device)
            yield batch._replace(teacher=self.teacher(batch.images, batch.mask))

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

    def start(self, attn_mode: str, device: str, features: bool = False) -> None:
        from .ray_serving import RayTeacherServer

        super().start(attn_mode, device, features)
        self.server = RayTeacherServer(self.spec, attn_mode, actors=self.actors, prefetch=self.prefetch,
                                       address=self.address, label_map=self._label_map, features=features)

    def batches(self, loader: Iterable, device: str) -> Iterator[Batch]:
        return super().batches(self.server.prefetching(iter(loader)), device)

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
    """Teacher outputs replayed from a teacher cache (``kd-detr cache``), read with each view in the loader's
    workers. The cache fixes the run's view plan.

    ``spec`` (``--teacher``) is optional: given, the cache must have been built from its checkpoint.
    ``precision`` (``--teacher-precision``) must be the one the cache was built at.
    """

    kind = "cache"
    fixes_view_plan = True

    def __init__(self, cache: str, spec: Optional[TeacherSpec] = None, precision: Optional[str] = None):
        super().__init__(spec)
        self.cache = cache
        self.precision = check_precision(precision if precision is not None
                                         else spec.precision if spec is not None else "float32",
                                         "--teacher-precision")
        self.reader = None

    def open(self, dataset, label_map: LabelMap, image_size: Optional[int]):
        """Open the cache for a run on ``dataset``, refusing one built for other data, labels, sizes, teacher or
        teacher precision (any batch size reads it: it holds one entry per image view). Returns the
        :class:`~kd_detr.teacher.cache.CacheReader`."""
        from .cache import CacheReader
        from .cache.fingerprint import images_problem

        reader = CacheReader(self.cache)
        m = reader.manifest
        problems = []
        ds = m["dataset"]
        if ds.get("images") != len(dataset):
            problems.append(f"images: cache has {ds.get('images')}, this data set has {len(dataset)}")
        if ds.get("annotations_sha256") != dataset.annotations_sha256():
            problems.append(f"annotations: the cache was built from another annotation file ({ds.get('annotations')})")
        problem = images_problem(m, dataset)  # the images themselves (names, sizes, modification times)
        if problem:
            problems.append(problem)
        if ds.get("label_map") != label_map.to_dict():
            problems.append("label_map: the cache's label map differs from this run's (--label-map)")
        if ds.get("image_size") != image_size:
            problems.append(f"image_size: cache has {ds.get('image_size')}, this run uses {image_size} (--image-size)")
        built_at = m["teacher"].get("precision", "float32")  # caches written before the option ran in float32
        if built_at != self.precision:
            problems.append(f"teacher precision: the cache's teacher ran in {built_at}, this run asks for "
                            f"{self.precision} (--teacher-precision): pass --teacher-precision {built_at} or rebuild "
                            "the cache")
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

    def view_plan(self, dataset, label_map, image_size, views) -> ViewPlan:
        """The plan the cache was built on, after checking the cache against the data (:meth:`open`)."""
        reader = self.open(dataset, label_map, image_size)
        p = reader.manifest["plan"]
        if views is not None and views != p["num_views"]:
            raise ValueError(f"--views {views}: teacher cache {self.cache} holds {p['num_views']} views per image")
        plan = ViewPlan.for_dataset(dataset, p["num_views"], p["seed"])
        if plan.fingerprint() != p["fingerprint"]:
            raise ValueError(f"teacher cache {self.cache} was built for another view plan (images, their sizes or "
                             "the augmentation policy differ): rebuild it with kd-detr cache")
        return plan

    def prepare(self, data_label_map, student_num_classes, image_size, check_image_size=True) -> None:
        if self.reader is None:
            raise RuntimeError("CacheSource.view_plan() must come before prepare(): the cache fixes the run's "
                               "view plan")
        self.config = config_from_dict(self.reader.manifest["teacher"]["config"])

    def start(self, attn_mode: str, device: str, features: bool = False) -> None:
        super().start(attn_mode, device, features)
        check_cache_serves(self.reader.manifest, attn_mode, self.cache, features)

    def loader_hook(self, plan, reads) -> ViewOutputsReader:
        """The cache reader, after refusing at start a cache that lacks an ``(image, view)`` of ``reads`` (a
        cache still being built, or a shard file removed): otherwise the run dies in a loader worker at the
        first missing view."""
        missing = self.reader.missing(list(reads), on_disk=True)
        if missing:
            first = ", ".join(f"view {k} of image {i}" for i, k in missing[:3])
            raise ValueError(f"teacher cache {self.cache} is incomplete: {len(missing)} of the {len(reads)} "
                             f"image views this run reads are missing ({first}{', ...' if len(missing) > 3 else ''}); "
                             f"finish it: rerun `kd-detr cache` with the same options (--out {self.cache})")
        return self.reader

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cache": self.cache, "precision": self.precision}


def check_cache_serves(manifest: dict, attn_mode: str, cache: str, features: bool = False) -> None:
    """Refuse a cache without the attention maps a method distils (or with coarser ones), or without the encoder
    feature maps (``features``) a method distils."""
    store = manifest["store"]
    if features and not store.get("features"):
        raise ValueError(f"teacher cache {cache} stores no encoder feature maps but the recipe distils them "
                         "([feature_kd]): rebuild it with `kd-detr cache --features`, or switch [feature_kd] off "
                         "(feature_kd.enabled = false)")
    if attn_mode == "none":
        return
    if store.get("attention") == "none":
        raise ValueError(f"teacher cache {cache} stores no attention maps but the recipe distils them "
                         "(distill.self_attn / distill.cross_attn): rebuild with --attention full or topk:K, "
                         "or disable those terms")
    if attn_mode == "per_head" and store.get("heads") != "per_head":
        raise ValueError(f"teacher cache {cache} stores head-averaged attention maps but the recipe compares them "
                         "per head (per_head = true): rebuild with --heads per_head, or set per_head = false")
