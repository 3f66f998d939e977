"""The architecture of a detector: :class:`ModelConfig` (stored on every built model as ``model.config`` and
serialised into checkpoints, so that a file rebuilds its model without any other information) and the
backbones it can name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["BACKBONES", "BACKBONE_NORMS", "ModelConfig"]


# name -> (block type, blocks per stage); resnet10 is torchvision's ResNet with BasicBlock [1,1,1,1].
BACKBONES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
BACKBONE_NORMS = ("frozen_bn", "bn", "gn")


@dataclass
class ModelConfig:
    """Architecture of a Conditional DETR model.

    Fields mirror the official command-line arguments where one exists
    (``backbone``, ``dilation``, ``hidden_dim`` -> ``d_model``, ``nheads``, ``enc_layers``,
    ``dec_layers``, ``dim_feedforward``, ``dropout``, ``num_queries``).

    * ``backbone_norm``: ``"frozen_bn"`` (official, torchvision ``FrozenBatchNorm2d``),
      ``"bn"`` (trainable ``BatchNorm2d``) or ``"gn"`` (``GroupNorm(gn_groups, C)``).
    * ``freeze_stem``: freeze conv1/bn1 + layer1 as the official ``train_backbone`` logic does.
      ``None`` means "auto" and is resolved by :func:`build_model`: frozen when the backbone is
      pretrained (``backbone_weights`` given) or uses frozen BN (the official setting).
    * ``train_backbone``: ``False`` freezes the whole backbone (official ``lr_backbone=0``).
    """

    name: str = "custom"
    description: str = ""
    backbone: str = "resnet50"
    dilation: bool = False
    backbone_norm: str = "frozen_bn"
    gn_groups: int = 32
    freeze_stem: Optional[bool] = None
    train_backbone: bool = True
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    num_queries: int = 300
    num_classes: int = 91
    pe_temperature: int = 10000

    @property
    def stride(self) -> int:
        """Stride of the map the decoder cross-attends to: C5 (32), or 16 with a dilated C5 (DC5)."""
        return 16 if self.dilation else 32

    @property
    def feature_levels(self) -> int:
        """Encoder output maps ``DetectorRequest(features=True)`` returns: one, the encoder memory on C5."""
        return 1

    @property
    def feature_channels(self) -> int:
        """Width of the encoder output maps: ``d_model``."""
        return int(self.d_model)

    @property
    def supports(self) -> frozenset[str]:
        """The :data:`~kd_detr.models.detector.CAPABILITIES` of this architecture: all of them."""
        from .detector import CAPABILITIES

        return frozenset(CAPABILITIES)

    def validate(self) -> "ModelConfig":
        """Raise ``ValueError`` on an inconsistent configuration; return ``self``."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; valid: {sorted(BACKBONES)}")
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ValueError(f"unknown backbone_norm {self.backbone_norm!r}; valid: {list(BACKBONE_NORMS)}")
        if self.dilation and BACKBONES[self.backbone][0] != "bottleneck":
            # torchvision's BasicBlock refuses dilation > 1.
            raise ValueError(f"dilation (DC5) needs a Bottleneck ResNet, not {self.backbone!r}")
        if self.backbone_norm == "gn" and (self.gn_groups < 1 or 64 % self.gn_groups):
            raise ValueError(f"gn_groups={self.gn_groups} must divide 64 (the smallest ResNet width)")
        if self.d_model % 4:
            # The sine embeddings use d/2 features per axis made of sin/cos pairs.
            raise ValueError(f"d_model={self.d_model} must be a multiple of 4")
        if self.nheads < 1 or self.d_model % self.nheads:
            raise ValueError(f"d_model={self.d_model} must be divisible by nheads={self.nheads}")
        for key in ("enc_layers", "dec_layers", "dim_feedforward", "num_queries", "num_classes"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(valid)}")
        return cls(**data).validate()

    def replace(self, **changes: Any) -> "ModelConfig":
        """Copy with ``changes`` applied; unknown keys raise ``ValueError`` listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)} - {"name", "description"}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ValueError(
                f"unknown model override(s) {unknown}; valid keys: {sorted(valid)}"
            )
        return dataclasses.replace(self, **changes).validate()
