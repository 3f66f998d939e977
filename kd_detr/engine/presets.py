"""Training presets: how each detector family is trained by its authors, so a student is compared against the
baseline its users know (``train.preset``).

A preset fills every :class:`~kd_detr.engine.train_config.TrainConfig` field the run leaves unset (``None``:
a recipe's ``[train]`` or a command-line option wins), and says how parameters are grouped: regular
expressions on parameter names (``re.search``), each group's learning rate (``lr`` or ``lr_backbone``) and
weight decay; the first rule that matches a parameter wins, the rest train at ``lr`` with ``weight_decay``.
``auto`` picks the student family's preset (:data:`FAMILY_PRESETS`); kd-detr's own models and the
transformers DETR families that are not real-time get ``official`` (Conditional DETR's recipe).

Schedules (``schedule``): ``step``, linear warm-up from 0.001x over ``warmup_iters`` then x0.1 after
``lr_drop`` epochs / ``lr_drop_iter`` iterations; ``flat_cosine`` (D-FINE, DEIM), warm-up, a flat part until
``flat_fraction`` of the run, a cosine down to ``lr * lr_min_factor`` at ``1 - no_aug_fraction``, then flat.
The epoch-defined parts of the official schedules (flat epochs, the last epochs without strong
augmentation) are kept as fractions of the run, so the shape holds at any budget; iteration counts
(warm-up, EMA ramp) are the official ones, and a warning names the option when they do not fit the run.

Every value is cited from the family's official training configuration (repository, file, key).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

log = logging.getLogger("kd_detr.train")

__all__ = ["GroupRule", "TrainingPreset", "PRESETS", "FAMILY_PRESETS", "register_preset", "get_preset",
           "preset_for_model", "resolve_preset", "starts_pretrained", "grouped_parameters"]


@dataclass(frozen=True)
class GroupRule:
    """Parameters whose name matches ``pattern`` (``re.search``) train at ``scale`` x ``lr`` (the name of the
    ``TrainConfig`` field: ``lr`` or ``lr_backbone``) with ``weight_decay`` (``None``: the run's)."""

    name: str
    pattern: str
    lr: str = "lr"
    weight_decay: Optional[float] = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if self.lr not in ("lr", "lr_backbone"):
            raise ValueError(f"group {self.name}: lr must name lr or lr_backbone, got {self.lr!r}")


@dataclass(frozen=True)
class TrainingPreset:
    """A family's training recipe: ``values`` (``TrainConfig`` fields) and parameter ``groups``."""

    name: str
    description: str
    values: Mapping[str, Any]
    groups: tuple[GroupRule, ...] = ()
    sources: tuple[str, ...] = ()  # where the values come from (also in the comments next to them)


PRESETS: dict[str, TrainingPreset] = {}

# transformers family key -> preset (families absent here get "official")
FAMILY_PRESETS = {"rt_detr": "rt_detr", "rt_detr_v2": "rt_detr_v2", "d_fine": "d_fine", "deimv2": "deimv2",
                  "lw_detr": "lw_detr", "rf_detr": "rf_detr"}

# the fields a preset fills (the others have fixed defaults in TrainConfig)
PRESET_FIELDS = ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "warmup_iters", "lr_drop", "schedule",
                 "flat_fraction", "no_aug_fraction", "lr_min_factor", "ema", "ema_decay", "ema_warmup")


