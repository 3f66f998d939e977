"""One way to assemble a run: a recipe plus overrides, a student, a data spec and a teacher source spec
become a configured :class:`Run` (``kd-detr distill``, each run of ``kd-detr compare``, the quickstart);
a model, a data spec and training options without a recipe become one too (``kd-detr train``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from kd_detr.data import DataSpec
from kd_detr.engine.recipe import Recipe, load_recipe
from kd_detr.engine.trainer import TrainConfig, train
from kd_detr.teacher import CacheSource, InProcessSource, RaySource, TeacherSource, resolve_teacher

__all__ = ["TeacherSourceSpec", "Run", "assemble_run", "assemble_train_run", "build_teacher_source"]


@dataclass
class TeacherSourceSpec:
    """Where the teacher comes from, as the command line says it.

    ``teacher``: a teacher card name or path, or a registered model name with ``checkpoint``. ``cache``: a
    teacher cache folder (then no teacher model is loaded; ``teacher``, if given, must be the cache's). ``serve``:
    ``inprocess`` | ``ray`` (``actors`` Ray actors, ``prefetch`` batches ahead, ``address`` of a cluster).
    """

    teacher: Optional[str] = None
    checkpoint: Optional[str] = None
    cache: Optional[str] = None
    serve: str = "inprocess"
    actors: int = 1
    prefetch: int = 2
    address: Optional[str] = None
    allow_partial_weights: bool = False  # a transformers teacher may load with tensors missing or re-initialised
    precision: str = "float32"  # --teacher-precision: float32 | bfloat16 | float16, the same in every source

    def __post_init__(self) -> None:
        if self.serve not in ("inprocess", "ray"):
            raise ValueError(f"--teacher-serve must be inprocess or ray, got {self.serve!r}")
        if self.cache and self.serve == "ray":
            raise ValueError("--teacher-cache and --teacher-serve ray exclude each other")
        if self.actors < 1 or self.prefetch < 1:
            raise ValueError("--teacher-actors and the prefetch depth must be >= 1")


def build_teacher_source(spec: TeacherSourceSpec, recipe: Recipe) -> Optional[TeacherSource]:
    """The teacher source of a run. A recipe without a teacher gets none, except a cache (it fixes the
    view plan, so that a baseline trains on the same batches as its distilled twins)."""
    if spec.cache:
        return CacheSource(spec.cache, resolve_teacher(spec.teacher, spec.checkpoint, spec.allow_partial_weights,
                                                       spec.precision)
                           if recipe.distils and spec.teacher else None, precision=spec.precision)
    if not recipe.distils:
        return None
    if spec.teacher is None:
        raise ValueError(f"recipe {recipe.name} distils from a teacher: give --teacher or --teacher-cache")
    teacher = resolve_teacher(spec.teacher, spec.checkpoint, spec.allow_partial_weights, spec.precision)
    if spec.serve == "ray":
        return RaySource(teacher, actors=spec.actors, prefetch=spec.prefetch, address=spec.address)
    return InProcessSource(teacher)


@dataclass
class Run:
    """A configured run: what :func:`kd_detr.engine.trainer.train` needs (``recipe`` ``None``: ground truth
    only, ``kd-detr train``)."""

    cfg: TrainConfig
    recipe: Optional[Recipe]
    teacher: Optional[TeacherSource] = None
    views: Optional[int] = None
    view_seed: int = 0
    record: dict[str, Any] = field(default_factory=dict)

    def run(self) -> dict[str, Any]:
        """Train; returns the final metrics (``{}`` on non-zero ranks)."""
        return train(self.cfg, self.recipe, self.teacher, self.views, self.view_seed)


def assemble_run(student: str, recipe: str, data: DataSpec, teacher: TeacherSourceSpec, output_dir: str, *,
                 student_overrides: Optional[dict[str, Any]] = None, overrides: Sequence[str] = (),
                 train_options: Optional[dict[str, Any]] = None, resume: Optional[str] = None,
                 views: Optional[int] = None, view_seed: int = 0) -> Run:
    """Turn a recipe (name or path) and its ``--set`` ``overrides`` into a configured run.

    ``train_options``: ``TrainConfig`` values given on the command line (``None`` values are left to the
    recipe); they win over the recipe's ``[train]``, as do ``data.image_size`` and ``data.label_map`` when set.
    """
    r = load_recipe(recipe, list(overrides))
    kwargs = dict(r.train_config_kwargs())
    given = {"image_size": data.image_size, "label_map": data.label_map, **(train_options or {})}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    cfg = _train_config(student, data, output_dir, student_overrides, resume, kwargs)
    source = build_teacher_source(teacher, r)
    return Run(cfg, r, source, views=views, view_seed=view_seed,
               record={"teacher_source": asdict(teacher)})


def assemble_train_run(model: str, data: DataSpec, output_dir: str, *,
                       model_overrides: Optional[dict[str, Any]] = None,
                       train_options: Optional[dict[str, Any]] = None, resume: Optional[str] = None) -> Run:
    """``model`` trained on ground truth alone: no recipe, no teacher (``kd-detr train``).

    ``train_options``: the other ``TrainConfig`` fields, each as given (``None`` included; a field left out
    keeps ``TrainConfig``'s default); ``data.image_size`` and ``data.label_map`` are used when set.
    """
    given = {k: v for k, v in (("image_size", data.image_size), ("label_map", data.label_map)) if v is not None}
    return Run(_train_config(model, data, output_dir, model_overrides, resume, {**given, **(train_options or {})}),
               recipe=None)


def _train_config(model: str, data: DataSpec, output_dir: str, model_overrides: Optional[dict[str, Any]],
                  resume: Optional[str], options: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` of a run: ``options`` and the data spec's paths (and its ``skip_bad_labels``)."""
    return TrainConfig(model=model, model_overrides=dict(model_overrides or {}), output_dir=output_dir,
                       resume=resume, **data.paths(), skip_bad_labels=bool(data.skip_bad_labels), **options)
