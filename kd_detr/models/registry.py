"""The named-model registry (timm-style): named :class:`~kd_detr.models.config.ModelConfig` s and
:func:`build_model`.

Named configs:

* ``cond_detr_r50``, ``cond_detr_r101``, ``cond_detr_r50_dc5``, ``cond_detr_r101_dc5``:
  the official Conditional DETR models (300 queries, 6+6 layers, d=256, 8 heads, FFN 2048,
  frozen BatchNorm, 91 class slots). These load the official ``.pth`` files.
* small CPU-friendly variants with trainable BatchNorm for experiments and tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .backbone import load_backbone_weights
from .conditional_detr import ConditionalDETR
from .config import BACKBONE_NORMS, BACKBONES, ModelConfig  # noqa: F401  (re-exported)
from .hf.config import HFModelConfig

__all__ = [
    "ModelConfig",
    "BACKBONES",
    "BACKBONE_NORMS",
    "register_model",
    "list_models",
    "get_config",
    "build_model",
    "config_from_dict",
]

_REGISTRY: dict[str, ModelConfig] = {}
# ``backbone_weights`` naming torchvision's ImageNet weights of the model's backbone (downloaded on first use)
IMAGENET = "imagenet"


def register_model(config: ModelConfig) -> ModelConfig:
    """Add a named config to the registry (name must be new)."""
    if config.name in _REGISTRY:
        raise ValueError(f"model {config.name!r} is already registered")
    _REGISTRY[config.name] = config.validate()
    return config


def list_models() -> dict[str, str]:
    """Registered model names mapped to a one-line description (registration order): kd-detr's own, then the
    tiny transformers models (``hf:DIR`` names any ``save_pretrained`` folder)."""
    from .hf.registry import list_hf_models

    return {**{name: cfg.description for name, cfg in _REGISTRY.items()}, **list_hf_models()}


def get_config(name: str) -> "ModelConfig | HFModelConfig":
    """A copy of the registered config ``name``, or the :class:`HFModelConfig` of ``hf:DIR`` / a tiny
    transformers model (``ValueError`` listing names if unknown)."""
    from .hf.registry import hf_config, is_hf_name

    if is_hf_name(name):
        return hf_config(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {list(list_models())} or hf:DIR (a transformers "
                         "save_pretrained folder)")
    return dataclasses.replace(_REGISTRY[name])


def build_model(
    name: str | ModelConfig,
    num_classes: Optional[int] = None,
    backbone_weights: Optional[str] = None,
    role: str = "student",
    allow_partial_weights: Optional[bool] = None,
    **overrides: Any,
):
    """Build a :class:`~kd_detr.models.conditional_detr.ConditionalDETR`, or an
    :class:`~kd_detr.models.hf.HFDetector` for ``hf:DIR`` / a tiny transformers name / an :class:`HFModelConfig`.

    Args:
        name: a registered model name, ``hf:DIR``, or a :class:`ModelConfig` / :class:`HFModelConfig`.
        num_classes: number of class logits ``C`` (default: the config's, 91 for official models).
        backbone_weights: optional local torchvision ImageNet ResNet state dict
            (``.pth`` / ``.safetensors``) loaded into the backbone trunk, or ``"imagenet"``: torchvision's
            ImageNet weights of the backbone (what the official code starts from), downloaded on first use into
            ``KD_DETR_HOME`` (:func:`kd_detr.download.imagenet_backbone`).
        role: ``student`` or ``teacher``, for a transformers folder (``hf:DIR``): a teacher loads every tensor
            of the folder or is refused; a student may re-initialise its class head when ``num_classes``
            differs from the folder's (:func:`kd_detr.models.hf.adapter.build_transformers_model`).
        allow_partial_weights: for a transformers folder, let tensors that do not load start from random
            values (with a warning naming them) instead of refusing; recorded in ``model.config``. kd-detr's
            own models load strictly whatever it says (``None``: the config's own setting).
        **overrides: any :class:`ModelConfig` field (``d_model=128``, ``backbone_norm="bn"`` ...);
            an unknown key raises ``ValueError`` naming it and listing the valid keys.

    The returned model carries the fully resolved config as ``model.config``.
    """

    config = get_config(name) if isinstance(name, str) else name
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    if isinstance(config, HFModelConfig) and allow_partial_weights is not None:
        overrides["allow_partial_weights"] = bool(allow_partial_weights)
    config = config.replace(**overrides)
    if isinstance(config, HFModelConfig):
        if backbone_weights is not None:
            raise ValueError(f"{config.name}: --backbone-weights is for kd-detr's own models; a transformers "
                             "model's backbone weights come with its save_pretrained folder")
        from .hf.adapter import HFDetector

        return HFDetector(config, role=role)
    if config.freeze_stem is None:
        # Official models always start from ImageNet weights and freeze stem + layer1.
        config = config.replace(
            freeze_stem=backbone_weights is not None or config.backbone_norm == "frozen_bn"
        )
    model = ConditionalDETR(config)
    if backbone_weights == IMAGENET:  # torchvision's ImageNet weights of the backbone, downloaded on first use
        from kd_detr.download import imagenet_backbone

        backbone_weights = str(imagenet_backbone(config.backbone))
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model


def config_from_dict(data: dict[str, Any]) -> "ModelConfig | HFModelConfig":
    """A config serialised by ``to_dict()`` (checkpoint and cache metadata): kd-detr's own or a transformers one."""
    if data.get("kind") == "hf":
        return HFModelConfig.from_dict(data)
    return ModelConfig.from_dict(data)


def _official(name: str, backbone: str, dilation: bool, desc: str) -> ModelConfig:
    return ModelConfig(name=name, description=desc, backbone=backbone, dilation=dilation)


register_model(_official("cond_detr_r50", "resnet50", False,
                         "official Conditional DETR R50-C5 (300 queries, 6+6 layers, d=256, frozen BN)"))
register_model(_official("cond_detr_r101", "resnet101", False,
                         "official Conditional DETR R101-C5 (300 queries, 6+6 layers, d=256, frozen BN)"))
register_model(_official("cond_detr_r50_dc5", "resnet50", True,
                         "official Conditional DETR DC5-R50 (dilated C5, stride 16)"))
register_model(_official("cond_detr_r101_dc5", "resnet101", True,
                         "official Conditional DETR DC5-R101 (dilated C5, stride 16)"))
register_model(ModelConfig(
    name="cond_detr_r18", backbone="resnet18",
    description="R18 backbone (frozen BN) with the official transformer: a common KD student",
))
register_model(ModelConfig(
    name="cond_detr_r34_small", backbone="resnet34", backbone_norm="bn", d_model=256, nheads=8,
    enc_layers=3, dec_layers=3, dim_feedforward=1024, num_queries=100,
    description="small R34 model (trainable BN, d=256, 3+3 layers, FFN 1024, 100 queries)",
))
register_model(ModelConfig(
    name="cond_detr_r18_tiny", backbone="resnet18", backbone_norm="bn", d_model=128, nheads=8,
    enc_layers=3, dec_layers=3, dim_feedforward=512, num_queries=50,
    description="tiny CPU model: R18 (trainable BN), d=128, 3+3 layers, FFN 512, 50 queries",
))
register_model(ModelConfig(
    name="cond_detr_r10_tiny", backbone="resnet10", backbone_norm="bn", d_model=128, nheads=8,
    enc_layers=2, dec_layers=2, dim_feedforward=512, num_queries=30,
    description="tiniest CPU model: ResNet-10 (BasicBlock [1,1,1,1], trainable BN), d=128, 2+2 layers, 30 queries",
))
