"""``kd-detr distill``: the foundation's trainer with a teacher and the D3ETR loss.

Everything else (schedule, AdamW, logging, checkpoints, resume, DDP, AMP, evaluation) is the
foundation :class:`~kd_detr.engine.trainer.Trainer`'s. The trained model is the plain student; the
teacher, its queries and any projection live beside it and never enter the student's weights.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kd_detr import data as kd_data
from kd_detr.atomic import write_text_atomic
from kd_detr.criterion import weighted_total
from kd_detr.engine import distributed
from kd_detr.engine.objective import AuxiliaryObjective
from kd_detr.engine.trainer import Trainer, TrainConfig, to_float32

from .d3etr import D3ETRLoss
from .recipe import Recipe, recipe_to_toml
from .teacher import InProcessTeacher, TeacherOutputs
from .teacher_loading import TeacherSpec, check_teacher_fits, load_teacher

log = logging.getLogger("kd_detr.distill")

__all__ = ["DistillTrainer", "build_objectives", "distill", "distill_losses"]

# A teacher source: (images [B,3,H,W], mask [B,H,W]) -> TeacherOutputs for that padded batch.
TeacherFn = Callable[[torch.Tensor, torch.Tensor], TeacherOutputs]


def distill_losses(model, teacher: Optional[TeacherFn], kd: Optional[D3ETRLoss], criterion, images, mask, targets,
                   aux_loss: bool = True, objectives: Sequence[AuxiliaryObjective] = (), raw_model=None,
                   teacher_out: Optional[TeacherOutputs] = None):
    """One training forward: teacher (if any), student (with the auxiliary group when distilling, and
    what the objectives ask for), GT + KD + objective losses.

    Returns ``(total, gt_terms, extra_terms, extra_weights)``: unweighted term dicts, the GT weights in
    ``criterion.weight_dict``, the others in ``extra_weights``. Shared by the trainer and
    ``benchmarks/distill_step.py``. ``raw_model``: the unwrapped detector (for objectives), default ``model``.
    ``teacher_out``: the teacher's outputs for this batch when they come from elsewhere (a cache, Ray
    actors); otherwise ``teacher(images, mask)`` runs here.
    """
    if kd is not None and teacher_out is None:
        teacher_out = teacher(images, mask)
    kwargs: dict[str, Any] = {}
    for obj in objectives:
        kwargs.update(obj.forward_kwargs())
    if kd is not None:
        kwargs.update(extra_groups=kd.extra_groups(teacher_out), return_attn=kd.needs_attn)
    outputs = model(images, mask, **kwargs)
    with torch.autocast(images.device.type, enabled=False):  # losses in float32 under AMP
        out32 = to_float32(outputs)
        gt_outputs = out32 if aux_loss else {k: v for k, v in out32.items() if k != "aux_outputs"}
        gt = criterion(gt_outputs, targets)
        num_boxes = criterion.num_boxes(targets, images.device)
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if kd is not None:
            terms.update(kd(out32, teacher_out.float(), targets, num_boxes=num_boxes))
            weights.update(kd.weight_dict)
        for obj in objectives:
            terms.update(obj(raw_model if raw_model is not None else model, out32, targets, num_boxes))
            weights.update(obj.weight_dict)
    total = weighted_total(gt, criterion.weight_dict)
    if terms:
        total = total + weighted_total(terms, weights)
    return total, gt, terms, weights


def build_objectives(recipe: Recipe, model_config, criterion) -> list[AuxiliaryObjective]:
    """The training-only objectives a recipe switches on (one-to-many supervision for the student)."""
    objectives: list[AuxiliaryObjective] = []
    if recipe.ms_detr.enabled:
        from kd_detr.ms_detr import MixedSupervision
        objectives.append(MixedSupervision(recipe.ms_detr, model_config, criterion))
    if recipe.co_detr.enabled:
        from kd_detr.co_detr import CollaborativeHybrid
        objectives.append(CollaborativeHybrid(recipe.co_detr, model_config, criterion))
    return objectives


@dataclass
class TeacherServing:
    """Where the teacher's outputs come from.

    ``inprocess``: the teacher runs in the training process. ``cache``: read from a teacher cache
    (``cache``: its folder; no teacher model is built). ``ray``: Ray actors run the teacher on upcoming
    batches (``actors``, ``prefetch``). ``views``: train on a view plan of K recorded views per image
    (implied by ``cache``, which fixes K, the batches and the seed); ``view_seed`` seeds the plan.
    """

    mode: str = "inprocess"
    views: Optional[int] = None
    view_seed: int = 0
    cache: Optional[str] = None
    actors: int = 1
    prefetch: int = 2
    address: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in ("inprocess", "cache", "ray"):
            raise ValueError(f"teacher serving mode must be inprocess, cache or ray, got {self.mode!r}")
        if (self.mode == "cache") != (self.cache is not None):
            raise ValueError("--teacher-cache CACHE selects the cache mode")
        if self.views is not None and self.views < 1:
            raise ValueError(f"--views must be >= 1, got {self.views}")
        if self.actors < 1 or self.prefetch < 1:
            raise ValueError("--teacher-actors and the prefetch depth must be >= 1")


def _identity(batch):
    return batch


class DistillTrainer(Trainer):
    """Trains ``cfg.model`` (the student) with ``recipe``; ``teacher`` may be None only for recipes
    with ``distill.enabled = false`` (the baseline)."""

    def __init__(self, cfg: TrainConfig, recipe: Recipe, teacher: Optional[TeacherSpec] = None,
                 serving: Optional[TeacherServing] = None):
        super().__init__(cfg)
        self.recipe = recipe
        self.serving = serving or TeacherServing()
        self.cache_reader = None
        self.server = None
        self.plan = None
        self.teacher_spec = teacher if recipe.distill.enabled else None
        if recipe.distill.enabled and teacher is None and self.serving.mode != "cache":
            raise ValueError(f"recipe {recipe.name} distils from a teacher: give --teacher (or --teacher-cache)")
        if teacher is not None and not recipe.distill.enabled:
            log.info("recipe %s trains the student alone; --teacher %s is not used", recipe.name, teacher.name)
        self.teacher: Optional[TeacherFn] = None
        self.kd_loss: Optional[D3ETRLoss] = None
        self.teacher_metrics: dict[str, Any] = {}
        self.objectives: list[AuxiliaryObjective] = []

    # ---------------------------------------------------------------- setup
    def build_data(self) -> None:
        super().build_data()
        sv = self.serving
        if sv.mode != "cache" and sv.views is None:
            return
        from kd_detr.data.view_plan import PlanBatches, PlanBatchSampler, ViewPlan

        if not self.cfg.augment:
            raise ValueError("a view plan records augmented views: it cannot be combined with --no-augment")
        if sv.mode == "cache":
            self.cache_reader = open_cache_for_run(sv.cache, self.train_set, self.label_map, self.cfg,
                                                   self.recipe, self.teacher_spec)
            p = self.cache_reader.manifest["plan"]
            if sv.views is not None and sv.views != p["num_views"]:
                raise ValueError(f"--views {sv.views}: teacher cache {sv.cache} holds {p['num_views']} views per image")
            self.plan = ViewPlan.for_dataset(self.train_set, p["num_views"], p["batch_size"], p["seed"])
            if self.plan.fingerprint() != p["fingerprint"]:
                raise ValueError(f"teacher cache {sv.cache} was built for another view plan (images, their sizes or "
                                 "the augmentation policy differ): rebuild it with kd-detr cache")
        else:
            self.plan = ViewPlan.for_dataset(self.train_set, sv.views, self.cfg.batch_size, sv.view_seed)
        self.sampler = PlanBatchSampler(self.plan, self.cfg.seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size)
        source = self.cache_reader if sv.mode == "cache" and self.recipe.distill.enabled else None
        self.train_loader = DataLoader(PlanBatches(self.train_set, self.plan, source), batch_size=None,
                                       sampler=self.sampler, num_workers=self.cfg.num_workers,
                                       collate_fn=_identity, generator=self._loader_generator(),
                                       pin_memory=self.device.startswith("cuda"))
        log.info("view plan: %d views per image, %d batches of %d per view%s", self.plan.num_views,
                 self.plan.num_batches(), self.plan.batch_size,
                 f", teacher outputs read from {sv.cache}" if source is not None else "")

    def build_extras(self) -> None:
        # Building the teacher and the objectives must not shift the training RNG (dropout): a run
        # then matches its baseline / in-process / cached twin draw for draw.
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            self._build_extras()

    def _build_extras(self) -> None:
        self.objectives = [o.to(self.device) for o in build_objectives(self.recipe, self.raw_model.config,
                                                                        self.criterion)]
        if not self.recipe.distill.enabled:
            return
        if self.serving.mode == "cache":  # no teacher model: its config comes from the cache
            from kd_detr.models import ModelConfig

            teacher_config = ModelConfig.from_dict(self.cache_reader.manifest["teacher"]["config"])
            self.kd_loss = D3ETRLoss(self.recipe.distill, self.raw_model.config, teacher_config, self.criterion)
            self.kd_loss.to(self.device)
            check_cache_serves_recipe(self.cache_reader.manifest, self.kd_loss.attn_mode, self.serving.cache)
            if self.recipe.teacher_check.eval_images > 0:
                log.warning("teacher_check.eval_images is skipped with --teacher-cache (no teacher model is loaded)")
            return
        spec = self.teacher_spec
        model, t_label_map, t_image_size = load_teacher(spec, self.label_map)
        check_teacher_fits(spec, t_label_map, t_image_size, self.label_map, self.raw_model.config.num_classes,
                           self.cfg.image_size, check_image_size=self.recipe.teacher_check.image_size)
        # Refuses incompatible architectures (layers, hidden size, heads, strides) with the recipe option to use.
        self.kd_loss = D3ETRLoss(self.recipe.distill, self.raw_model.config, model.config, self.criterion)
        self.kd_loss.to(self.device)
        teacher = InProcessTeacher(model, attn=self.kd_loss.attn_mode).to(self.device)
        self.teacher = teacher
        if self.recipe.teacher_check.eval_images > 0:
            self.check_teacher_ap(teacher.model)
        if self.serving.mode == "ray":
            from kd_detr.serving import RayTeacherServer

            self.server = RayTeacherServer(spec, self.kd_loss.attn_mode, actors=self.serving.actors,
                                           prefetch=self.serving.prefetch, address=self.serving.address)
        log.info("teacher %s (%s, %s): %d decoder layers, %d queries; student %s; recipe %s",
                 spec.name, spec.model, spec.checkpoint, model.config.dec_layers, model.config.num_queries,
                 self.cfg.model, self.recipe.name)

    def check_teacher_ap(self, model: torch.nn.Module) -> None:
        """Evaluate the teacher on the first validation images and refuse it if it is far too weak."""
        from kd_detr.evaluation import evaluate_model

        chk, spec = self.recipe.teacher_check, self.teacher_spec
        if self.val_set is None:
            raise ValueError("teacher_check.eval_images > 0 needs validation data (--data or --val-ann/--val-images)")
        n = min(chk.eval_images, len(self.val_set))
        loader = DataLoader(Subset(self.val_set, range(n)), batch_size=self.cfg.eval_batch_size, shuffle=False,
                            num_workers=0, collate_fn=kd_data.collate_fn)
        result, _ = evaluate_model(model, loader, self.val_set.coco, self.label_map, self.device,
                                   progress=self.main and self.cfg.progress)
        if result is None:  # non-zero ranks of a distributed evaluation
            return
        ap = 100 * result.metrics["AP"]
        self.teacher_metrics = {"teacher_AP_check": ap, "teacher_AP_check_images": n}
        log.info("teacher %s: AP %.1f on the first %d validation images", spec.name, ap, n)
        if ap < chk.min_ap:
            raise ValueError(f"teacher {spec.name} ({spec.checkpoint}) reaches AP {ap:.1f} on {n} validation images, "
                             f"below teacher_check.min_ap = {chk.min_ap}: wrong checkpoint, label map or data?")
        if spec.known_ap is not None and spec.known_ap - ap > chk.max_ap_drop:
            raise ValueError(f"teacher {spec.name} reaches AP {ap:.1f} on {n} validation images, {spec.known_ap - ap:.1f} "
                             f"points below its card's {spec.known_ap} (teacher_check.max_ap_drop = {chk.max_ap_drop})")

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the student (never part of it): the distillation projection, objectives."""
        mods: dict[str, torch.nn.Module] = {}
        if self.kd_loss is not None and self.kd_loss.projection is not None:
            mods["distill_projection"] = self.kd_loss.projection
        for obj in self.objectives:
            mods[f"objective.{obj.name}"] = obj
        return mods

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        for name, mod in self.extra_modules().items():
            params = [p for p in mod.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay,
                               "name": name})
        return groups

    def after_backward(self) -> None:
        # Extra modules sit outside the DDP-wrapped student: average their gradients by hand.
        if not self.dist.enabled:
            return
        for mod in self.extra_modules().values():
            for p in mod.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.dist.world_size

    def extra_state(self) -> dict[str, Any]:
        return {name: mod.state_dict() for name, mod in self.extra_modules().items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, mod in self.extra_modules().items():
            if name not in state:
                raise ValueError(f"the checkpoint has no state for {name}: was it written by another recipe?")
            mod.load_state_dict(state[name])

    # ---------------------------------------------------------------- step
    def training_step(self, images, mask, targets):
        if self.kd_loss is None and not self.objectives:
            total, logs = super().training_step(images, mask, targets)
            # the same summary key as distilled runs, so comparisons can plot it for every recipe
            logs["student.total"] = sum(v for k, v in logs.items() if k in self.criterion.weight_dict)
            return total, logs
        teacher_out = getattr(self, "batch_extra", None)
        if teacher_out is not None:
            teacher_out = teacher_out.to(self.device)
        total, gt, kd_terms, weights = distill_losses(
            self.model, self.teacher, self.kd_loss, self.criterion, images, mask, targets,
            aux_loss=self.cfg.aux_loss, objectives=self.objectives, raw_model=self.raw_model,
            teacher_out=teacher_out)
        logs: dict[str, float] = {}
        sums: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value

        for terms, wd, is_kd in ((gt, self.criterion.weight_dict, False), (kd_terms, weights, True)):
            for k, v in terms.items():
                value = float(v.detach())
                logs[k] = value * wd[k]
                logs[k + "_unscaled"] = value
                if is_kd:  # sums over layers (distill.adaptive.self_attn) and per namespace (distill.total)
                    add(k.rsplit(".l", 1)[0], value * wd[k])
                    add(k.split(".")[0] + ".total", value * wd[k])
                else:
                    add("student.total", value * wd[k])
        logs.update(sums)
        return total, logs

    def train_batches(self):
        if self.server is not None:  # Ray actors compute the teacher on upcoming batches
            return self.server.prefetching(iter(self.train_loader))
        return self.train_loader

    # ---------------------------------------------------------------- records
    def model_metadata(self) -> dict[str, Any]:
        meta = super().model_metadata()
        meta["recipe"] = self.recipe.name
        if self.teacher_spec is not None:
            meta["teacher"] = self.teacher_spec.name
        return meta

    def run_config(self) -> dict[str, Any]:
        rc = super().run_config()
        rc["recipe"] = self.recipe.to_dict()
        rc["recipe_files"] = list(self.recipe.chain)
        rc["teacher"] = self.teacher_spec.to_dict() if self.teacher_spec else None
        rc["teacher_serving"] = dataclasses.asdict(self.serving)
        if self.plan is not None:
            rc["view_plan"] = self.plan.to_dict()
        rc.update(self.teacher_metrics)
        return rc

    def setup(self) -> None:
        super().setup()  # refuses an output dir holding another run before anything is written
        saved = self.out / "recipe.toml"
        merged = recipe_to_toml(self.recipe.to_dict())
        if self.iteration > 0 and saved.exists():
            # the schedule may change on resume (e.g. more iterations); the distillation may not
            before = tomllib.loads(saved.read_text()).get("distill")
            if before != self.recipe.to_dict()["distill"]:
                raise ValueError(f"--resume: the [distill] section of {saved} differs from the recipe given now "
                                 f"({self.recipe.name} with its --set overrides); resume with the same recipe, or "
                                 "start a new --output-dir")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(saved, merged)


def open_cache_for_run(cache: str, dataset, label_map, cfg: TrainConfig, recipe: Recipe,
                       spec: Optional[TeacherSpec]):
    """Open a teacher cache for this run, refusing one built for other data, labels, sizes or teacher."""
    from kd_detr.teacher_cache import CacheReader, sha256_file

    reader = CacheReader(cache)
    m = reader.manifest
    problems = []
    ds = m["dataset"]
    if ds.get("images") != len(dataset):
        problems.append(f"images: cache has {ds.get('images')}, this data set has {len(dataset)}")
    if ds.get("annotations_sha256") != sha256_file(dataset.ann_file):
        problems.append(f"annotations: the cache was built from another annotation file ({ds.get('annotations')})")
    if ds.get("label_map") != label_map.to_dict():
        problems.append("label_map: the cache's label map differs from this run's (--label-map)")
    if ds.get("image_size") != cfg.image_size:
        problems.append(f"image_size: cache has {ds.get('image_size')}, this run uses {cfg.image_size} (--image-size)")
    if m["plan"].get("batch_size") != cfg.batch_size:
        problems.append(f"batch_size: the cache's plan batches hold {m['plan'].get('batch_size')} images, this run "
                        f"uses train.batch_size = {cfg.batch_size} (a cached batch is only valid with its padding)")
    if spec is not None:
        sha = sha256_file(spec.checkpoint)
        if m["teacher"].get("checkpoint_sha256") != sha:
            problems.append(f"teacher: the cache was built with {m['teacher'].get('checkpoint')} "
                            f"(sha256 {str(m['teacher'].get('checkpoint_sha256'))[:12]}...), not {spec.checkpoint}")
    if problems:
        raise ValueError(f"teacher cache {cache} does not match this run:\n  " + "\n  ".join(problems))
    return reader


def check_cache_serves_recipe(manifest: dict, attn_mode: str, cache: str) -> None:
    """Refuse a cache without the attention maps the recipe distils (or with coarser ones)."""
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


def distill(cfg: TrainConfig, recipe: Recipe, teacher: Optional[TeacherSpec],
            serving: Optional[TeacherServing] = None) -> dict[str, Any]:
    """Run a whole distillation job (used by ``kd-detr distill``)."""
    trainer = None
    try:
        trainer = DistillTrainer(cfg, recipe, teacher, serving)
        return trainer.fit()
    finally:
        if trainer is not None and trainer.server is not None:
            trainer.server.close()
        distributed.cleanup()
