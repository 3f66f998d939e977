"""ResNet trunk (C5 only) on torchvision's ResNet, with a selectable normalisation layer.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so our
``backbone.body.*`` keys equal the official ``backbone.0.body.*`` keys after one prefix
rename, and torchvision ImageNet state dicts load directly (minus ``fc.*``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

from .config import BACKBONES

__all__ = ["ResNetBody", "Backbone", "build_resnet_body", "load_backbone_weights", "read_state_dict_file",
           "weights_load_error"]

_STEM_AND_LAYER1 = ("conv1", "bn1", "layer1")


def _norm_factory(norm: str, gn_groups: int) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        # torchvision's FrozenBatchNorm2d is the official one (eps 1e-5 before rsqrt) and drops
        # num_batches_tracked on load, as the official checkpoints have none.
        return lambda c: FrozenBatchNorm2d(c, eps=1e-5)
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(gn_groups, c)
    raise ValueError(f"unknown backbone_norm {norm!r}; valid: frozen_bn, bn, gn")


class ResNetBody(nn.Module):
    """torchvision ResNet without ``avgpool``/``fc``; returns only the C5 map.

    Input ``[B,3,H,W]`` -> output ``[B,C5,ceil(H/32),ceil(W/32)]`` (stride 16 with dilation).
    """

    def __init__(self, resnet: ResNet):
        super().__init__()
        # Same child names and order as torchvision's IntermediateLayerGetter (official `body`).
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_resnet_body(name: str, dilation: bool = False, norm: str = "frozen_bn", gn_groups: int = 32):
    """Build a randomly initialised :class:`ResNetBody`; returns ``(body, num_channels)``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
    kind, layers = BACKBONES[name]
    block = BasicBlock if kind == "basic" else Bottleneck
    if dilation and block is BasicBlock:
        raise ValueError(f"dilation (DC5) needs a Bottleneck ResNet, not {name!r}")
    resnet = ResNet(block, list(layers), norm_layer=_norm_factory(norm, gn_groups),
                    replace_stride_with_dilation=[False, False, dilation])
    return ResNetBody(resnet), 512 * block.expansion


class Backbone(nn.Module):
    """C5 feature extractor with mask downsampling.

    ``forward(images [B,3,H,W], mask [B,H,W] bool, True = pad)`` ->
    ``(features [B,C,h,w], mask [B,h,w] bool)``; the mask is nearest-downsampled like the official code.

    Freezing follows the official ``BackboneBase``: with ``freeze_stem`` the stem (conv1, bn1) and
    layer1 get ``requires_grad=False``; with ``train_backbone=False`` everything does. Trainable
    BatchNorm layers inside a frozen part are kept in eval mode so their statistics do not drift.
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, norm: str = "frozen_bn",
                 gn_groups: int = 32, freeze_stem: bool = True, train_backbone: bool = True):
        super().__init__()
        self.body, self.num_channels = build_resnet_body(name, dilation, norm, gn_groups)
        self.stride = 16 if dilation else 32
        self.norm = norm
        if not train_backbone:
            frozen = tuple(n for n, _ in self.body.named_children())
        elif freeze_stem:
            frozen = _STEM_AND_LAYER1
        else:
            frozen = ()
        self.frozen_modules = frozen
        for child in frozen:
            for p in getattr(self.body, child).parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for child in self.frozen_modules:
                for m in getattr(self.body, child).modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.body(images)
        m = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return x, m


def weights_load_error(path: str | os.PathLike, exc: BaseException) -> ValueError:
    """One line naming ``path`` for a weight file that does not load (``exc``: what the reader raised).

    A pickle that would import code is named as such, with the global it asks for: ``torch.load`` runs with
    ``weights_only=True``, which refuses it, and that stays so (torch's own advice to load it with
    ``weights_only=False`` would run the code, so it is never repeated)."""
    from kd_detr.pickle_scan import unsafe_globals

    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    refused = "weights_only" in text or "Weights only load failed" in text
    code = [found.group(1)] if found else (unsafe_globals(path) if refused else [])
    if code:
        return ValueError(f"{path}: a torch pickle that would import {', '.join(code[:3])} (code, not tensor "
                          "data), refused: only tensors and plain values are read from pickles; use a "
                          ".safetensors file")
    if refused:  # torch's weights-only reader stopped, and the file asks for no code: it is no checkpoint at all
        op = re.search(r"Unsupported operand \S+|invalid load key[^.\n]*", text)
        return ValueError(f"{path}: not a torch checkpoint (its pickle is unreadable"
                          + (f": {op.group(0)}" if op else "") + "); use a .safetensors or .pth file of tensors")
    if "PytorchStreamReader" in text:
        return ValueError(f"{path}: a truncated or corrupt torch checkpoint (its zip archive cannot be read)")
    first = " ".join(text.split()) if text else ""
    first = first[:300] + (" ..." if len(first) > 300 else "")
    if "safetensor" in type(exc).__name__.lower() or "deserializing header" in text:
        if "not fully covered" in text or "incomplete" in text:
            first = "the file is shorter than its header says: truncated"
        return ValueError(f"{path}: not a readable safetensors file: {first}")
    return ValueError(f"cannot read weights file {path}: {type(exc).__name__}: {first}")


def read_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a tensor dict from ``.safetensors`` or a torch pickle (``weights_only=True``).

    Accepts a bare state dict or one wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``.
    Errors name the file, in one line (:func:`weights_load_error`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path, device="cpu")
        else:
            import argparse

            # Official training checkpoints also carry `args` (an argparse.Namespace).
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pickle protocol")  # a refused pickle is named below
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised in one line with the file name
        raise weights_load_error(path, exc) from None
    if isinstance(data, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in data and isinstance(data[wrapper], dict):
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, Tensor) for v in data.values()):
        keys = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} does not hold a state dict of tensors (top level: {keys})")
    return data


def load_backbone_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load a torchvision ImageNet ResNet state dict (``conv1.weight``, ..., ``fc.*`` ignored).

    Strict: every trunk tensor must be present with the right shape (``num_batches_tracked`` is
    optional and filled with 0 for trainable BN). Raises ``ValueError`` naming the file and the
    missing / unexpected / mis-shaped keys.
    """
    path = os.fspath(path)
    sd = read_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    expected = backbone.body.state_dict()
    new: "OrderedDict[str, Tensor]" = OrderedDict()
    missing, shape_err = [], []
    for key, ref in expected.items():
        if key not in sd:
            if key.endswith("num_batches_tracked"):
                new[key] = torch.zeros((), dtype=torch.long)
                continue
            missing.append(key)
        elif tuple(sd[key].shape) != tuple(ref.shape):
            shape_err.append(f"{key}: file {tuple(sd[key].shape)} vs model {tuple(ref.shape)}")
        else:
            new[key] = sd[key]
    # Frozen BN and GN have no num_batches_tracked; ignoring the file's counter loses nothing.
    unexpected = [k for k in sd if k not in expected and not k.endswith("num_batches_tracked")]
    if missing or unexpected or shape_err:
        hint = ""
        if backbone.norm == "gn" and any(k.endswith("running_mean") for k in unexpected):
            hint = " (BatchNorm statistics cannot be loaded into a backbone_norm='gn' model)"
        raise ValueError(
            f"backbone weights {path} do not match the {type(backbone.body).__name__} trunk{hint}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)}), "
            f"shape mismatches {shape_err[:20]} ({len(shape_err)})"
        )
    backbone.body.load_state_dict(new, strict=True)
