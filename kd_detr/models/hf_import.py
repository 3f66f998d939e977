"""Import Hugging Face ``ConditionalDetrForObjectDetection`` weights (e.g. ``microsoft/conditional-detr-resnet-50``).

HF's port renames the official modules (``model.`` prefix, ``encoder_attn`` for ``cross_attn``,
``fc1``/``fc2``, split encoder q/k/v projections, timm backbone names, which equal torchvision's, or
transformers' own ``ResNetBackbone`` names, which :mod:`kd_detr.models.hf_export` writes).
:func:`hf_to_official` maps them back to the official names, so the strict official loader checks
them like any official checkpoint.
"""

from __future__ import annotations

import os
import re

import torch

from .backbone import read_state_dict_file

__all__ = ["hf_key_to_official", "hf_to_official", "read_hf_checkpoint"]

ENC = r"^model\.encoder\.layers\.(\d+)\."
DEC = r"^model\.decoder\.layers\.(\d+)\."
HF_RESNET = r"^model\.backbone\.(?:conv_encoder\.)?model\."


def _resnet_block(m: re.Match) -> str:
    """transformers ``ResNetBackbone`` block names -> torchvision's: stage s -> ``layer{s+1}``, ``layer.k`` ->
    ``conv{k+1}`` / ``bn{k+1}``, ``shortcut`` -> ``downsample.0`` / ``downsample.1``."""
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    sub = re.match(r"layer\.(\d+)\.(convolution|normalization)\.$", rest)
    if sub:
        kind = "conv" if sub.group(2) == "convolution" else "bn"
        rest = f"{kind}{int(sub.group(1)) + 1}."
    else:
        rest = "downsample.0." if rest == "shortcut.convolution." else "downsample.1."
    return f"backbone.0.body.layer{stage + 1}.{block}.{rest}"

# (regex on the HF key, official replacement); first match wins. Covers transformers v4 and v5 names.
_RULES = [
    # transformers' ResNetBackbone (use_timm_backbone=False)
    (HF_RESNET + r"embedder\.embedder\.convolution\.", "backbone.0.body.conv1."),
    (HF_RESNET + r"embedder\.embedder\.normalization\.", "backbone.0.body.bn1."),
    (HF_RESNET + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
     r"(layer\.\d+\.(?:convolution|normalization)\.|shortcut\.(?:convolution|normalization)\.)", _resnet_block),
    # timm ResNet: torchvision's names
    (r"^model\.backbone\.(conv_encoder\.)?model\.", "backbone.0.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (ENC + r"self_attn\.(o_proj|out_proj)\.", r"transformer.encoder.layers.\1.self_attn.out_proj."),
    (ENC + r"(mlp\.)?fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (ENC + r"(mlp\.)?fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (ENC + r"self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (ENC + r"final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    # transformers v5: projections live inside the attention modules
    (DEC + r"self_attn\.q_content_proj\.", r"transformer.decoder.layers.\1.sa_qcontent_proj."),
    (DEC + r"self_attn\.q_pos_proj\.", r"transformer.decoder.layers.\1.sa_qpos_proj."),
    (DEC + r"self_attn\.k_content_proj\.", r"transformer.decoder.layers.\1.sa_kcontent_proj."),
    (DEC + r"self_attn\.k_pos_proj\.", r"transformer.decoder.layers.\1.sa_kpos_proj."),
    (DEC + r"self_attn\.v_proj\.", r"transformer.decoder.layers.\1.sa_v_proj."),
    (DEC + r"self_attn\.(o_proj|out_proj)\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (DEC + r"encoder_attn\.q_content_proj\.", r"transformer.decoder.layers.\1.ca_qcontent_proj."),
    (DEC + r"encoder_attn\.q_pos_proj\.", r"transformer.decoder.layers.\1.ca_qpos_proj."),
    (DEC + r"encoder_attn\.k_content_proj\.", r"transformer.decoder.layers.\1.ca_kcontent_proj."),
    (DEC + r"encoder_attn\.k_pos_proj\.", r"transformer.decoder.layers.\1.ca_kpos_proj."),
    (DEC + r"encoder_attn\.v_proj\.", r"transformer.decoder.layers.\1.ca_v_proj."),
    (DEC + r"encoder_attn\.q_pos_sine_proj\.", r"transformer.decoder.layers.\1.ca_qpos_sine_proj."),
    (DEC + r"encoder_attn\.(o_proj|out_proj)\.", r"transformer.decoder.layers.\1.cross_attn.out_proj."),
    # transformers v4: sa_*/ca_* directly on the layer, same names as official
    (DEC + r"((sa|ca)_\w+)\.", r"transformer.decoder.layers.\1.\2."),
    (DEC + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (DEC + r"encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (DEC + r"final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (DEC + r"(mlp\.)?fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (DEC + r"(mlp\.)?fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.(query_scale|ref_point_head)\.", r"transformer.decoder.\1."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]


def hf_key_to_official(key: str) -> str | None:
    """The official name of one HF key, or None when no rule maps it. The encoder's split
    ``self_attn.{q,k,v}_proj`` keys are parts of one official ``in_proj`` and are handled by :func:`hf_to_official`."""
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def hf_to_official(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an HF ``ConditionalDetrForObjectDetection`` state dict (transformers v4 or v5 names, timm
    ResNet backbone) to the official Conditional DETR names. Keys it cannot map are an error that lists
    them, so a foreign file never loads half-way."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_sd.items():
        m = re.match(ENC + r"self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:  # HF splits the encoder in_proj into q/k/v (rows 0..d-1 / d..2d-1 / 2d..3d-1)
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = hf_key_to_official(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (f" ... ({len(unmapped)} in all)" if len(unmapped) > 10 else "")
        raise ValueError(f"not a Hugging Face Conditional DETR state dict: unmapped keys {shown}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"encoder layer {layer}: incomplete q/k/v {kind} projections ({sorted(parts)})")
        out[f"transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def read_hf_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an HF weights file (``model.safetensors`` or ``pytorch_model.bin``) and map it to official names.
    Errors name the file, once (the reader's own already do)."""
    sd = read_state_dict_file(path)
    try:
        return hf_to_official(sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
