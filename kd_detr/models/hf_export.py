"""Export kd-detr's Conditional DETR as a Hugging Face ``ConditionalDetrForObjectDetection`` folder.

The reverse of :mod:`kd_detr.models.hf_import`: :func:`hf_config` builds a ``ConditionalDetrConfig`` with
transformers' own ResNet backbone (``use_timm_backbone=False``, a ``ResNetConfig`` with the same block type
and depths; transformers replaces its BatchNorm layers with frozen ones, which equal ours in eval mode),
and every HF weight name is mapped through the import rules, so ``export -> import`` is the identity.
:func:`export_hf` writes a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``) atomically
and checks that ``from_pretrained`` loads it with no missing or unexpected keys and reproduces the model's
``pred_logits`` / ``pred_boxes``.

Not expressible in transformers (refused, naming the field): ``backbone_norm='gn'``, ``dilation`` (DC5;
transformers' ResNet has no dilation), ``pe_temperature`` other than 10000.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .checkpoint import official_state_dict
from .conditional_detr import ConditionalDETR
from .config import BACKBONES, ModelConfig
from .hf_import import ENC, hf_key_to_official

__all__ = ["ExportMismatch", "HF_TOLERANCE", "check_hf_exportable", "export_hf", "hf_config", "hf_state_dict", "id2label"]

# max |kd-detr - transformers| of logits / boxes, relative to max(1, |reference|)
HF_TOLERANCE = 1e-5


class ExportMismatch(ValueError):
    """An exported file that does not reload cleanly or does not reproduce the model's outputs (one line,
    naming the file); nothing is put in place."""


def check_hf_exportable(config: ModelConfig) -> None:
    """Raise ``ValueError`` (one line, naming the field) if transformers cannot express ``config``."""
    if config.backbone_norm == "gn":
        raise ValueError("cannot export to transformers: backbone_norm='gn' (transformers' Conditional DETR "
                         "backbone uses BatchNorm)")
    if config.dilation:
        raise ValueError("cannot export to transformers: dilation=True (DC5; transformers' ResNet backbone has "
                         "no dilation)")
    if int(config.pe_temperature) != 10000:
        raise ValueError(f"cannot export to transformers: pe_temperature={config.pe_temperature} "
                         "(transformers' Conditional DETR fixes it at 10000)")
    if config.backbone not in BACKBONES:
        raise ValueError(f"cannot export to transformers: backbone={config.backbone!r}")


def id2label(label_map: Optional[Mapping[str, Any]], num_classes: int) -> dict[int, str]:
    """Model index -> class name from a kd-detr label-map dict (``LabelMap.to_dict()``); slots that carry
    no category are ``"N/A"`` (as in HF's COCO configs), and without a label map every slot is ``LABEL_i``."""
    if not label_map:
        return {i: f"LABEL_{i}" for i in range(num_classes)}
    names = {int(c["index"]): str(c.get("name", c["id"])) for c in label_map.get("categories", [])}
    return {i: names.get(i, "N/A") for i in range(num_classes)}


def hf_config(config: ModelConfig, label_map: Optional[Mapping[str, Any]] = None):
    """The ``transformers.ConditionalDetrConfig`` of a kd-detr :class:`ModelConfig` (refuses what it cannot express)."""
    from transformers import ConditionalDetrConfig, ResNetConfig

    check_hf_exportable(config)
    kind, depths = BACKBONES[config.backbone]
    widths = [64, 128, 256, 512] if kind == "basic" else [256, 512, 1024, 2048]
    backbone = ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=widths, depths=list(depths),
                            layer_type=kind, hidden_act="relu", downsample_in_first_stage=False,
                            downsample_in_bottleneck=False, out_features=["stage4"])
    labels = id2label(label_map, config.num_classes)
    return ConditionalDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
        num_channels=3, num_queries=config.num_queries, d_model=config.d_model,
        encoder_layers=config.enc_layers, decoder_layers=config.dec_layers,
        encoder_attention_heads=config.nheads, decoder_attention_heads=config.nheads,
        encoder_ffn_dim=config.dim_feedforward, decoder_ffn_dim=config.dim_feedforward,
        activation_function=config.activation, dropout=config.dropout,
        # the official layers also drop out attention weights and FFN activations at the same rate
        attention_dropout=config.dropout, activation_dropout=config.dropout,
        auxiliary_loss=False, position_embedding_type="sine", dilation=False,
        id2label=labels, label2id={name: i for i, name in labels.items()},
        architectures=["ConditionalDetrForObjectDetection"],
    )