def register_preset(preset: TrainingPreset) -> TrainingPreset:
    unknown = set(preset.values) - set(PRESET_FIELDS)
    if unknown:
        raise ValueError(f"preset {preset.name}: {sorted(unknown)} are not preset fields ({', '.join(PRESET_FIELDS)})")
    missing = set(PRESET_FIELDS) - set(preset.values)
    if missing:
        raise ValueError(f"preset {preset.name} leaves {sorted(missing)} unset")
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> TrainingPreset:
    if name not in PRESETS:
        raise ValueError(f"train.preset must be auto or one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def preset_for_model(model_name: str) -> str:
    """The ``auto`` preset of a student: its transformers family's, else ``official``."""
    from kd_detr.models import get_config

    family = getattr(get_config(model_name), "family", None)
    return FAMILY_PRESETS.get(family, "official")


def resolve_preset(cfg):
    """``cfg`` with its unset preset fields filled from its preset (``cfg.preset``; ``auto``: the student's),
    and the :class:`TrainingPreset`.

    A family preset's backbone rate below its base rate (RT-DETR's 0.1x, D-FINE's 0.5x, LW-DETR's encoder
    rate) is the rate of a backbone that starts from ImageNet weights, which every official recipe does; a
    student that starts from random weights (no ``init_checkpoint``, no ``backbone_weights``, not a
    ``hf:DIR`` folder with weights) trains its backbone at the base rate instead, and the log says so. An
    explicit ``train.lr_backbone`` is kept, and ``official`` keeps Conditional DETR's rates as they are."""
    name = preset_for_model(cfg.model) if cfg.preset == "auto" else cfg.preset
    preset = get_preset(name)
    filled = {k: v for k, v in preset.values.items() if getattr(cfg, k) is None}
    # a recipe's [train], --set or an option wins over the preset: say which values differ from it, once
    own = {k: getattr(cfg, k) for k in PRESET_FIELDS if k not in filled and getattr(cfg, k) != preset.values[k]}
    if own:
        log.info("preset %s: the run sets %s (the preset's: %s)", name,
                 ", ".join(f"{k}={v}" for k, v in own.items()),
                 ", ".join(f"{k}={preset.values[k]}" for k in own))
    base = cfg.lr if cfg.lr is not None else preset.values["lr"]
    if name != "official" and filled.get("lr_backbone", base) < base and not starts_pretrained(cfg):
        log.info("preset %s: lr_backbone %g is the rate of an ImageNet-initialised backbone; %s starts from random "
                 "weights, so its backbone trains at lr %g (set train.lr_backbone to choose another)", name,
                 filled["lr_backbone"], cfg.model, base)
        filled["lr_backbone"] = base
    return dataclasses.replace(cfg, preset=name, **filled), preset


def starts_pretrained(cfg) -> bool:
    """Whether the student starts from trained weights: an init checkpoint, backbone weights, or a transformers
    ``save_pretrained`` folder (``hf:DIR``, whose weights it loads)."""
    if cfg.init_checkpoint or cfg.backbone_weights:
        return True
    from kd_detr.models import get_config

    return getattr(get_config(cfg.model), "source", None) is not None


def grouped_parameters(model: torch.nn.Module, preset: TrainingPreset, cfg) -> list[dict]:
    """AdamW parameter groups of ``model``: first ``rest`` (the parameters no rule matches, at ``cfg.lr`` /
    ``cfg.weight_decay``), then one group per rule of the preset (the first matching rule wins). Empty groups
    are left out; every group has a ``name``. Logs the resolved groups once."""
    compiled = [re.compile(r.pattern) for r in preset.groups]
    members: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in range(len(preset.groups) + 1)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            i = next((i for i, c in enumerate(compiled) if c.search(name)), -1)
            members[i + 1].append((name, p))
    groups = []
    for rule, params in zip([GroupRule("rest", "", "lr"), *preset.groups], members):
        if not params:
            continue
        lr = getattr(cfg, rule.lr) * rule.scale
        wd = cfg.weight_decay if rule.weight_decay is None else rule.weight_decay
        groups.append({"params": [p for _, p in params], "lr": lr, "weight_decay": wd, "name": rule.name})
        shown = ", ".join(n for n, _ in params[:2]) + (", ..." if len(params) > 2 else "")
        log.info("parameter group %s (preset %s%s): %d tensors, lr %g, weight decay %g: %s", rule.name, preset.name,
                 f", /{rule.pattern}/" if rule.pattern else ", matched by no rule", len(params), lr, wd, shown)
    return groups


# ------------------------------------------------------------------------------------------- the presets
register_preset(TrainingPreset(
    "official", "Conditional DETR (Meng et al.): AdamW, backbone at lr_backbone, x0.1 after 40 of 50 epochs",
    values=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, clip_max_norm=0.1,  # Atten4Vis/ConditionalDETR main.py
                warmup_iters=0, lr_drop=40, schedule="step", flat_fraction=0.0, no_aug_fraction=0.0,
                lr_min_factor=0.1, ema=False, ema_decay=0.9999, ema_warmup=2000),
    # kd-detr's own model names its backbone "backbone." (a transformers model's starts "hf.": all at lr)
    groups=(GroupRule("backbone", r"^backbone\.", "lr_backbone"),),
    sources=("Atten4Vis/ConditionalDETR main.py: get_args_parser (lr, lr_backbone, weight_decay, lr_drop, "
             "clip_max_norm)",),
))

