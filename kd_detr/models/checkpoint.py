"""Checkpoint I/O: official Conditional DETR state dicts and our safetensors model files.

Official names
    Our module tree equals the official one except for one documented prefix rename,
    ``backbone.0.body.`` (official, a ``Joiner`` sequential) <-> ``backbone.body.`` (ours). Official
    files hold frozen-BN buffers without ``num_batches_tracked``; for a trainable-BN model the counter
    is filled with 0, a GroupNorm model cannot take BatchNorm statistics and is refused.

Our model files (``.safetensors``)
    Tensors under our own state-dict names plus string metadata: ``format``, ``format_version``,
    ``model_name``, ``config`` (JSON of :class:`ModelConfig`), ``num_classes``, ``label_map`` (JSON),
    ``extra_metadata`` (JSON), ``tied`` (JSON) and ``kd_detr_version``. Written atomically (temporary file
    in the same directory, then ``os.replace``).

    Tied weights (format 2): several state-dict names of one tensor (transformers families tie their
    prediction heads to the decoder's: D-FINE, DEIMv2, RT-DETRv2, DAB-DETR, Deformable DETR) are stored
    once, under the first name in state-dict order; ``tied`` maps each other name to it. Loading fills the
    other names from it, and the freshly built model keeps its own ties (``load_state_dict`` copies into
    its parameters), so the loaded model has the same shared parameters as a built one. A file with no tied
    names is written as format 1 (older kd-detr reads it); format 1 files are read as before.
"""

from __future__ import annotations

import dataclasses

import json
import os
from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors import torch as st
from torch import Tensor

from ..atomic import atomic_write
from .backbone import read_state_dict_file
from .conditional_detr import ConditionalDETR
from .hf.config import HFModelConfig
from .registry import build_model, config_from_dict

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OFFICIAL_PREFIX_RENAMES",
    "to_official_key",
    "from_official_key",
    "read_official_checkpoint",
    "load_official_state_dict",
    "official_state_dict",
    "save_official_checkpoint",
    "model_from_official",
    "save_model",
    "load_model",
    "tied_names",
    "convert_official",
]

FORMAT_NAME = "kd_detr.conditional_detr"
# 2: tied tensors stored once, the other names in the ``tied`` metadata; 1: every name stored (no ties;
# still written for models without tied tensors)
FORMAT_VERSION = 2
# (official prefix, our prefix)
OFFICIAL_PREFIX_RENAMES: tuple[tuple[str, str], ...] = (("backbone.0.body.", "backbone.body."),)


def to_official_key(key: str) -> str:
    """Our state-dict key -> official key."""
    for official, ours in OFFICIAL_PREFIX_RENAMES:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def from_official_key(key: str) -> str:
    """Official state-dict key -> our key."""
    for official, ours in OFFICIAL_PREFIX_RENAMES:
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def _fmt_list(items: list[str], limit: int = 40) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an official ``.pth`` (``{'model': state_dict, ...}`` or a bare state dict).

    Uses ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed for the ``args`` entry of
    training checkpoints). Errors name the file.
    """
    return read_state_dict_file(path)


def load_official_state_dict(model: ConditionalDETR, state_dict: Mapping[str, Any],
                             source: Optional[str] = None) -> None:
    """Load an official-format state dict into ``model``, strictly.

    Every tensor must be used, none may be missing, shapes must match; otherwise a ``ValueError``
    lists the unexpected, missing and mis-shaped keys (official names). ``{'model': sd}`` is
    accepted too. ``num_batches_tracked`` entries are optional (filled with 0 for trainable BN,
    ignored for frozen BN).
    """
    where = f" ({source})" if source else ""
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    cfg = model.config
    if cfg.backbone_norm == "gn":
        raise ValueError(
            f"cannot load official weights{where} into a backbone_norm='gn' model: official checkpoints "
            "hold BatchNorm statistics; build the model with backbone_norm='frozen_bn' or 'bn'"
        )
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected, missing, mismatched = [], [], []
    for key, value in state_dict.items():
        ours = from_official_key(key)
        if not isinstance(value, Tensor):
            unexpected.append(f"{key} (not a tensor: {type(value).__name__})")
        elif ours in own:
            mapped[ours] = value
        elif ours.endswith("num_batches_tracked") and ours[: -len("num_batches_tracked")] + "running_mean" in own:
            continue  # frozen BN keeps no counter
        else:
            unexpected.append(key)
    for key, ref in own.items():
        if key not in mapped:
            if key.endswith("num_batches_tracked"):
                mapped[key] = torch.zeros((), dtype=torch.long)
            else:
                missing.append(to_official_key(key))
        elif tuple(mapped[key].shape) != tuple(ref.shape):
            mismatched.append(f"{to_official_key(key)}: checkpoint {tuple(mapped[key].shape)} "
                              f"vs model {tuple(ref.shape)}")
    if unexpected or missing or mismatched:
        hint = ""
        if "class_embed.bias" in mapped and mapped["class_embed.bias"].shape != own["class_embed.bias"].shape:
            hint = (f"; hint: the checkpoint has {mapped['class_embed.bias'].shape[0]} classes, "
                    f"the model {own['class_embed.bias'].shape[0]} (pass num_classes=...)")
        raise ValueError(
            f"official state dict{where} does not match model {cfg.name!r} "
            f"({cfg.backbone}, dilation={cfg.dilation}, d_model={cfg.d_model}, "
            f"{cfg.enc_layers}+{cfg.dec_layers} layers): "
            f"unexpected keys {_fmt_list(unexpected)} ({len(unexpected)}); "
            f"missing keys {_fmt_list(missing)} ({len(missing)}); "
            f"shape mismatches {_fmt_list(mismatched)} ({len(mismatched)}){hint}"
        )
    model.load_state_dict(mapped, strict=True)


def official_state_dict(model: ConditionalDETR) -> "OrderedDict[str, Tensor]":
    """The model's tensors under official names (no ``num_batches_tracked``).

    Loadable by the official ``ConditionalDETR`` (``model.load_state_dict(sd)``) and by
    :func:`load_official_state_dict`. Tensors share memory with the model.
    """
    if model.config.backbone_norm == "gn":
        raise ValueError("a backbone_norm='gn' model has no official equivalent (official uses BatchNorm)")
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        out[to_official_key(key)] = value
    return out


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then rename it onto ``path``; the folder must exist."""
    atomic_write(path, write, make_parents=False)