def hf_state_dict(model: ConditionalDETR, hf_keys) -> dict[str, Tensor]:
    """The model's tensors under the HF names ``hf_keys`` (a freshly built HF model's state-dict keys).

    Each HF key is mapped to its official name by the import rules (the encoder's q/k/v projections are
    row blocks of the official ``in_proj``); every HF key must find a tensor and every official tensor
    must be used, else ``ValueError`` lists the keys."""
    import re

    own = {k: v.detach().cpu().contiguous() for k, v in official_state_dict(model).items()}
    d = model.config.d_model
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    unmapped: list[str] = []
    for key in hf_keys:
        m = re.match(ENC + r"self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            src = f"transformer.encoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}"
            i = "qkv".index(m.group(2))
            if src in own:
                out[key] = own[src][i * d:(i + 1) * d].clone()
                used.add(src)
            else:
                unmapped.append(key)
            continue
        src = hf_key_to_official(key)
        if src is None or src not in own:
            unmapped.append(key)
        else:
            out[key] = own[src]
            used.add(src)
    unused = [k for k in own if k not in used]
    if unmapped or unused:
        raise ValueError(f"kd-detr -> transformers weight mapping incomplete: HF keys without a tensor "
                         f"{unmapped[:10]} ({len(unmapped)}), kd-detr tensors not exported {unused[:10]} "
                         f"({len(unused)})")
    return out


def _check_inputs() -> tuple[Tensor, Tensor]:
    """Two 64x64 images, the second padded (kd-detr mask True = pad)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    images[1, :, 48:, :], mask[1, 48:, :] = 0, True
    images[1, :, :, 40:], mask[1, :, 40:] = 0, True
    return images, mask


def compare_with_hf(model: ConditionalDETR, hf_model, tol: float = HF_TOLERANCE) -> float:
    """Max relative difference of ``pred_logits`` / ``pred_boxes`` vs HF ``logits`` / ``pred_boxes`` on a padded
    batch (HF ``pixel_mask`` 1 = valid); raises :class:`ExportMismatch` above ``tol``."""
    images, mask = _check_inputs()
    device = next(model.parameters()).device
    hf_device = next(hf_model.parameters()).device
    was_training = model.training
    model.eval()
    hf_model.eval()
    try:
        with torch.no_grad():
            ours = model(images.to(device), mask.to(device))
            ref = hf_model(pixel_values=images.to(hf_device), pixel_mask=(~mask).long().to(hf_device))
    finally:
        model.train(was_training)
    worst = 0.0
    for name, a, b in (("logits", ours["pred_logits"].cpu(), ref.logits.cpu()),
                       ("pred_boxes", ours["pred_boxes"].cpu(), ref.pred_boxes.cpu())):
        if a.shape != b.shape:
            raise ExportMismatch(f"transformers {name} has shape {tuple(b.shape)}, kd-detr {tuple(a.shape)}")
        diff = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
        worst = max(worst, diff)
        if not diff <= tol:
            raise ExportMismatch(f"transformers {name} differ from kd-detr's by {diff:.3g} (tolerance {tol:g})")
    return worst


def export_hf(model: ConditionalDETR, out_dir: str | os.PathLike, label_map: Optional[Mapping[str, Any]] = None,
              extra: Optional[Mapping[str, Any]] = None, check: bool = True) -> Path:
    """Write ``out_dir`` as a transformers ``save_pretrained`` folder of ``model`` and return it.

    Built in a temporary folder beside ``out_dir``, then renamed onto it (an earlier export there is
    replaced; any other existing folder is refused). With ``check``, the temporary folder is first loaded
    with ``ConditionalDetrForObjectDetection.from_pretrained`` (no missing / unexpected keys allowed) and
    must reproduce the model's outputs (:func:`compare_with_hf`). ``label_map`` (a ``LabelMap.to_dict()``)
    gives ``id2label`` and is kept in ``config.json`` as ``kd_detr_label_map``, with ``kd_detr_config``
    (the :class:`ModelConfig`) and ``extra``."""
    from transformers import ConditionalDetrForObjectDetection

    out_dir = Path(out_dir)
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not an earlier transformers Conditional DETR export; "
                              "remove it or pick another --out")
    cfg = hf_config(model.config, label_map)
    cfg.kd_detr_config = model.config.to_dict()
    cfg.kd_detr_label_map = dict(label_map) if label_map else None
    if extra:
        cfg.kd_detr_export = dict(extra)
    with torch.device("cpu"):
        hf = ConditionalDetrForObjectDetection(cfg).eval()
    hf.load_state_dict(hf_state_dict(model, hf.state_dict().keys()), strict=True)
    check_fn = (lambda reloaded: compare_with_hf(model, reloaded)) if check else None
    return write_checked_folder(hf, out_dir, ConditionalDetrForObjectDetection, check_fn)


def write_checked_folder(hf, out_dir: Path, loader, check=None) -> Path:
    """``hf.save_pretrained`` into a temporary folder beside ``out_dir``; with ``check``, reload it with
    ``loader.from_pretrained`` (no missing, unexpected or mismatched keys) and call ``check(reloaded)``
    (raises on a mismatch); then rename it onto ``out_dir`` (an earlier one moved aside, removed after)."""
    from transformers.utils import logging as hf_logging

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        if check is not None:
            reloaded, info = loader.from_pretrained(tmp, output_loading_info=True)
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if bad:
                raise ExportMismatch(f"{out_dir}: transformers does not load the export cleanly: {bad}")
            check(reloaded.eval())
        _honour_umask(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(folder: Path) -> None:
    """Give the files in ``folder`` the mode a plain ``open`` would (safetensors writes 0600)."""
    mode = 0o666 & ~_umask()
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def _is_replaceable(path: Path) -> bool:
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "conditional_detr"
    except (OSError, ValueError):
        return False


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing ``dst`` is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