# The families' rules are their official regular expressions, written for the transformers port's parameter
# names: kd-detr's adapter prefixes "hf.", the backbone is "backbone" (DEIMv2's: "conv_encoder"), the hybrid
# encoder "encoder", the decoder "decoder". Only the smallest official size of each family is encoded (the
# tiny students are smaller still). What no preset reproduces: RT-DETR's photometric distortion, zoom-out
# and IoU crop, DEIM's mosaic / mixup / copy-blend, LW-DETR's and RF-DETR's per-layer ViT rate decay, and
# D-FINE's reload of the best first-stage checkpoint at its stop epoch; kd-detr's DETR augmentation (flip,
# multi-scale, crop) stands in for theirs, and its crop and multi-scale stop for the no-augmentation tail.
RT = "lyuwenyu/RT-DETR"
# The official RT-DETR / D-FINE / DEIM "decoder" module holds the input projections, the denoising embedding
# and the encoder-output heads too; the transformers port puts them beside model.decoder ("decoder_input_proj",
# "denoising_class_embed", "enc_output", "enc_score_head", ...): the same parameters, matched by name here.
_RT_TRANSFORMER = r"(?:encoder|decoder|\.enc_|denoising)"
register_preset(TrainingPreset(
    "rt_detr", "RT-DETR r18 (rtdetr_pytorch): AdamW 1e-4, backbone 1e-5, no decay on norms and biases, EMA, "
    "constant lr (72 epochs, milestone 1000)",
    values=dict(lr=1e-4, weight_decay=1e-4,  # rtdetr_pytorch/configs/rtdetr/include/optimizer.yml: optimizer.lr, .weight_decay
                lr_backbone=1e-5,  # rtdetr_r18vd_6x_coco.yml: optimizer.params (backbone groups) lr
                clip_max_norm=0.1,  # include/optimizer.yml: clip_max_norm
                warmup_iters=0,  # rtdetr_pytorch has no lr warm-up (only the Paddle version: 2000 steps)
                lr_drop=None, schedule="step",  # include/optimizer.yml: MultiStepLR milestones [1000] > 72 epochs
                flat_fraction=0.0, lr_min_factor=0.1,
                no_aug_fraction=0.0,  # include/dataloader.yml: no policy (augmentation all 72 epochs)
                ema=True, ema_decay=0.9999, ema_warmup=2000),  # include/optimizer.yml: ema.decay, ema.warmups
    groups=(  # rtdetr_r18vd_6x_coco.yml: optimizer.params, in order
        GroupRule("backbone_norm", r"^(?=.*backbone)(?=.*norm).*$", "lr_backbone", weight_decay=0.0),
        GroupRule("backbone", r"^(?=.*backbone)(?!.*norm).*$", "lr_backbone"),
        GroupRule("encoder_decoder_norm_bias", rf"^(?=.*{_RT_TRANSFORMER})(?=.*(?:norm|bias)).*$",
                  weight_decay=0.0),
    ),
    sources=(f"{RT} rtdetr_pytorch/configs/rtdetr/include/optimizer.yml",
             f"{RT} rtdetr_pytorch/configs/rtdetr/rtdetr_r18vd_6x_coco.yml"),
))

