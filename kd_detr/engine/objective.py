"""Training-only objectives beside the ground-truth loss (MS-DETR, Co-DETR, ...).

An objective owns the modules it trains (auxiliary FFNs, heads, adapters). They are NOT part of the
detector, so checkpoints and exports stay plain Conditional DETR models; the trainer optimises their
parameters with the transformer's learning rate, saves their state with the training state and
averages their gradients across DDP ranks.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

__all__ = ["AuxiliaryObjective"]


class AuxiliaryObjective(nn.Module, abc.ABC):
    """Base class. Subclasses set :attr:`name`, :attr:`weight_dict` and implement :meth:`forward`.

    Loss names must be unique across objectives; use ``<name>.<term>`` (e.g. ``ms_detr.loss_ce.l3``).
    """

    name: str = "objective"
    weight_dict: dict[str, float]

    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the detector's forward, e.g. ``{"return_candidates": True}``."""
        return {}

    @abc.abstractmethod
    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict],
                num_boxes: float) -> dict[str, Tensor]:
        """Unweighted loss terms of one batch.

        Args:
            model: the (unwrapped) detector, e.g. for its shared heads or a :meth:`decode` pass.
            outputs: the detector's outputs for the batch (float32), with what :meth:`forward_kwargs` asked.
            targets: ground truth (``labels [N]``, ``boxes [N,4]`` normalised cxcywh).
            num_boxes: the GT normaliser of the batch (all-reduced across ranks).
        """
