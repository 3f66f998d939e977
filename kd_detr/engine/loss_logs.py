"""The per-term log values of one training step: every loss term scaled by its weight, its unscaled value,
and the sums the logs and ``kd-detr compare`` plot (``student.total``, the methods' groups).

The methods' sums follow the groups each method declares for its terms
(:class:`~kd_detr.methods.TermGroup`, :meth:`~kd_detr.methods.Method.term_groups`), never the terms' names."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from kd_detr.methods import TermGroup

__all__ = ["loss_logs"]


def loss_logs(gt: Mapping[str, torch.Tensor], gt_weights: Mapping[str, float],
              terms: Mapping[str, torch.Tensor], weights: Mapping[str, float],
              groups: Optional[Mapping[str, TermGroup]] = None) -> dict[str, float]:
    """Log values of one step's losses.

    Args:
        gt: the ground-truth criterion's unweighted terms; ``gt_weights`` its weight dict (terms without a
            weight are diagnostics and are not logged).
        terms: the methods' unweighted terms; ``weights`` their weights.
        groups: each method term's :class:`~kd_detr.methods.TermGroup`; default ``weights.groups`` (the
            :class:`~kd_detr.methods.TermWeights` that :func:`~kd_detr.engine.step.batch_losses` returns).

    Returns ``{term: weighted value, term_unscaled: value}`` for every weighted term, ``student.total`` (the
    weighted GT terms), and for the methods' terms the sums their groups declare: ``<group>.total`` (a
    method's whole objective, e.g. ``distill.total``), each subgroup (e.g. the term over layers,
    ``distill.adaptive.self_attn``) and ``<part>.total`` for a named part (``fixed_gt.total``).

    Raises ``ValueError`` for a method term without a declared group (it would be missing from its total).
    """
    if groups is None:
        groups = getattr(weights, "groups", None)
        if groups is None and terms:
            raise ValueError("loss_logs needs the methods' term groups: pass groups= or the TermWeights "
                             "that batch_losses returns")
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
        group = groups.get(k)
        if group is None:
            raise ValueError(f"the loss term {k!r} has no declared log group (Method.term_groups): it would be "
                             "left out of its method's total")
        value = float(v.detach())
        weighted = value * weights[k]
        logs[k] = weighted
        logs[k + "_unscaled"] = value
        if group.subgroup != k:
            add(group.subgroup, weighted)
        add(group.group + ".total", weighted)
        if group.part is not None:
            add(group.part + ".total", weighted)
    logs.update(sums)
    return logs
