"""``kd-detr distill``: the foundation's trainer with a teacher and the D3ETR loss.

Everything else (schedule, AdamW, logging, checkpoints, resume, DDP, AMP, evaluation) is the
foundation :class:`~kd_detr.engine.trainer.Trainer`'s. The trained model is the plain student; the
teacher, its queries and any projection live beside it and never enter the student's weights.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional

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
from kd_detr.engine.trainer import Trainer, TrainConfig, to_float32

from .d3etr import D3ETRLoss
from .recipe import Recipe, recipe_to_toml
from .teacher import InProcessTeacher, TeacherOutputs
from .teacher_loading import TeacherSpec, check_teacher_fits, load_teacher

log = logging.getLogger("kd_detr.distill")

__all__ = ["DistillTrainer", "distill", "distill_losses"]

# A teacher source: (images [B,3,H,W], mask [B,H,W]) -> TeacherOutputs for that padded batch.
TeacherFn = Callable[[torch.Tensor, torch.Tensor], TeacherOutputs]


def distill_losses(model, teacher: TeacherFn, kd: D3ETRLoss, criterion, images, mask, targets, aux_loss: bool = True):
    """One distillation forward: teacher, student with the auxiliary group, GT + KD losses.

    Returns ``(total, gt_terms, kd_terms)`` (term dicts unweighted; weights in ``criterion.weight_dict``
    and ``kd.weight_dict``). Shared by the trainer and ``benchmarks/distill_step.py``.
    """
    teacher_out = teacher(images, mask)
    outputs = model(images, mask, extra_groups=kd.extra_groups(teacher_out), return_attn=kd.needs_attn)
    with torch.autocast(images.device.type, enabled=False):  # losses in float32 under AMP
        out32 = to_float32(outputs)
        gt_outputs = out32 if aux_loss else {k: v for k, v in out32.items() if k != "aux_outputs"}
        gt = criterion(gt_outputs, targets)
        num_boxes = criterion.num_boxes(targets, images.device)
        kd_terms = kd(out32, teacher_out.float(), targets, num_boxes=num_boxes)
    total = weighted_total(gt, criterion.weight_dict) + weighted_total(kd_terms, kd.weight_dict)
    return total, gt, kd_terms


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

    # ---------------------------------------------------------------- setup
    def build_extras(self) -> None:
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

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        if self.kd_loss is not None and self.kd_loss.projection is not None:
            groups.append({"params": list(self.kd_loss.projection.parameters()), "lr": self.cfg.lr,
                           "weight_decay": self.cfg.weight_decay, "name": "distill_projection"})
        return groups

    def after_backward(self) -> None:
        # The projection is outside the DDP-wrapped student: average its gradients by hand.
        if self.dist.enabled and self.kd_loss is not None and self.kd_loss.projection is not None:
            for p in self.kd_loss.projection.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.dist.world_size

    def extra_state(self) -> dict[str, Any]:
        if self.kd_loss is not None and self.kd_loss.projection is not None:
            return {"distill_projection": self.kd_loss.projection.state_dict()}
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.kd_loss is not None and self.kd_loss.projection is not None:
            if "distill_projection" not in state:
                raise ValueError("the checkpoint has no distillation projection state: was it written by another recipe?")
            self.kd_loss.projection.load_state_dict(state["distill_projection"])

    # ---------------------------------------------------------------- step
    def training_step(self, images, mask, targets):
        if self.kd_loss is None:
            return super().training_step(images, mask, targets)
        kd = self.kd_loss
        total, gt, kd_terms = distill_losses(self.model, self.teacher, kd, self.criterion, images, mask, targets,
                                             aux_loss=self.cfg.aux_loss)
        logs: dict[str, float] = {}
        sums: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value

        for terms, weights, is_kd in ((gt, self.criterion.weight_dict, False), (kd_terms, kd.weight_dict, True)):
            for k, v in terms.items():
                value = float(v.detach())
                logs[k] = value * weights[k]
                logs[k + "_unscaled"] = value
                if is_kd:  # sums over layers (distill.adaptive.self_attn) and per namespace (distill.total)
                    add(k.rsplit(".l", 1)[0], value * weights[k])
                    add(k.split(".")[0] + ".total", value * weights[k])
                else:
                    add("student.total", value * weights[k])
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
