"""``kd-detr distill``: the foundation's trainer with a teacher and the D3ETR loss.

Everything else (schedule, AdamW, logging, checkpoints, resume, DDP, AMP, evaluation) is the
foundation :class:`~kd_detr.engine.trainer.Trainer`'s. The trained model is the plain student; the
teacher, its queries and any projection live beside it and never enter the student's weights.
"""

from __future__ import annotations

import logging
import sys
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
                   aux_loss: bool = True, objectives: Sequence[AuxiliaryObjective] = (), raw_model=None):
    """One training forward: teacher (if any), student (with the auxiliary group when distilling, and
    what the objectives ask for), GT + KD + objective losses.

    Returns ``(total, gt_terms, extra_terms, extra_weights)``: unweighted term dicts, the GT weights in
    ``criterion.weight_dict``, the others in ``extra_weights``. Shared by the trainer and
    ``benchmarks/distill_step.py``. ``raw_model``: the unwrapped detector (for objectives), default ``model``.
    """
    teacher_out = teacher(images, mask) if kd is not None else None
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


class DistillTrainer(Trainer):
    """Trains ``cfg.model`` (the student) with ``recipe``; ``teacher`` may be None only for recipes
    with ``distill.enabled = false`` (the baseline)."""

    def __init__(self, cfg: TrainConfig, recipe: Recipe, teacher: Optional[TeacherSpec] = None):
        super().__init__(cfg)
        self.recipe = recipe
        self.teacher_spec = teacher if recipe.distill.enabled else None
        if recipe.distill.enabled and teacher is None:
            raise ValueError(f"recipe {recipe.name} distils from a teacher: give --teacher")
        if teacher is not None and not recipe.distill.enabled:
            log.info("recipe %s trains the student alone; --teacher %s is not used", recipe.name, teacher.name)
        self.teacher: Optional[TeacherFn] = None
        self.kd_loss: Optional[D3ETRLoss] = None
        self.teacher_metrics: dict[str, Any] = {}
        self.objectives: list[AuxiliaryObjective] = []

    # ---------------------------------------------------------------- setup
    def build_extras(self) -> None:
        self.objectives = [o.to(self.device) for o in build_objectives(self.recipe, self.raw_model.config,
                                                                        self.criterion)]
        if self.teacher_spec is None:
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
            return super().training_step(images, mask, targets)
        total, gt, kd_terms, weights = distill_losses(
            self.model, self.teacher, self.kd_loss, self.criterion, images, mask, targets,
            aux_loss=self.cfg.aux_loss, objectives=self.objectives, raw_model=self.raw_model)
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


def distill(cfg: TrainConfig, recipe: Recipe, teacher: Optional[TeacherSpec]) -> dict[str, Any]:
    """Run a whole distillation job (used by ``kd-detr distill``)."""
    try:
        return DistillTrainer(cfg, recipe, teacher).fit()
    finally:
        distributed.cleanup()
