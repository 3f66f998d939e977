"""The per-term log values of one training step: every loss term scaled by its weight, its unscaled value,
and the sums the logs and ``kd-detr compare`` plot (``student.total``, the methods' groups)."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["loss_logs"]


def loss_logs(gt: Mapping[str, torch.Tensor], gt_weights: Mapping[str, float],
              terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> dict[str, float]:
    """Log values of one step's losses.

    Args:
        gt: the ground-truth criterion's unweighted terms; ``gt_weights`` its weight dict (terms without a
            weight are diagnostics and are not logged).
        terms: the methods' unweighted terms; ``weights`` their weights.

    Returns ``{term: weighted value, term_unscaled: value}`` for every weighted term, ``student.total`` (the
    weighted GT terms), and for the methods' terms the sum over layers (``distill.adaptive.self_attn``) and per
    namespace (``distill.total``).
    """
    logs: dict[str, float] = {}
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    for k, v in gt.items():
        if k in gt_weights:
            value = float(v.detach())
            logs[k] = value * gt_weights[k]
            logs[k + "_unscaled"] = value
            add("student.total", value * gt_weights[k])
    for k, v in terms.items():
        value = float(v.detach())
        logs[k] = value * weights[k]
        logs[k + "_unscaled"] = value
        add(k.rsplit(".l", 1)[0], value * weights[k])
        add(k.split(".")[0] + ".total", value * weights[k])
    logs.update(sums)
    return logs