register_preset(TrainingPreset(
    "rt_detr_v2", "RT-DETRv2 r18 (120 epochs): AdamW 1e-4 (backbone too), no decay on norms, 2000-iteration "
    "warm-up, EMA, the last 3 of 120 epochs without strong augmentation",
    values=dict(lr=1e-4, weight_decay=1e-4,  # rtdetrv2_pytorch/configs/rtdetrv2/include/optimizer.yml: optimizer
                lr_backbone=1e-4,  # rtdetrv2_r18vd_120e_coco.yml: no backbone group, the backbone trains at lr
                clip_max_norm=0.1,  # include/optimizer.yml: clip_max_norm
                warmup_iters=2000,  # include/optimizer.yml: lr_warmup_scheduler.warmup_duration (LinearWarmup)
                lr_drop=None, schedule="step",  # include/optimizer.yml: MultiStepLR milestones [1000] > 120 epochs
                flat_fraction=0.0, lr_min_factor=0.1,
                no_aug_fraction=3 / 120,  # rtdetrv2_r18vd_120e_coco.yml: policy.epoch 117 of epoches 120
                ema=True, ema_decay=0.9999, ema_warmup=2000),  # include/optimizer.yml: ema.decay, ema.warmups
    groups=(  # rtdetrv2_r18vd_120e_coco.yml: optimizer.params
        GroupRule("norm", r"^(?=.*(?:norm|bn)).*$", weight_decay=0.0),
    ),
    sources=(f"{RT} rtdetrv2_pytorch/configs/rtdetrv2/include/optimizer.yml",
             f"{RT} rtdetrv2_pytorch/configs/rtdetrv2/include/dataloader.yml",
             f"{RT} rtdetrv2_pytorch/configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml"),
))

_DFINE_N_GROUPS = (  # Peterande/D-FINE configs/dfine/dfine_hgnetv2_n_coco.yml: optimizer.params, in order (the
    # official "(?!.*norm|bn)" also lets backbone BatchNorms through: kept as written)
    # (DEIMv2's port names its backbone conv_encoder.model, beside the encoder's conv_encoder.encoder_input_proj)
    GroupRule("backbone", r"^(?=.*(?:backbone|conv_encoder\.model))(?!.*norm|bn).*$", "lr_backbone"),
    GroupRule("backbone_norm", r"^(?=.*(?:backbone|conv_encoder\.model))(?=.*norm|bn).*$", "lr_backbone",
              weight_decay=0.0),
    GroupRule("encoder_decoder_norm_bias", rf"^(?=.*{_RT_TRANSFORMER})(?=.*(?:norm|bn|bias)).*$", weight_decay=0.0),
)

register_preset(TrainingPreset(
    "d_fine", "D-FINE HGNetv2-N: AdamW 8e-4, backbone 4e-4, no decay on norms and biases, 500-iteration warm-up, "
    "EMA, the last 12 of 160 epochs without strong augmentation",
    values=dict(lr=8e-4, lr_backbone=4e-4, weight_decay=1e-4,  # configs/dfine/dfine_hgnetv2_n_coco.yml: optimizer
                clip_max_norm=0.1,  # configs/dfine/include/optimizer.yml: clip_max_norm
                warmup_iters=500,  # include/optimizer.yml: lr_warmup_scheduler.warmup_duration (LinearWarmup)
                lr_drop=None, schedule="step",  # include/optimizer.yml: MultiStepLR milestones [500] > 160 epochs
                flat_fraction=0.0, lr_min_factor=0.1,
                no_aug_fraction=12 / 160,  # dfine_hgnetv2_n_coco.yml: policy.epoch 148 of epochs 160
                ema=True, ema_decay=0.9999, ema_warmup=1000),  # include/optimizer.yml: ema.decay, ema.warmups
    groups=_DFINE_N_GROUPS,
    sources=("Peterande/D-FINE configs/dfine/include/optimizer.yml",
             "Peterande/D-FINE configs/dfine/include/dataloader.yml",
             "Peterande/D-FINE configs/dfine/dfine_hgnetv2_n_coco.yml"),
))

