"""An exponential moving average of the student's weights (``train.ema``), as the real-time DETR families
train: RT-DETR's ``ModelEMA`` (lyuwenyu/RT-DETR, ``rtdetr_pytorch/src/optim/ema.py``), also used by D-FINE
and DEIM. After every optimizer step, with ``n`` the number of updates so far (this one included)::

    d = decay * (1 - exp(-n / warmup))         # the ramp: early averages follow the weights closely
    ema = d * ema + (1 - d) * weights          # every floating tensor; other buffers are copied

The EMA is what the run evaluates as its AP, saves as ``model_best`` / ``model_final`` and exports; the raw
weights keep training. Under DDP every rank holds the same student after each step, so every rank's EMA is
the same too and nothing is communicated."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """The averaged copy of ``model`` (a detached deep copy, eval mode, no gradients).

    Args:
        model: the unwrapped student.
        decay: the long-run decay (RT-DETR: 0.9999).
        warmup: the ramp's time constant in updates (RT-DETR: 2000).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: int = 2000):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay!r}")
        if warmup < 0:
            raise ValueError(f"train.ema_warmup must be >= 0, got {warmup!r}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup = float(decay), int(warmup)
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (1 for the first)."""
        if self.warmup == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s current weights (call after each optimizer step)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        current = model.state_dict()
        seen: set[int] = set()
        for name, avg in self.module.state_dict().items():
            if avg.data_ptr() in seen:  # a tied tensor (e.g. shared heads) is averaged once
                continue
            seen.add(avg.data_ptr())
            new = current[name].detach()
            if avg.is_floating_point():
                avg.mul_(d).add_(new.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (the training state loads with ``weights_only=True``)."""
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.updates = int(state["updates"])
