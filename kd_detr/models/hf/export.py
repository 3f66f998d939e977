"""A trained transformers-family student back to a ``save_pretrained`` folder that
``AutoModelForObjectDetection.from_pretrained`` loads with the same outputs (checked before the folder
is put in place)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .adapter import HFDetector

__all__ = ["export_hf_family"]


def export_hf_family(model: HFDetector, out_dir: str | Path, label_map: Optional[Mapping[str, Any]] = None,
                     extra: Optional[Mapping[str, Any]] = None, tol: float = 1e-5, check_size: int = 128) -> Path:
    """Write ``out_dir`` (config.json + model.safetensors) for ``model``'s transformers model.

    ``id2label`` comes from ``label_map`` (a ``LabelMap.to_dict()``: the data's category names). Built in a
    temporary folder beside ``out_dir``, reloaded there with ``AutoModelForObjectDetection`` (no missing,
    unexpected or mismatched keys) and compared with ``model`` on a padded batch of two ``check_size`` square
    images (``tol``; the training image size: two-stage families need as many encoder tokens as queries), then
    renamed onto ``out_dir`` (only an earlier export or an empty folder is replaced)."""
    from transformers import AutoModelForObjectDetection

    from kd_detr.models.hf_export import id2label, write_checked_folder

    if model.config.class_map is not None:
        raise ValueError(f"{model.config.name}: a teacher with its classes mapped onto a dataset is not a student "
                         "to export; export the folder it came from as it is")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not an earlier export; remove it or pick another --out")
    hf = copy.deepcopy(model.hf).cpu().eval()
    names = id2label(label_map, model.config.num_classes)
    hf.config.id2label = dict(names)
    hf.config.label2id = {v: k for k, v in names.items()}
    if model.input_size is not None:
        # the square the student was trained at (transformers' own default is the family's 640): kd-detr
        # reads it back from config.json, so that the folder predicts as the student does
        hf.config.kd_detr_input_size = int(model.input_size)
    if label_map:
        hf.config.kd_detr_label_map = dict(label_map)
    if extra:
        hf.config.kd_detr_export = dict(extra)
    return write_checked_folder(hf, out_dir, AutoModelForObjectDetection,
                                lambda reloaded: _compare(model, reloaded, tol, out_dir, check_size))


@torch.no_grad()
def _compare(model: HFDetector, reloaded: Any, tol: float, where: Path, size: int) -> None:
    from kd_detr.models.hf_export import ExportMismatch

    model = model.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g)
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    mask[1, :, size * 3 // 4:] = True
    device = next(model.parameters()).device
    pixel_values, pixel_mask = model.pixels(images.to(device), mask.to(device))
    ref = model.hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    got = reloaded(pixel_values=pixel_values.cpu(), pixel_mask=None if pixel_mask is None else pixel_mask.cpu())
    for key in ("logits", "pred_boxes"):
        diff = (getattr(got, key) - getattr(ref, key).cpu()).abs().max().item()
        if diff > tol:
            raise ExportMismatch(f"{where}: the reloaded export's {key} differ from the student's by {diff:.2e}")
