"""What runs around the training step, as hook objects the loop calls in order (detectron2's ``HookBase``):
``before_train``, ``before_epoch`` at the start of every epoch, ``before_step`` / ``after_step`` around every
step, then ``after_train``; ``close``
always, also after an error. The trainer builds the list (:meth:`~kd_detr.engine.trainer.Trainer.build_hooks`).

A hook reads the trainer's state after a step: ``iteration`` (steps done), ``epoch`` / ``batch_in_epoch``
(where the next step starts), ``step_epoch`` (the epoch of the step just done), ``end_of_epoch``,
``finished``, ``step_logs`` (the step's per-term values) and ``step_times`` (``(data_s, iter_s)``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from kd_detr.atomic import write_json_atomic

from . import distributed
from .logger import Progress
from .run_record import run_record
from .runtime import peak_memory_mb

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger("kd_detr.train")

__all__ = ["HookBase", "LogWindow", "PeriodicCheckpoint", "PeriodicEvaluation", "RunRecord", "AugmentationTail"]


class HookBase:
    """Does nothing at every point of the loop; subclasses override the points they need."""

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def close(self) -> None:
        """Release what the hook holds (files, bars), whether training finished or failed."""


class LogWindow(HookBase):
    """Every ``log_every`` steps (and the last), one log record: each term's mean over the window (averaged
    over ranks), learning rates, step and data times, peak memory and the ETA; and the progress bar."""

    def __init__(self, log_every: int, progress: bool):
        self.log_every, self.show_progress = log_every, progress
        self.progress = None

    def before_train(self) -> None:
        t = self.trainer
        self.progress = Progress(t.total_iters, initial=t.iteration, enabled=t.main and self.show_progress)
        self.t_start, self.it_start = time.perf_counter(), t.iteration
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n, self.t_data, self.t_iter = 0, 0.0, 0.0

    def after_step(self) -> None:
        t = self.trainer
        for k, v in t.step_logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.t_data += t.step_times[0]
        self.t_iter += t.step_times[1]
        self.progress.update(1, loss=t.step_logs["loss"])
        if t.iteration % self.log_every and t.iteration != t.total_iters:
            return
        rec = distributed.reduce_dict_mean({k: v / self.n for k, v in self.sums.items()}, t.device)
        rate = (time.perf_counter() - self.t_start) / max(t.iteration - self.it_start, 1)
        groups = t.optimizer.param_groups
        rec.update({
            "iteration": t.iteration, "epoch": t.step_epoch, "lr": groups[0]["lr"],
            "lr_backbone": next((g["lr"] for g in groups if g.get("name") == "backbone"), groups[0]["lr"]),
            "iter_time": self.t_iter / self.n, "data_time": self.t_data / self.n,
            "peak_mem_mb": peak_memory_mb(t.device), "eta_s": rate * (t.total_iters - t.iteration),
        })
        t.logger.log(rec)
        self._reset()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


class PeriodicCheckpoint(HookBase):
    """A resumable checkpoint every ``every`` steps, at the end of every epoch and after the last step."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self) -> None:
        t = self.trainer
        if t.iteration % self.every == 0 or t.end_of_epoch or t.finished:
            t.save_checkpoint()


class PeriodicEvaluation(HookBase):
    """COCO evaluation on the validation set every ``every_iters`` steps (else every ``every_epochs``
    epochs) and after the last step; ``model_best.safetensors``, ``metrics.json`` and ``results.json`` follow
    each one. A run that ends without evaluating its final weights (a finished run resumed) evaluates them.
    With ``train.ema`` the EMA is the run's model (``eval/AP``, best, metrics); the raw weights are evaluated
    beside it and logged as ``eval_raw/...``."""

    def __init__(self, every_iters: int | None, every_epochs: int):
        self.every_iters, self.every_epochs = every_iters, every_epochs
        self.best_ap, self.last_eval_iteration = -1.0, -1

    def before_train(self) -> None:
        t = self.trainer
        metrics = t.out / "metrics.json"
        if t.iteration > 0 and t.main and metrics.exists():  # a resumed run keeps its best AP
            self.best_ap = json.loads(metrics.read_text()).get("best_ap", -1.0)

    def _due(self) -> bool:
        t = self.trainer
        if t.finished:
            return True
        if self.every_iters:
            return t.iteration % self.every_iters == 0
        return t.end_of_epoch and self.every_epochs > 0 and t.epoch % self.every_epochs == 0

    def after_step(self) -> None:
        if self._due():
            self.evaluate()

    def after_train(self) -> None:
        # decided on state every rank shares, so all ranks join the evaluation's collectives
        if self.last_eval_iteration != self.trainer.iteration:
            self.evaluate()

    def evaluate(self) -> None:
        """Evaluate on every rank; rank 0 logs, writes the metrics and keeps them as the run's."""
        t = self.trainer
        result, results = t.evaluate()
        raw = t.evaluate(t.raw_model)[0] if t.ema is not None else None
        self.last_eval_iteration = t.iteration
        if not t.main:
            return
        ap = result.metrics["AP"]
        t.logger.log({"iteration": t.iteration, "epoch": t.epoch,
                      **{f"eval/{k}": v for k, v in result.metrics.items()},
                      **({f"eval_raw/{k}": v for k, v in raw.metrics.items()} if raw is not None else {})})
        log.info("evaluation at iteration %d:\n%s", t.iteration, result.summary_text)
        if ap > self.best_ap:
            self.best_ap = ap
            t.save_model("model_best.safetensors", AP=ap)
        write_json_atomic(t.out / "results.json", results, indent=None)
        t.metrics = {"iteration": t.iteration, **result.metrics, "best_ap": self.best_ap,
                     "per_class": result.per_class, "summary": result.summary_text,
                     **({"raw": raw.metrics} if raw is not None else {})}
        write_json_atomic(t.out / "metrics.json", t.metrics)


class RunRecord(HookBase):
    """``config.json`` (the run's whole configuration, versions and git commit) at the start, and the final
    student weights, ``model_final.safetensors``, at the end."""

    def before_train(self) -> None:
        t = self.trainer
        if t.main:
            t.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(t.out / "config.json", run_record(t.run_config()))

    def after_train(self) -> None:
        if self.trainer.main:
            self.trainer.save_model("model_final.safetensors")




class AugmentationTail(HookBase):
    """The last epochs without strong augmentation (``train.no_aug_fraction``; RT-DETR's, D-FINE's and DEIM's
    ``stop_epoch``): from the first epoch that starts at or after iteration ``start``, the training set draws
    its views from :meth:`~kd_detr.data.AugmentationPolicy.without_strong_augmentation`. Decided per epoch from
    the iteration, so a resumed run switches where the uninterrupted one did."""

    def __init__(self, start: int):
        self.start, self.switched = start, False

    def before_epoch(self) -> None:
        t = self.trainer
        if self.switched or t.iteration < self.start or t.train_set.transforms is None:
            return
        t.train_set.transforms = t.train_set.transforms.without_strong_augmentation()
        self.switched = True
        log.info("iteration %d: the last %d iterations train without crop and multi-scale (train.no_aug_fraction)",
                 t.iteration, t.total_iters - t.iteration)