def save_official_checkpoint(model: ConditionalDETR, path: str | os.PathLike) -> None:
    """Write ``{'model': official_state_dict(model)}`` as a ``.pth`` loadable by the official code."""
    sd = OrderedDict((k, v.detach().cpu()) for k, v in official_state_dict(model).items())
    _atomic_write(os.fspath(path), lambda tmp: torch.save({"model": sd}, tmp))


SOURCE_FORMATS = ("official", "hf")


def model_from_official(pth_path: str | os.PathLike, model_name: str, num_classes: Optional[int] = None,
                        fmt: str = "official", **overrides: Any) -> ConditionalDETR:
    """Build ``model_name`` and load an official ``.pth`` into it (``num_classes`` inferred if None).

    ``fmt="hf"`` reads Hugging Face ``ConditionalDetrForObjectDetection`` weights instead (mapped to
    the official names, then loaded by the same strict loader).
    """
    pth_path = os.fspath(pth_path)
    if fmt == "official":
        sd = read_official_checkpoint(pth_path)
    elif fmt == "hf":
        from .hf_import import read_hf_checkpoint
        sd = read_hf_checkpoint(pth_path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; valid: {list(SOURCE_FORMATS)}")
    if num_classes is None:
        if "class_embed.bias" not in sd:
            raise ValueError(f"{pth_path} has no 'class_embed.bias'; is it an official Conditional DETR file?")
        num_classes = int(sd["class_embed.bias"].shape[0])
    model = build_model(model_name, num_classes=num_classes, **overrides)
    load_official_state_dict(model, sd, source=pth_path)
    return model


def _label_map_dict(label_map: Any) -> Optional[dict]:
    if label_map is None:
        return None
    if hasattr(label_map, "to_dict"):
        return label_map.to_dict()
    if isinstance(label_map, Mapping):
        return dict(label_map)
    raise TypeError(f"label_map must be a LabelMap (with to_dict()) or a dict, got {type(label_map).__name__}")


def save_model(model: ConditionalDETR, path: str | os.PathLike, label_map: Any = None,
               extra_metadata: Optional[Mapping[str, Any]] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Write ``model`` to a ``.safetensors`` file with rebuild metadata, atomically.

    ``label_map``: a ``LabelMap`` (anything with ``to_dict()``) or a JSON-serialisable dict (JSON
    turns int keys into strings). ``extra_metadata``: JSON-serialisable mapping. ``dtype``: store floating
    tensors in this dtype (e.g. ``torch.float16`` halves a shipped file; :func:`load_model` loads it back into
    a float32 model).
    """
    from kd_detr import __version__

    path = os.fspath(path)
    config = model.config
    if isinstance(config, HFModelConfig):
        # the file holds every weight: rebuilding it needs the transformers config, not the folder
        config = dataclasses.replace(config, source=None)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "model_name": config.name,
        "config": config.to_json(),
        "num_classes": str(config.num_classes),
        "label_map": json.dumps(_label_map_dict(label_map), sort_keys=True),
        "extra_metadata": json.dumps(dict(extra_metadata or {}), sort_keys=True),
        "kd_detr_version": __version__,
    }
    state = model.state_dict()
    tied = tied_names(state)
    metadata["tied"] = json.dumps(tied, sort_keys=True)
    # a file without ties stays format 1, which kd-detr versions before ties read
    metadata["format_version"] = str(FORMAT_VERSION if tied else 1)
    tensors = {}
    for k, v in state.items():
        if k in tied:
            continue
        v = v.detach().to("cpu", dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        # a view into a larger storage (or one another name shares in part) is stored as its own copy:
        # safetensors refuses tensors that share memory
        tensors[k] = v.clone() if _is_partial_view(v) else v.contiguous()
    _atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=metadata))


def _storage_key(t: Tensor) -> Optional[tuple]:
    """What identifies ``t``'s memory (``None`` for an empty tensor: no memory to share)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (t.device, storage.data_ptr())


def _is_partial_view(t: Tensor) -> bool:
    return t.numel() > 0 and t.untyped_storage().nbytes() != t.numel() * t.element_size()


def tied_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{name: first name}`` for each state-dict entry that is the same tensor as an earlier one (same
    memory, offset, shape, strides and dtype); the first name in ``state``'s order is the one stored."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        key = _storage_key(t)
        if key is None:
            continue
        view = (*key, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in first:
            tied[name] = first[view]
        else:
            first[view] = name
    return tied


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed metadata of a kd-detr model file (``ValueError`` naming the file if foreign)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                         "official .pth files are converted with convert_official()") from exc
    if raw.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a kd-detr model file (metadata format={raw.get('format')!r}, "
                         f"expected {FORMAT_NAME!r})")
    version = int(raw.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this kd-detr reads up to {FORMAT_VERSION}")
    try:
        return {
            "format": raw["format"],
            "format_version": version,
            "model_name": raw["model_name"],
            "config": json.loads(raw["config"]),
            "num_classes": int(raw["num_classes"]),
            "label_map": json.loads(raw.get("label_map", "null")),
            "extra_metadata": json.loads(raw.get("extra_metadata", "{}")),
            "kd_detr_version": raw.get("kd_detr_version"),
            "tied": _tied_metadata(raw.get("tied", "{}")),
        }
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt kd-detr metadata ({type(exc).__name__}: {exc})") from exc


def _tied_metadata(text: str) -> dict[str, str]:
    tied = json.loads(text)
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError("'tied' is not a JSON object of names")
    return tied


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[ConditionalDETR, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` and load its tensors strictly.

    Returns ``(model, metadata)``; ``metadata`` has ``model_name``, ``config`` (dict),
    ``num_classes``, ``label_map`` (dict or None), ``extra_metadata``, ``format_version``, ``tied``
    (``{name: stored name}``). Tied parameters of the built model stay tied (the same tensor).
    """
    path = os.fspath(path)
    meta = read_model_metadata(path)
    try:
        config = config_from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid model config in metadata: {exc}") from exc
    if isinstance(config, HFModelConfig):
        from .hf.adapter import HFDetector

        model = HFDetector(config, load_weights=False)  # every tensor comes from the file, not the folder
    else:
        model = ConditionalDETR(config)
    tensors = st.load_file(path, device="cpu")
    for alias, name in meta["tied"].items():
        if alias in tensors or name not in tensors:
            raise ValueError(f"{path}: corrupt 'tied' metadata: {alias!r} -> {name!r} "
                             f"({'both are stored' if alias in tensors else f'{name!r} is not stored'})")
        tensors[alias] = tensors[name]
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not match its own config: missing {_fmt_list(missing)}, "
                         f"unexpected {_fmt_list(unexpected)}, shape mismatches {_fmt_list(mismatched)}")
    # names the model ties take one value; different values in the file would leave only the last one
    differ = [f"{alias} / {name}" for alias, name in tied_names(own).items()
              if not torch.equal(tensors[alias], tensors[name])]
    if differ:
        raise ValueError(f"{path} holds different values for names the model ties to one parameter "
                         f"({_fmt_list(differ, 5)}; {len(differ)} pairs): loading would keep only one of each; "
                         "was it written by another transformers version?")
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location), meta


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (:func:`kd_detr.download.sha256_file`)."""
    from kd_detr.download import sha256_file

    return sha256_file(path)


def convert_official(pth_path: str | os.PathLike, model_name: str, num_classes: Optional[int],
                     out_path: str | os.PathLike, label_map: Any = None, fmt: str = "official",
                     **overrides: Any) -> ConditionalDETR:
    """Convert an official ``.pth`` (or HF weights, ``fmt="hf"``) into a kd-detr ``.safetensors`` file.

    ``num_classes=None`` takes it from the file (91 for the official COCO models). ``label_map`` may
    be a callable ``num_classes -> label map`` when the class count is only known from the file.
    The source file name, format and SHA-256 go into ``extra_metadata``. Returns the loaded model.
    """
    pth_path = os.fspath(pth_path)
    model = model_from_official(pth_path, model_name, num_classes, fmt=fmt, **overrides)
    if callable(label_map):
        label_map = label_map(model.config.num_classes)
    extra = {"converted_from": os.path.basename(pth_path), "source_format": fmt,
             "source_sha256": file_sha256(pth_path)}
    save_model(model, out_path, label_map=label_map, extra_metadata=extra)
    return model
