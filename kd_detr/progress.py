"""Progress bars on the main process (training, cache builds, evaluation); a no-op elsewhere.

Inside a Ray worker (a run of ``kd-detr compare``) a plain tqdm bar would reach the terminal as one
forwarded log line per refresh; there the bar is Ray's ``ray.experimental.tqdm_ray``, which the driver
draws as one bar per run. Its label is the run's name (``$KD_DETR_RUN_NAME``, set by compare).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "in_ray_worker", "RUN_NAME_ENV"]

RUN_NAME_ENV = "KD_DETR_RUN_NAME"


def in_ray_worker() -> bool:
    """True inside a Ray task or actor process (never imports Ray when it is not loaded)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - an old or partial Ray: fall back to plain tqdm
        return False


class Progress:
    """A bar showing the main loss terms. ``worker_bar=False``: no bar inside a Ray worker (one bar per run:
    the training bar; evaluation and other secondary bars stay quiet there)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 worker_bar: bool = True):
        self.t0 = time.perf_counter()
        self._ray = enabled and in_ray_worker()
        self._last_desc = 0.0
        if self._ray:
            self.bar = None
            if worker_bar:
                from ray.experimental.tqdm_ray import tqdm as tqdm_ray

                self.desc = os.environ.get(RUN_NAME_ENV, desc)
                self.bar = tqdm_ray(total=total, desc=self.desc)
                self.bar.update(initial)
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not enabled, mininterval=1.0)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        if not postfix:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
        if self._ray:  # tqdm_ray has no postfix: the label carries it, refreshed every few seconds
            now = time.perf_counter()
            if now - self._last_desc > 5.0:
                self.bar.set_description(f"{self.desc} {text}")
                self._last_desc = now
        else:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