register_preset(TrainingPreset(
    "deim", "DEIM D-FINE-S: AdamW 4e-4, backbone 2e-4, no decay on norms, flat-cosine (flat to epoch 64 of 132, "
    "to 0.5x, the last 12 epochs without strong augmentation), quadratic 2000-iteration warm-up, EMA",
    values=dict(lr=4e-4, lr_backbone=2e-4, weight_decay=1e-4,  # ShihuaHuang95/DEIM configs/deim_dfine/deim_hgnetv2_s_coco.yml: optimizer
                clip_max_norm=0.1,  # configs/base/optimizer.yml: clip_max_norm
                warmup_iters=2000,  # configs/base/deim.yml: warmup_iter (quadratic: engine/optim/lr_scheduler.py)
                lr_drop=None, schedule="flat_cosine",  # configs/base/deim.yml: lrsheduler flatcosine
                flat_fraction=64 / 132,  # deim_hgnetv2_s_coco.yml: flat_epoch 64, epoches 132
                no_aug_fraction=12 / 132,  # deim_hgnetv2_s_coco.yml: no_aug_epoch 12
                lr_min_factor=0.5,  # configs/base/deim.yml: lr_gamma
                ema=True, ema_decay=0.9999, ema_warmup=1000),  # configs/base/optimizer.yml: ema
    groups=(  # deim_hgnetv2_s_coco.yml: optimizer.params
        GroupRule("backbone", r"^(?=.*(?:backbone|conv_encoder\.model))(?!.*bn).*$", "lr_backbone"),
        GroupRule("norm", r"^(?=.*(?:norm|bn)).*$", weight_decay=0.0),
    ),
    sources=("ShihuaHuang95/DEIM configs/base/deim.yml", "ShihuaHuang95/DEIM configs/base/optimizer.yml",
             "ShihuaHuang95/DEIM configs/deim_dfine/deim_hgnetv2_s_coco.yml"),
))

register_preset(TrainingPreset(
    "deimv2", "DEIMv2 HGNetv2-N: AdamW 8e-4, backbone 4e-4, no decay on norms and biases, quadratic "
    "2000-iteration warm-up then constant (flat-cosine with lr_gamma 1), EMA, the last 12 of 160 epochs "
    "without strong augmentation",
    values=dict(lr=8e-4, lr_backbone=4e-4, weight_decay=1e-4,  # Intellindust-AI-Lab/DEIMv2 configs/deimv2/deimv2_hgnetv2_n_coco.yml: optimizer
                clip_max_norm=0.1,  # configs/base/optimizer.yml: clip_max_norm
                warmup_iters=2000,  # configs/base/deimv2.yml: warmup_iter
                lr_drop=None, schedule="flat_cosine",  # configs/base/deimv2.yml: lrsheduler flatcosine
                flat_fraction=1.0,  # deimv2_hgnetv2_n_coco.yml: flat_epoch 7800 > epoches 160
                no_aug_fraction=12 / 160,  # deimv2_hgnetv2_n_coco.yml: no_aug_epoch 12, policy.epoch [4, 78, 148]
                lr_min_factor=1.0,  # deimv2_hgnetv2_n_coco.yml: lr_gamma 1.0
                ema=True, ema_decay=0.9999, ema_warmup=1000),  # configs/base/optimizer.yml: ema
    groups=_DFINE_N_GROUPS,  # deimv2_hgnetv2_n_coco.yml: optimizer.params, the same as D-FINE N's
    sources=("Intellindust-AI-Lab/DEIMv2 configs/base/deimv2.yml",
             "Intellindust-AI-Lab/DEIMv2 configs/deimv2/deimv2_hgnetv2_n_coco.yml"),
))

