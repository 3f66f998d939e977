"""The training loop of every run: ``kd-detr train`` (no recipe), and ``kd-detr distill`` / ``compare`` (a
recipe whose registered methods add their losses, with a :class:`~kd_detr.teacher.TeacherSource` when a
method distils from a teacher).

The :class:`Trainer` assembles a run from parts that live in modules of their own (data:
:mod:`.training_data`; student and criterion: :mod:`.student`; methods and teacher: :mod:`.objectives`;
optimizer and schedule: :mod:`.optim`; output dir: :mod:`.run_folder`), runs the AMP step, and calls its hooks
(:mod:`.hooks`: log window, checkpoints, evaluation, run record) around every step. Teacher outputs reach the
step in ``batch.teacher``, the same way from every source (``TeacherSource.batches``). The trained model is
the plain student; teacher, method modules and projections live beside it and never enter its weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from kd_detr.data import Batch
from kd_detr.models import get_config, save_model
from kd_detr.teacher import TeacherSource

from . import checkpointing, distributed
from .ema import ModelEMA
from .hooks import AugmentationTail, HookBase, LogWindow, PeriodicCheckpoint, PeriodicEvaluation, RunRecord
from .logger import RunLogger, truncate_log
from .loss_logs import loss_logs
from .objectives import build_objectives
from .optim import build_optimizer, build_scheduler, lr_lambda  # noqa: F401  (re-exported)
from .presets import resolve_preset
from .run_folder import held_output_dir, record_recipe
from .runtime import loader_generator, resolve_device, seed_everything
from .step import batch_losses
from .student import build_criterion, build_student, load_init_checkpoint  # noqa: F401  (re-exported)
from .train_config import TrainConfig  # noqa: F401  (re-exported: kd_detr.engine.trainer.TrainConfig)
from .training_data import build_training_data

log = logging.getLogger("kd_detr.train")

__all__ = ["Trainer", "TrainConfig", "train"]


class Trainer:
    """Trains a detector with ``cfg`` (default: the official Conditional DETR recipe) and, given a ``recipe``,
    the methods it switches on.

    Args:
        cfg: the run's :class:`TrainConfig` (a recipe's ``[train]`` values already merged in).
        recipe: the :class:`~kd_detr.engine.recipe.Recipe` (``None``: ground-truth training only).
        teacher: where teacher outputs come from; needed when a method of the recipe distils. A source that
            fixes a view plan (a cache) is kept even for a recipe without teacher: it decides the views.
        views: train on a plan of ``views`` recorded views per image (the plan a cache is built on), each
            image drawing one of them per epoch; ``view_seed`` seeds it.
    """

    def __init__(self, cfg: TrainConfig, recipe: Any = None, teacher: Optional[TeacherSource] = None,
                 views: Optional[int] = None, view_seed: int = 0):
        self.cfg = cfg
        self.recipe = recipe
        self.distils = recipe is not None and recipe.distils
        if views is not None and views < 1:
            raise ValueError(f"--views must be >= 1, got {views}")
        self.views, self.view_seed = views, view_seed
        if self.distils and teacher is None:
            raise ValueError(f"recipe {recipe.name} distils from a teacher: give --teacher (or --teacher-cache)")
        if teacher is not None and not self.distils and not teacher.fixes_view_plan:
            log.info("recipe %s trains the student alone; --teacher %s is not used",
                     getattr(recipe, "name", "(none)"), teacher.spec.name if teacher.spec else teacher.kind)
            teacher = None
        self.teacher = teacher
        self.device = resolve_device(cfg.device)
        self.dist = distributed.init_distributed(self.device)
        if self.dist.enabled and self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
        self.main = self.dist.is_main
        self.out = Path(cfg.output_dir)
        if cfg.amp and not self.device.startswith("cuda"):
            log.warning("--amp is only used on CUDA devices; training in float32 on %s", self.device)
        # fail fast on a bad model name or override, before any data is read
        get_config(cfg.model).replace(**cfg.model_overrides)
        # the training preset fills what the recipe and the command line left unset (engine/presets.py)
        self.cfg, self.preset = resolve_preset(cfg)
        cfg = self.cfg
        seed_everything(cfg.seed + self.dist.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.metrics: dict[str, Any] = {}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Data, student, criterion, methods and teacher, DDP, optimizer and schedule; then resume."""
        cfg = self.cfg
        self.data = build_training_data(cfg, self.dist, self.device, self.teacher, self.distils, self.views,
                                        self.view_seed, log_report=self.main)
        self.train_set, self.val_set, self.label_map = self.data.train_set, self.data.val_set, self.data.label_map
        self.raw_model = build_student(cfg, self.label_map.num_classes).to(self.device)
        self.criterion = build_criterion(cfg, self.raw_model, self.label_map.num_classes).to(self.device)
        self.ema = ModelEMA(self.raw_model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.objectives = build_objectives(self.recipe, self.raw_model, self.criterion, self.teacher, self.data, cfg,
                                           self.device, self.dist)
        self.model = self.raw_model
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
        self.optimizer = build_optimizer(cfg, self.raw_model, self.objectives.modules(), self.preset)
        self.iters_per_epoch = self.data.sampler.batches_per_epoch()
        self.total_iters = cfg.max_iters if cfg.max_iters is not None else cfg.epochs * self.iters_per_epoch
        self.scheduler = build_scheduler(cfg, self.optimizer, self.iters_per_epoch, self.total_iters)
        self.use_amp = cfg.amp and self.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.iteration, self.epoch, self.batch_in_epoch = 0, 0, 0
        if cfg.resume:
            self.restore(cfg.resume)
        elif (self.out / "checkpoints" / "latest.json").exists():
            raise ValueError(f"--output-dir {self.out} already holds a training run (checkpoints/latest.json): "
                             "pass --resume auto to continue it, or choose another --output-dir")
        if self.iteration == 0 and self.main:
            truncate_log(self.out / "log.jsonl", 0)  # a fresh run does not append to an old log
        if self.recipe is not None:
            record_recipe(self.out, self.recipe, resumed=self.iteration > 0, main=self.main)

    def restore(self, resume: str) -> None:
        """Continue from ``--resume`` (``auto`` or a checkpoint): weights, method modules, optimizer, schedule,
        scaler, position in the data and RNG streams."""
        loaded = checkpointing.load_resume_checkpoint(resume, self.out)
        if loaded is None:
            log.info("--resume auto: no checkpoint in %s, starting from scratch", self.out)
            return
        checkpointing.check_same_model(loaded, self.raw_model.config)
        self.raw_model.load_state_dict(loaded.model.state_dict(), strict=True)
        state = loaded.state
        self.objectives.load_state_dict(state.get("extra") or {})
        if (self.ema is not None) != ("ema" in state):
            raise ValueError(f"--resume: {loaded.point.state} was written with train.ema = {'ema' in state}, this run "
                             f"has train.ema = {self.ema is not None}: resume with the same setting, or start a new "
                             "--output-dir")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.epoch, self.batch_in_epoch = state["iteration"], state["epoch"], state["batch_in_epoch"]
        if self.dist.rank == 0:
            checkpointing.set_rng_state(state["rng"])
        else:  # other ranks keep their own streams, offset by rank as at the start
            seed_everything(self.cfg.seed + self.dist.rank + self.iteration)
        if self.main:
            truncate_log(self.out / "log.jsonl", self.iteration)
        log.info("resumed from %s at iteration %d (epoch %d, batch %d)", loaded.point.weights, self.iteration,
                 self.epoch, self.batch_in_epoch)

    def build_hooks(self) -> list[HookBase]:
        cfg = self.cfg
        hooks: list[HookBase] = [LogWindow(cfg.log_every, cfg.progress), PeriodicCheckpoint(cfg.checkpoint_every)]
        if self.val_set is not None:
            hooks.append(PeriodicEvaluation(cfg.eval_every_iters, cfg.eval_every_epochs))
        hooks.append(RunRecord())
        if cfg.no_aug_fraction > 0 and cfg.augment:
            if self.data.plan is not None:  # a plan's views (a cache's) are recorded: they cannot change
                log.warning("train.no_aug_fraction = %g is not applied: the run trains on a view plan's recorded "
                            "views", cfg.no_aug_fraction)
            else:
                hooks.append(AugmentationTail(self.total_iters - round(cfg.no_aug_fraction * self.total_iters)))
        for h in hooks:
            h.trainer = self
        return hooks

    # ---------------------------------------------------------------- steps
    def batches(self) -> Iterator[Batch]:
        """This epoch's batches on the device; with ``batch.teacher`` set by the teacher source when distilling."""
        if self.distils:
            return self.teacher.batches(self.data.loader, self.device)
        return (Batch.of(item).to(self.device) for item in self.data.loader)

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward + every loss of one batch (:func:`~kd_detr.engine.step.batch_losses`). Returns the total and
        the per-term log values (:func:`~kd_detr.engine.loss_logs.loss_logs`)."""
        total, gt, terms, weights = batch_losses(self.model, self.criterion, batch.images, batch.mask,
                                                 batch.targets, self.objectives.methods,
                                                 batch.teacher if self.distils else None,
                                                 aux_loss=self.cfg.aux_loss, raw_model=self.raw_model)
        return total, loss_logs(gt, self.criterion.weight_dict, terms, weights)

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step; the student's forward and losses under ``--amp`` autocast (CUDA)."""
        self.model.train()
        self.criterion.train()
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            loss, logs = self.training_step(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {self.iteration}: {logs}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.objectives.average_gradients(self.dist)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.clip_max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_max_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model)
        logs["loss"] = float(loss.detach())
        logs["grad_norm"] = float(grad_norm)
        return logs

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train (set up, resume, loop, final weights) holding the output dir's lock the whole time. Returns the
        last evaluation's metrics (``{}`` on non-zero ranks or without validation data)."""
        with held_output_dir(self.out, self.dist):
            self.setup()
            hooks = self.build_hooks()
            self.logger = RunLogger(self.out, enabled=self.main)
            try:
                for h in hooks:
                    h.before_train()
                self._loop(hooks)
                for h in hooks:
                    h.after_train()
            finally:
                for h in hooks:
                    h.close()
                self.logger.close()
            distributed.barrier()
            return self.metrics

    def _loop(self, hooks: list[HookBase]) -> None:
        while self.iteration < self.total_iters:
            self.train_set.set_epoch(self.epoch)
            self.data.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for h in hooks:
                h.before_epoch()
            t0 = time.perf_counter()
            for batch in self.batches():
                t1 = time.perf_counter()
                for h in hooks:
                    h.before_step()
                self.step_logs = self.step(batch)
                self.step_times = (t1 - t0, time.perf_counter() - t0)
                self.step_epoch = self.epoch
                self.iteration += 1
                self.batch_in_epoch += 1
                self.end_of_epoch = self.batch_in_epoch >= self.iters_per_epoch
                self.finished = self.iteration >= self.total_iters
                if self.end_of_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                for h in hooks:
                    h.after_step()
                if self.finished or self.end_of_epoch:
                    break
                t0 = time.perf_counter()

    # ---------------------------------------------------------------- outputs
    def save_checkpoint(self) -> None:
        if self.main:
            checkpointing.save_checkpoint(
                self.out / "checkpoints", self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                iteration=self.iteration, metadata=self.model_metadata(), label_map=self.label_map,
                keep_last=self.cfg.keep_checkpoints, extra=self.objectives.state_dict(),
                ema=self.ema.state_dict() if self.ema is not None else None)
        distributed.barrier()

    @property
    def run_model(self) -> torch.nn.Module:
        """The model the run evaluates, saves and exports: the EMA of the weights with ``train.ema``, else them."""
        return self.ema.module if self.ema is not None else self.raw_model

    def save_model(self, name: str, **metadata: Any) -> None:
        """The run's model (:attr:`run_model`) as ``<output_dir>/<name>`` (main rank)."""
        save_model(self.run_model, self.out / name, label_map=self.label_map,
                   extra_metadata={**self.model_metadata(), **metadata,
                                   **({"ema": True} if self.ema is not None else {})})

    def model_metadata(self) -> dict[str, Any]:
        """Stored with every saved model: eval/predict reuse the training image-size preset."""
        meta = {"iteration": self.iteration, "epoch": self.epoch, "image_size": self.cfg.image_size}
        if self.recipe is not None:
            meta["recipe"] = self.recipe.name
        if self.teacher is not None and self.distils and self.teacher.spec is not None:
            meta["teacher"] = self.teacher.spec.name
        return meta

    def run_config(self) -> dict[str, Any]:
        rc = {"train": self.cfg.to_dict(), "model_config": dataclasses.asdict(self.raw_model.config),
              "label_map": self.label_map.to_dict(), "world_size": self.dist.world_size,
              "device": self.device, "iters_per_epoch": self.iters_per_epoch, "total_iters": self.total_iters}
        if self.recipe is not None:
            rc["recipe"] = self.recipe.to_dict()
            rc["recipe_files"] = list(self.recipe.chain)
            rc["teacher"] = self.teacher.spec.to_dict() if self.teacher is not None and self.teacher.spec else None
            rc["teacher_serving"] = {**(self.teacher.describe() if self.teacher is not None else {"mode": None}),
                                     "views": self.views, "view_seed": self.view_seed}
            if self.data.plan is not None:
                rc["view_plan"] = self.data.plan.to_dict()
            rc.update(self.objectives.teacher_metrics)
        return rc

    def evaluate(self, model: Optional[torch.nn.Module] = None) -> tuple[Any, list]:
        """COCO evaluation of ``model`` (default: :attr:`run_model`) on the validation set (every rank its
        share): ``(EvalResult, COCO results)``."""
        from kd_detr.evaluation import eval_loader, evaluate_model

        cfg = self.cfg
        loader = eval_loader(self.val_set, cfg.eval_batch_size, cfg.eval_max_images, cfg.num_workers,
                             distributed=(self.dist.rank, self.dist.world_size) if self.dist.enabled else None,
                             generator=loader_generator(cfg.seed, self.dist.rank))
        return evaluate_model(model if model is not None else self.run_model, loader, self.val_set.coco,
                              self.label_map, self.device, progress=self.main and cfg.progress)


def train(cfg: TrainConfig, recipe: Any = None, teacher: Optional[TeacherSource] = None,
          views: Optional[int] = None, view_seed: int = 0) -> dict[str, Any]:
    """Run a whole training job (``kd-detr train``, ``distill``, each run of ``compare``); the teacher
    source is closed (actors, Ray) whatever happens."""
    try:
        return Trainer(cfg, recipe, teacher, views, view_seed).fit()
    finally:
        if teacher is not None:
            teacher.close()
        distributed.cleanup()
