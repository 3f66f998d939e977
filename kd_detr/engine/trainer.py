"""The training loop: data, model, criterion, methods, teacher source, AdamW, schedule, logging,
checkpoints, resume, DDP, AMP.

One loop trains every run: ``kd-detr train`` (no recipe), and ``kd-detr distill`` / ``compare`` (a recipe
whose registered methods add their losses, with a :class:`~kd_detr.teacher.TeacherSource` when a method
distils from a teacher). The trained model is the plain student; teacher, method modules and projections
live beside it and never enter its weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import resource
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from kd_detr import data as kd_data
from kd_detr.atomic import write_json_atomic, write_text_atomic
from kd_detr.criterion import FamilyLossCriterion, SetCriterion
from kd_detr.data import Batch
from kd_detr.matcher import HungarianMatcher
from kd_detr.methods import Method, build_methods
from kd_detr.models import build_model, get_config, load_model
from kd_detr.schema import tomllib
from kd_detr.teacher import CacheSource, TeacherSource
from kd_detr.teacher.checks import check_teacher_ap

from . import checkpointing, distributed
from .logger import Progress, RunLogger, truncate_log
from .loss_logs import loss_logs
from .run_record import run_record
from .sampler import ResumableBatchSampler
from .train_config import TrainConfig  # noqa: F401  (re-exported: kd_detr.engine.trainer.TrainConfig)
from .step import batch_losses

log = logging.getLogger("kd_detr.train")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
    """Official Conditional DETR groups: backbone parameters at ``lr_backbone``, the rest at ``lr``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    for g in groups:
        g["weight_decay"] = weight_decay
    return groups


def lr_lambda(warmup_iters: int, drop_iter: int | None):
    """Linear warm-up from 0.001 to 1, then x0.1 after ``drop_iter`` (StepLR at iteration granularity)."""

    def f(it: int) -> float:
        factor = 1.0
        if warmup_iters > 0 and it < warmup_iters:
            factor = 0.001 + (1 - 0.001) * it / warmup_iters
        if drop_iter is not None and it >= drop_iter:
            factor *= 0.1
        return factor

    return f


