"""A recipe's methods beside the student, and the teacher started for them: built once before the optimizer,
their modules' gradients averaged across DDP ranks, their state saved with the training state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kd_detr.methods import Method, build_methods
from kd_detr.teacher import TeacherSource
from kd_detr.teacher.checks import check_teacher_ap

from .distributed import DistInfo

log = logging.getLogger("kd_detr.train")

__all__ = ["Objectives", "build_objectives"]


@dataclass
class Objectives:
    """The recipe's ``methods`` and what the teacher check measured (``teacher_metrics``)."""

    methods: list[Method] = field(default_factory=list)
    teacher_metrics: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the student (never part of it): the methods' projections, FFNs, heads."""
        mods: dict[str, torch.nn.Module] = {}
        for m in self.methods:
            mods.update(m.trainable_modules())
        return mods

    def average_gradients(self, dist: DistInfo) -> None:
        """Method modules sit outside the DDP-wrapped student: average their gradients by hand."""
        if not dist.enabled:
            return
        for mod in self.modules().values():
            for p in mod.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= dist.world_size

    def state_dict(self) -> dict[str, Any]:
        return {name: mod.state_dict() for name, mod in self.modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mod in self.modules().items():
            if name not in state:
                raise ValueError(f"the checkpoint has no state for {name}: was it written by another recipe?")
            mod.load_state_dict(state[name])


def build_objectives(recipe: Any, student: torch.nn.Module, criterion: torch.nn.Module,
                     teacher: Optional[TeacherSource], data, cfg, device: str, dist: DistInfo) -> Objectives:
    """The recipe's methods on ``device`` and, when one reads teacher outputs, the teacher ``start``-ed with
    the attention maps they ask for (and checked on validation images: ``teacher_check``).

    Building them must not shift the training RNG (dropout): a run then matches its baseline / in-process /
    cached twin draw for draw."""
    if recipe is None:
        return Objectives()
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        return _build(recipe, student, criterion, teacher, data, cfg, device, dist)


def _build(recipe, student, criterion, teacher, data, cfg, device, dist) -> Objectives:
    def prepare_teacher():  # called once, when a method needs the teacher's config
        teacher.prepare(data.label_map, student.config.num_classes, cfg.image_size,
                        check_image_size=recipe.teacher_check.image_size)
        return teacher.config

    out = Objectives([m.to(device) for m in build_methods(recipe.sections, student.config, criterion,
                                                          teacher=prepare_teacher if recipe.distils else None)])
    if dist.enabled:
        # each rank drew its own init (seed + rank); the gradients are averaged, so the modules must start
        # equal too, like DDP's broadcast of the student: rank 0's
        for mod in out.modules().values():
            for t in [*mod.parameters(), *mod.buffers()]:
                torch.distributed.broadcast(t.data, src=0)
    wanted = [m.teacher_attention() for m in out.methods if m.uses_teacher]
    if not wanted:
        return out
    attn = "per_head" if "per_head" in wanted else ("mean" if "mean" in wanted else "none")
    teacher.start(attn, device, features=any(m.teacher_features() for m in out.methods if m.uses_teacher))
    chk = recipe.teacher_check
    if chk.eval_images > 0:
        model = teacher.eval_model()
        if model is None:
            log.warning("teacher_check.eval_images is skipped with --teacher-cache (no teacher model is loaded)")
        else:
            out.teacher_metrics = check_teacher_ap(model.to(device), teacher.spec, chk, data.val_set, data.label_map,
                                                   device, cfg.eval_batch_size,
                                                   progress=dist.is_main and cfg.progress) or {}
    if teacher.spec is not None:
        spec, tc = teacher.spec, teacher.config
        log.info("teacher %s (%s, %s, %s): %d decoder layers, %d queries; student %s; recipe %s", spec.name,
                 spec.model, spec.checkpoint, teacher.kind, tc.dec_layers, tc.num_queries, cfg.model, recipe.name)
    return out
