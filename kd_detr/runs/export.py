"""``kd-detr export``: the trained student alone, as kd-detr safetensors and as an official ``.pth``.

Distillation checkpoints already hold only the student (the teacher, its queries and any projection
are kept outside the model); export re-writes it in both formats and checks that the ``.pth`` loads
strictly into a plain ``cond_detr_*`` model and reproduces the student's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd_detr.models import build_model, load_model, load_official_state_dict, save_model
from kd_detr.models.checkpoint import read_official_checkpoint, save_official_checkpoint

__all__ = ["export_student", "find_student_weights"]


def find_student_weights(source: str | Path) -> Path:
    """A run folder (``model_final``, else ``model_best``, else the latest checkpoint) or a ``.safetensors``."""
    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: export reads kd-detr .safetensors model files or run folders")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such run folder or model file")
    for name in ("model_final.safetensors", "model_best.safetensors"):
        if (p / name).exists():
            return p / name
    latest = p / "checkpoints" / "latest.json"
    if latest.exists():
        return latest.parent / json.loads(latest.read_text())["weights"]
    raise FileNotFoundError(f"{p} holds no model_final.safetensors, model_best.safetensors or checkpoints/latest.json")


def export_student(source: str | Path, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<out_prefix>.safetensors`` and ``<out_prefix>.pth`` (official ``{"model": state_dict}``).

    Returns both paths. Raises if the official file does not load strictly into a freshly built
    model of the same architecture or gives different outputs.
    """
    weights = find_student_weights(source)
    model, meta = load_model(weights)
    out_prefix = Path(out_prefix)
    st_path = out_prefix.with_name(out_prefix.name + ".safetensors")
    pth_path = out_prefix.with_name(out_prefix.name + ".pth")
    st_path.parent.mkdir(parents=True, exist_ok=True)
    extra = dict(meta.get("extra_metadata") or {})
    extra["exported_from"] = str(weights)
    save_model(model, st_path, label_map=meta.get("label_map"), extra_metadata=extra)
    save_official_checkpoint(model, pth_path)

    # Self-check: the official file is the plain architecture (nothing training-only in it).
    plain = build_model(model.config.name, num_classes=model.config.num_classes,
                        **_overrides_from(model.config))
    load_official_state_dict(plain, read_official_checkpoint(pth_path), source=str(pth_path))
    model.eval()
    plain.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), plain(x)
    if not (torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])):
        raise RuntimeError(f"{pth_path}: the re-loaded student does not reproduce the exported weights' outputs")
    return st_path, pth_path


def _overrides_from(config) -> dict:
    """Config fields that differ from the registered architecture (e.g. ``--model-opt`` variants)."""
    from kd_detr.models import get_config

    base = get_config(config.name).to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ("name", "description", "num_classes") and base.get(k) != v}