# LW-DETR models/backbone/backbone.py: no weight decay on these ViT names (RF-DETR also on "embeddings")
_VIT_NO_DECAY = r"(?:gamma|pos_embed|position_embeddings|rel_pos|bias|norm)"
_DINO_NO_DECAY = r"(?:gamma|pos_embed|position_embeddings|rel_pos|bias|norm|embeddings)"


def _vit_groups(no_decay: str) -> tuple[GroupRule, ...]:
    """LW-DETR's and RF-DETR's grouping: the ViT encoder's no-decay names, the rest of the encoder (both at the
    encoder's rate), the decoder at lr x lr_component_decay (0.7)."""
    return (GroupRule("vit_no_decay", rf"backbone\.backbone\..*{no_decay}", "lr_backbone", weight_decay=0.0),
            GroupRule("vit", r"backbone\.backbone\.", "lr_backbone"),
            GroupRule("decoder", r"\.decoder\.", scale=0.7))
register_preset(TrainingPreset(
    "lw_detr", "LW-DETR tiny: AdamW 1e-4, ViT encoder 1.5e-4 x 0.7^2 (component decay; the per-layer decay is "
    "not reproduced), decoder x0.7, constant lr, EMA 0.9997 without ramp",
    values=dict(lr=1e-4,  # Atten4Vis/LW-DETR scripts/lwdetr_tiny_coco_train.sh: --lr
                lr_backbone=1.5e-4 * 0.7 ** 2,  # --lr_encoder 1.5e-4, --lr_component_decay 0.7 (squared for the
                # encoder in models/backbone/backbone.py: get_named_param_lr_pairs)
                weight_decay=1e-4,  # --weight_decay
                clip_max_norm=0.1,  # main.py: --clip_max_norm default
                warmup_iters=0, lr_drop=None, schedule="step",  # --epochs 60 --lr_drop 60: no warm-up, no drop
                flat_fraction=0.0, no_aug_fraction=0.0, lr_min_factor=0.1,
                ema=True, ema_decay=0.9997, ema_warmup=0),  # main.py: --use_ema, --ema_decay 0.9997 (util/utils.py:
                # ModelEma, a constant decay)
    groups=_vit_groups(_VIT_NO_DECAY),  # util/get_param_dicts.py
    sources=("Atten4Vis/LW-DETR main.py", "Atten4Vis/LW-DETR scripts/lwdetr_tiny_coco_train.sh",
             "Atten4Vis/LW-DETR util/get_param_dicts.py"),
))

register_preset(TrainingPreset(
    "rf_detr", "RF-DETR (rfdetr TrainConfig): AdamW 1e-4, DINOv2 encoder 1.5e-4 x 0.7^2, decoder x0.7, "
    "constant lr, EMA 0.993 with a 100-update ramp",
    values=dict(lr=1e-4, weight_decay=1e-4,  # roboflow/rf-detr rfdetr/config.py: TrainConfig.lr, .weight_decay
                lr_backbone=1.5e-4 * 0.7 ** 2,  # TrainConfig.lr_encoder, .lr_component_decay (as LW-DETR's)
                clip_max_norm=0.1,  # rfdetr/main.py: populate_args clip_max_norm
                warmup_iters=0,  # TrainConfig.warmup_epochs 0.0
                lr_drop=None, schedule="step",  # TrainConfig.lr_drop 100 = epochs 100: constant
                flat_fraction=0.0, no_aug_fraction=0.0, lr_min_factor=0.1,
                ema=True, ema_decay=0.993, ema_warmup=100),  # TrainConfig.use_ema, .ema_decay, .ema_tau
    groups=_vit_groups(_DINO_NO_DECAY),  # rfdetr/util/get_param_dicts.py (the grouping of LW-DETR)
    sources=("roboflow/rf-detr rfdetr/config.py", "roboflow/rf-detr rfdetr/main.py",
             "roboflow/rf-detr rfdetr/util/get_param_dicts.py"),
))