class Trainer:
    """Trains a detector with ``cfg`` (default: the official Conditional DETR recipe) and, given a ``recipe``,
    the methods it switches on.

    Args:
        cfg: the run's :class:`TrainConfig` (a recipe's ``[train]`` values already merged in).
        recipe: the :class:`~kd_detr.engine.recipe.Recipe` (``None``: ground-truth training only).
        teacher: where teacher outputs come from; needed when a method of the recipe distils. A
            :class:`~kd_detr.teacher.CacheSource` also fixes the view plan (even for a recipe without teacher).
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
        if teacher is not None and not self.distils and not isinstance(teacher, CacheSource):
            log.info("recipe %s trains the student alone; --teacher %s is not used",
                     getattr(recipe, "name", "(none)"), teacher.spec.name if teacher.spec else teacher.kind)
            teacher = None
        self.teacher = teacher
        self.methods: list[Method] = []
        self.plan = None
        self.teacher_metrics: dict[str, Any] = {}
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
        seed_everything(cfg.seed + self.dist.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    # ---------------------------------------------------------------- setup
    def build_data(self) -> None:
        cfg = self.cfg
        spec = kd_data.DataSpec.of(cfg)
        self.train_set = spec.train_set(cfg.augment, seed=cfg.seed, log_report=self.main)
        self.label_map = self.train_set.label_map
        self.val_set = None
        try:
            spec.files("val")
        except (ValueError, FileNotFoundError) as e:
            log.warning("no validation data (%s): evaluation is skipped", e)
        else:
            self.val_set = spec.val_set(self.label_map, log_report=self.main)
        self.sampler = ResumableBatchSampler(len(self.train_set), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                             rank=self.dist.rank, world_size=self.dist.world_size)
        self.train_loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=cfg.num_workers,
                                       collate_fn=kd_data.collate_fn, generator=self._loader_generator(),
                                       persistent_workers=False, pin_memory=self.device.startswith("cuda"))
        if isinstance(self.teacher, CacheSource) or self.views is not None:
            self.build_plan_data()

    def build_plan_data(self) -> None:
        """Train on a view plan: K recorded views per image, one drawn per image and epoch, in the ordinary
        batches (``--views``, or the plan of a teacher cache, whose per-view outputs are then read and stacked
        with each batch in the loader's workers)."""
        from kd_detr.data.view_plan import PlanViews, PlanViewSampler, ViewPlan

        cfg = self.cfg
        if not cfg.augment:
            raise ValueError("a view plan records augmented views: it cannot be combined with --no-augment")
        source = None
        if isinstance(self.teacher, CacheSource):
            reader = self.teacher.open(self.train_set, self.label_map, cfg.image_size)
            p = reader.manifest["plan"]
            if self.views is not None and self.views != p["num_views"]:
                raise ValueError(f"--views {self.views}: teacher cache {self.teacher.cache} holds {p['num_views']} "
                                 "views per image")
            self.plan = ViewPlan.for_dataset(self.train_set, p["num_views"], p["seed"])
            if self.plan.fingerprint() != p["fingerprint"]:
                raise ValueError(f"teacher cache {self.teacher.cache} was built for another view plan (images, their "
                                 "sizes or the augmentation policy differ): rebuild it with kd-detr cache")
            source = reader if self.distils else None
            if source is not None:
                self._check_cache_covers(reader)
        else:
            self.plan = ViewPlan.for_dataset(self.train_set, self.views, self.view_seed)
        self.sampler = PlanViewSampler(self.sampler, self.plan, cfg.seed)
        self.train_loader = DataLoader(PlanViews(self.train_set, self.plan, source), batch_sampler=self.sampler,
                                       num_workers=cfg.num_workers, collate_fn=PlanViews.collate,
                                       generator=self._loader_generator(), persistent_workers=False,
                                       pin_memory=self.device.startswith("cuda"))
        log.info("view plan: %d views per image, one drawn per image and epoch%s", self.plan.num_views,
                 f", teacher outputs read from {self.teacher.cache}" if source is not None else "")

    def _check_cache_covers(self, reader) -> None:
        """Refuse at start a teacher cache that lacks an ``(image, view)`` this run will read (a cache still being
        built, or a shard file removed): otherwise the run dies in a loader worker at the first missing view.
        The views read are those the plan gives each image in epochs ``0 .. E-1`` (E: the run's epochs, from
        ``--epochs`` or ``--max-iters``); from K epochs on, every view of the plan."""
        cfg, plan = self.cfg, self.plan
        per_epoch = max(1, self.sampler.batches_per_epoch())
        epochs = cfg.epochs if cfg.max_iters is None else math.ceil(cfg.max_iters / per_epoch)
        if epochs >= plan.num_views:
            wanted = plan.all_views()
        else:
            wanted = sorted({(i, int(k)) for e in range(max(epochs, 1))
                             for i, k in enumerate(plan.epoch_views(e, cfg.seed))}, key=lambda ik: (ik[1], ik[0]))
        missing = reader.missing(wanted, on_disk=True)
        if missing:
            first = ", ".join(f"view {k} of image {i}" for i, k in missing[:3])
            raise ValueError(f"teacher cache {self.teacher.cache} is incomplete: {len(missing)} of the {len(wanted)} "
                             f"image views this run reads are missing ({first}{', ...' if len(missing) > 3 else ''}); "
                             f"finish it: rerun `kd-detr cache` with the same options (--out {self.teacher.cache})")

    def _loader_generator(self) -> torch.Generator:
        # A DataLoader draws its workers' base seed from the global RNG unless it has its own
        # generator; that draw would shift the dropout stream and break exact resume.
        return torch.Generator().manual_seed(self.cfg.seed + 1000 * self.dist.rank)

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.init_checkpoint:
            model = load_init_checkpoint(cfg.init_checkpoint, cfg.model, self.label_map.num_classes,
                                         cfg.model_overrides)
        else:
            model = build_model(cfg.model, num_classes=self.label_map.num_classes,
                                backbone_weights=cfg.backbone_weights, **cfg.model_overrides)
        return model

    def build_criterion(self) -> SetCriterion:
        cfg = self.cfg
        matcher = HungarianMatcher(cost_class=cfg.cost_class, cost_bbox=cfg.cost_bbox, cost_giou=cfg.cost_giou,
                                   focal_alpha=cfg.focal_alpha)
        if getattr(self.raw_model, "own_loss", False):
            # transformers families: their own loss (matcher, focal/VFL, denoising), weighted their way
            return FamilyLossCriterion(self.label_map.num_classes, self.raw_model.family_loss_weights,
                                       matcher=matcher, focal_alpha=cfg.focal_alpha)
        num_layers = self.model_config().dec_layers
        base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
        weight_dict = dict(base)
        if cfg.aux_loss:  # the same weights for every intermediate decoder layer (official)
            for i in range(num_layers - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        return SetCriterion(self.label_map.num_classes, matcher, weight_dict=weight_dict,
                            focal_alpha=cfg.focal_alpha)

    def model_config(self):
        return self.raw_model.config

    # ---------------------------------------------------------------- methods and teacher
    def build_extras(self) -> None:
        """The recipe's methods and the teacher, after the model and criterion, before the optimizer.

        Building them must not shift the training RNG (dropout): a run then matches its baseline /
        in-process / cached twin draw for draw."""
        if self.recipe is None:
            return
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            self._build_extras()

    def _prepare_teacher(self):
        """Check the teacher against the data and the student (called once, when a method needs it)."""
        self.teacher.prepare(self.label_map, self.raw_model.config.num_classes, self.cfg.image_size,
                             check_image_size=self.recipe.teacher_check.image_size)
        return self.teacher.config

    def _build_extras(self) -> None:
        self.methods = [m.to(self.device) for m in build_methods(
            self.recipe.sections, self.raw_model.config, self.criterion,
            teacher=self._prepare_teacher if self.distils else None)]
        if self.dist.enabled:
            # each rank drew its own init (seed + rank); the gradients are averaged (after_backward), so the
            # modules must start equal too, like DDP's broadcast of the student: rank 0's
            for mod in self.extra_modules().values():
                for t in [*mod.parameters(), *mod.buffers()]:
                    torch.distributed.broadcast(t.data, src=0)
        wanted = [m.teacher_attention() for m in self.methods if m.uses_teacher]
        if not wanted:
            return
        attn = "per_head" if "per_head" in wanted else ("mean" if "mean" in wanted else "none")
        self.teacher.start(attn, self.device)
        chk = self.recipe.teacher_check
        if chk.eval_images > 0:
            model = self.teacher.eval_model()
            if model is None:
                log.warning("teacher_check.eval_images is skipped with --teacher-cache (no teacher model is loaded)")
            else:
                self.teacher_metrics = check_teacher_ap(
                    model.to(self.device), self.teacher.spec, chk, self.val_set, self.label_map, self.device,
                    self.cfg.eval_batch_size, progress=self.main and self.cfg.progress) or {}
        if self.teacher.spec is not None:
            spec, tc = self.teacher.spec, self.teacher.config
            log.info("teacher %s (%s, %s, %s): %d decoder layers, %d queries; student %s; recipe %s", spec.name,
                     spec.model, spec.checkpoint, self.teacher.kind, tc.dec_layers, tc.num_queries, self.cfg.model,
                     self.recipe.name)

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the student (never part of it): the methods' projections, FFNs, heads."""
        mods: dict[str, torch.nn.Module] = {}
        for m in self.methods:
            mods.update(m.trainable_modules())
        return mods

    def param_groups(self) -> list[dict]:
        cfg = self.cfg
        groups = param_groups(self.raw_model, cfg.lr, cfg.lr_backbone, cfg.weight_decay)
        for name, mod in self.extra_modules().items():
            params = [p for p in mod.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": name})
        return groups

    def train_batches(self):
        """The iterable of training batches of the current epoch (a teacher source may compute ahead)."""
        if self.teacher is not None and self.distils:
            return self.teacher.batches(self.train_loader)
        return self.train_loader

    def after_backward(self) -> None:
        # Method modules sit outside the DDP-wrapped student: average their gradients by hand.
        if not self.dist.enabled:
            return
        for mod in self.extra_modules().values():
            for p in mod.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.dist.world_size

    def extra_state(self) -> dict[str, Any]:
        """Saved in every checkpoint's training state and given back to :meth:`load_extra_state`."""
        return {name: mod.state_dict() for name, mod in self.extra_modules().items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, mod in self.extra_modules().items():
            if name not in state:
                raise ValueError(f"the checkpoint has no state for {name}: was it written by another recipe?")
            mod.load_state_dict(state[name])

    def setup(self) -> None:
        cfg = self.cfg
        self.build_data()
        self.raw_model = self.build_model().to(self.device)
        self.criterion = self.build_criterion().to(self.device)
        self.build_extras()
        self.model = self.raw_model
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.iters_per_epoch = self.sampler.batches_per_epoch()
        self.total_iters = cfg.max_iters if cfg.max_iters is not None else cfg.epochs * self.iters_per_epoch
        drop = cfg.lr_drop_iter
        if drop is None and cfg.lr_drop is not None:
            drop = cfg.lr_drop * self.iters_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.warmup_iters, drop))
        self.use_amp = cfg.amp and self.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.iteration, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_ap = -1.0
        self.last_eval_iteration = -1
        if cfg.resume:
            self._resume(cfg.resume)
        elif (self.out / "checkpoints" / "latest.json").exists():
            raise ValueError(f"--output-dir {self.out} already holds a training run (checkpoints/latest.json): "
                             "pass --resume auto to continue it, or choose another --output-dir")
        if self.iteration == 0 and self.main:
            truncate_log(self.out / "log.jsonl", 0)  # a fresh run does not append to an old log
        if self.recipe is not None:
            self._record_recipe()

    def _record_recipe(self) -> None:
        """Write ``recipe.toml``; on resume, refuse a recipe whose methods differ from the run's."""
        from .recipe import recipe_to_toml

        saved = self.out / "recipe.toml"
        current = self.recipe.to_dict()
        if self.iteration > 0 and saved.exists():
            # the schedule may change on resume (e.g. more iterations); the methods may not
            before = tomllib.loads(saved.read_text())
            changed = [name for name in self.recipe.sections if name != "teacher_check"
                       and before.get(name) != current[name]]
            if changed:
                raise ValueError(f"--resume: the [{changed[0]}] section of {saved} differs from the recipe given now "
                                 f"({self.recipe.name} with its --set overrides); resume with the same recipe, or "
                                 "start a new --output-dir")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(saved, recipe_to_toml(current))

    def _resume(self, resume: str) -> None:
        loaded = checkpointing.load_resume_checkpoint(resume, self.out)
        if loaded is None:
            log.info("--resume auto: no checkpoint in %s, starting from scratch", self.out)
            return
        point = loaded.point
        checkpointing.check_same_model(loaded, self.raw_model.config)
        self.raw_model.load_state_dict(loaded.model.state_dict(), strict=True)
        state = loaded.state
        self.load_extra_state(state.get("extra") or {})
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
            metrics = self.out / "metrics.json"
            if metrics.exists():
                self.best_ap = json.loads(metrics.read_text()).get("best_ap", -1.0)
        log.info("resumed from %s at iteration %d (epoch %d, batch %d)", point.weights, self.iteration,
                 self.epoch, self.batch_in_epoch)

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward + every loss of one batch (:func:`~kd_detr.engine.step.batch_losses`). Returns the total
        and per-term log values: each term scaled by its weight and ``<term>_unscaled``; ``student.total``
        (the GT terms), and for the methods' terms the sum over layers (``distill.adaptive.self_attn``) and
        per namespace (``distill.total``)."""
        teacher = self.teacher.outputs(batch) if self.teacher is not None and self.distils else None
        total, gt, terms, weights = batch_losses(self.model, self.criterion, batch.images, batch.mask,
                                                 batch.targets, self.methods, teacher, aux_loss=self.cfg.aux_loss,
                                                 raw_model=self.raw_model)
        return total, loss_logs(gt, self.criterion.weight_dict, terms, weights)

    def step(self, batch: Batch) -> dict[str, float]:
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
        self.after_backward()
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
        logs["loss"] = float(loss.detach())
        logs["grad_norm"] = float(grad_norm)
        return logs

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train (set up, resume, loop, final weights) holding the output dir's lock the whole time."""
        lock = checkpointing.OutputDirLock(self.out)
        busy = None
        if self.main:  # the ranks of one DDP run share the dir: the main rank locks it for them
            try:
                lock.acquire()
            except (checkpointing.OutputDirInUse, checkpointing.OutputDirLockRefused) as e:
                busy = e
        if self.dist.enabled:  # every rank stops when the dir is busy (not only the main one)
            message = [str(busy) if busy is not None else None]
            torch.distributed.broadcast_object_list(message, src=0)
            if message[0] is not None and busy is None:
                busy = checkpointing.OutputDirInUse(message[0])
        if busy is not None:
            raise busy
        try:
            if self.main:
                self._remove_stale_temp_files()
            return self._fit()
        finally:
            lock.release()

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of atomic writes killed mid-way (by a crash) in the output dir and checkpoints."""
        from kd_detr.atomic import remove_stale_temp_files

        removed = remove_stale_temp_files(self.out, self.out / "checkpoints")
        if removed:
            log.info("removed %d stale temporary file(s) left by an interrupted write in %s: %s", len(removed),
                     self.out, ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "config.json", run_record(self.run_config()))
        logger = RunLogger(self.out, enabled=self.main)
        progress = Progress(self.total_iters, initial=self.iteration, enabled=self.main and cfg.progress)
        sums: dict[str, float] = {}
        n_in_window, t_data, t_iter = 0, 0.0, 0.0
        t_start, it_start = time.perf_counter(), self.iteration
        metrics: dict[str, Any] = {}
        try:
            while self.iteration < self.total_iters:
                self.train_set.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                t0 = time.perf_counter()
                for item in self.train_batches():
                    batch = Batch.of(item).to(self.device)
                    t1 = time.perf_counter()
                    logs = self.step(batch)
                    t2 = time.perf_counter()
                    self.iteration += 1
                    self.batch_in_epoch += 1
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_in_window += 1
                    t_data += t1 - t0
                    t_iter += t2 - t0
                    progress.update(1, loss=logs["loss"])
                    if self.iteration % cfg.log_every == 0 or self.iteration == self.total_iters:
                        rec = {k: v / n_in_window for k, v in sums.items()}
                        rec = distributed.reduce_dict_mean(rec, self.device)
                        done = self.iteration - it_start
                        rate = (time.perf_counter() - t_start) / max(done, 1)
                        rec.update({
                            "iteration": self.iteration, "epoch": self.epoch,
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "lr_backbone": next((g["lr"] for g in self.optimizer.param_groups
                                                 if g.get("name") == "backbone"), self.optimizer.param_groups[0]["lr"]),
                            "iter_time": t_iter / n_in_window, "data_time": t_data / n_in_window,
                            "peak_mem_mb": peak_memory_mb(self.device),
                            "eta_s": rate * (self.total_iters - self.iteration),
                        })
                        logger.log(rec)
                        sums, n_in_window, t_data, t_iter = {}, 0, 0.0, 0.0
                    end_of_epoch = self.batch_in_epoch >= self.iters_per_epoch
                    finished = self.iteration >= self.total_iters
                    if end_of_epoch:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                    if self.iteration % cfg.checkpoint_every == 0 or end_of_epoch or finished:
                        self.save_checkpoint()
                    if self._eval_due(end_of_epoch, finished):
                        metrics = self.evaluate_and_log(logger)
                    if finished or end_of_epoch:
                        break
                    t0 = time.perf_counter()
        finally:
            progress.close()
            logger.close()
        if self.val_set is not None and self.last_eval_iteration != self.iteration:
            # e.g. resuming a run that had already finished: evaluate the final weights now
            # (decided on state every rank shares, so all ranks join the evaluation's collectives)
            eval_logger = RunLogger(self.out, enabled=self.main)
            metrics = self.evaluate_and_log(eval_logger)
            eval_logger.close()
        if self.main:
            from kd_detr.models import save_model
            save_model(self.raw_model, self.out / "model_final.safetensors", label_map=self.label_map,
                       extra_metadata=self.model_metadata())
        distributed.barrier()
        return metrics

    def _eval_due(self, end_of_epoch: bool, finished: bool) -> bool:
        cfg = self.cfg
        if self.val_set is None:
            return False
        if finished:
            return True
        if cfg.eval_every_iters:
            return self.iteration % cfg.eval_every_iters == 0
        return end_of_epoch and cfg.eval_every_epochs > 0 and self.epoch % cfg.eval_every_epochs == 0

    def save_checkpoint(self) -> None:
        if self.main:
            checkpointing.save_checkpoint(
                self.out / "checkpoints", self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                iteration=self.iteration, metadata=self.model_metadata(), label_map=self.label_map,
                keep_last=self.cfg.keep_checkpoints, extra=self.extra_state())
        distributed.barrier()

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
            if self.plan is not None:
                rc["view_plan"] = self.plan.to_dict()
            rc.update(self.teacher_metrics)
        return rc

    def evaluate(self) -> tuple[Any, list]:
        from kd_detr.evaluation import evaluate_model

        from kd_detr.evaluation import eval_loader

        cfg = self.cfg
        loader = eval_loader(self.val_set, cfg.eval_batch_size, cfg.eval_max_images, cfg.num_workers,
                             distributed=(self.dist.rank, self.dist.world_size) if self.dist.enabled else None,
                             generator=self._loader_generator())
        return evaluate_model(self.raw_model, loader, self.val_set.coco, self.label_map, self.device,
                              progress=self.main and cfg.progress)

    def evaluate_and_log(self, logger: RunLogger) -> dict[str, Any]:
        """Evaluate on every rank; rank 0 logs and writes metrics (other ranks get ``{}``)."""
        result, results = self.evaluate()
        self.last_eval_iteration = self.iteration
        if not self.main:
            return {}
        ap = result.metrics["AP"]
        record = {"iteration": self.iteration, "epoch": self.epoch,
                  **{f"eval/{k}": v for k, v in result.metrics.items()}}
        logger.log(record)
        log.info("evaluation at iteration %d:\n%s", self.iteration, result.summary_text)
        if ap > self.best_ap:
            self.best_ap = ap
            from kd_detr.models import save_model
            save_model(self.raw_model, self.out / "model_best.safetensors", label_map=self.label_map,
                       extra_metadata={**self.model_metadata(), "AP": ap})
        write_json_atomic(self.out / "results.json", results, indent=None)
        metrics = {"iteration": self.iteration, **result.metrics, "best_ap": self.best_ap,
                   "per_class": result.per_class, "summary": result.summary_text}
        write_json_atomic(self.out / "metrics.json", metrics)
        return metrics


def load_init_checkpoint(path: str, model_name: str, num_classes: int, overrides: dict[str, Any]) -> torch.nn.Module:
    """Weights to start from: our safetensors (model rebuilt from its metadata) or an official ``.pth``."""
    from kd_detr.models import model_from_official

    p = Path(path)
    if p.suffix == ".safetensors":
        model, meta = load_model(p)
        _check_init_model(p, model.config, meta.get("model_name", model.config.name), model_name, overrides)
        if model.config.num_classes != num_classes:
            raise ValueError(f"{p}: the checkpoint has {model.config.num_classes} classes but the data's label "
                             f"map has {num_classes}")
        return model
    return model_from_official(p, model_name, num_classes, **overrides)


def _check_init_model(path: Path, config: Any, ckpt_name: str, model_name: str, overrides: dict[str, Any]) -> None:
    """Refuse an ``--init-checkpoint`` of another architecture than ``--model`` / ``--model-opt`` ask for (the
    checkpoint's model would silently replace them and ``config.json`` would contradict itself)."""
    opts = "".join(f" --model-opt {k}={v}" for k, v in overrides.items())
    if ckpt_name != model_name:
        have = config.to_dict()
        try:
            want = get_config(model_name).replace(**overrides).to_dict()
        except ValueError:
            want = {}
        diff = [k for k in have if k not in ("name", "description", "num_classes", "freeze_stem")
                and k in want and have[k] != want[k]]

        def shown(cfg: dict[str, Any]) -> str:
            return ", ".join(f"{k}={cfg[k]}" for k in diff[:4]) + (", ..." if len(diff) > 4 else "")

        raise ValueError(f"--init-checkpoint {path} holds a {ckpt_name}{f' ({shown(have)})' if diff else ''}, but "
                         f"--model {model_name}{opts} builds a {model_name}{f' ({shown(want)})' if diff else ''}: "
                         f"pass --model {ckpt_name} or another checkpoint")
    for key, value in overrides.items():
        if key == "num_classes":  # checked against the data's label map by the caller
            continue
        have = getattr(config, key, None)
        if have != value:
            raise ValueError(f"--init-checkpoint {path} holds a {ckpt_name} with {key}={have}, but --model-opt "
                             f"{key}={value} was given: pass --model-opt {key}={have} (or leave it out) or another "
                             "checkpoint")


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
