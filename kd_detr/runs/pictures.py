"""Pictures of detections: an image with its boxes, class names and scores (``kd-detr predict --draw``), and
the comparison gallery (``kd-detr compare``'s ``gallery.png``): a few fixed validation images, one row each,
columns ground truth | teacher | each recipe, so a user sees what distillation changed.

Boxes are drawn by ``torchvision.utils.draw_bounding_boxes`` in absolute xyxy pixels of the original image,
one colour per class (the same in every picture), above a score threshold.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from kd_detr.atomic import atomic_write

__all__ = ["class_colour", "draw_detections", "predict_items", "write_drawn", "write_gallery",
           "GALLERY_IMAGES", "DRAW_MIN_SIDE"]

GALLERY_IMAGES = 4  # validation images in the gallery: the first ones in image-id order
DRAW_MIN_SIDE = 256  # small images are scaled up (nearest) to at least this side before boxes are drawn


def class_colour(label: int) -> tuple[int, int, int]:
    """A fixed, well-separated RGB colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * int(label)) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_detections(image: Image.Image, detections: Sequence[dict[str, Any]], score_threshold: float = 0.0,
                    min_side: int = DRAW_MIN_SIDE) -> Image.Image:
    """``image`` with the boxes of ``detections`` drawn (each ``{"box": [x1,y1,x2,y2] absolute pixels,
    "label": int, "name": str (optional), "score": float (optional: ground truth has none)}``), those whose
    score is ``>= score_threshold``; scaled so its shorter side is at least ``min_side`` (boxes too)."""
    from torchvision.utils import draw_bounding_boxes

    scale = max(1.0, min_side / max(1, min(image.size)))
    if scale > 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    kept = [d for d in detections if d.get("score") is None or d["score"] >= score_threshold]
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if not kept:
        return image.convert("RGB")
    boxes = torch.tensor([d["box"] for d in kept], dtype=torch.float32).reshape(-1, 4) * scale
    w, h = image.size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    labels = [str(d.get("name", d["label"])) + (f" {d['score']:.2f}" if d.get("score") is not None else "")
              for d in kept]
    drawn = draw_bounding_boxes(pixels, boxes, labels=labels, colors=[class_colour(d["label"]) for d in kept],
                                width=2)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def write_drawn(entries: Sequence[dict[str, Any]], out_dir: str | Path, score_threshold: float) -> list[Path]:
    """``kd-detr predict --draw OUT_DIR``: each predicted image (``predict_images``'s entries) with its
    detections drawn, as ``OUT_DIR/<image stem>.png`` (written atomically; a repeated stem gets ``_<n>``)."""
    from kd_detr.data.images import read_image

    out_dir = Path(out_dir)
    written, used = [], set()
    for entry in entries:
        stem, n = Path(entry["image"]).stem, 1
        while stem in used:
            n += 1
            stem = f"{Path(entry['image']).stem}_{n}"
        used.add(stem)
        picture = draw_detections(read_image(entry["image"]), entry["detections"], score_threshold, min_side=0)
        written.append(atomic_write(out_dir / f"{stem}.png", lambda tmp, p=picture: p.save(tmp, format="PNG")))
    return written


@torch.no_grad()
def predict_items(model: torch.nn.Module, dataset: Any, indices: Sequence[int], label_map: Any, device: str,
                  top_k: int = 100) -> list[list[dict[str, Any]]]:
    """Detections of ``model`` on items ``indices`` of ``dataset`` (its eval transform, one image at a time,
    no padding), in absolute xyxy pixels of the original images; labels are class indices, named by
    ``label_map``."""
    from kd_detr.postprocess import PostProcess

    post = PostProcess(num_select=top_k)
    out = []
    for i in indices:
        image, target = dataset[i]
        mask = torch.zeros(1, image.shape[1], image.shape[2], dtype=torch.bool, device=device)
        pred = model(image[None].to(device), mask)
        det = post(pred, target["orig_size"][None].to(device))[0]
        out.append([{"box": b, "label": int(c), "name": _name(label_map, int(c)), "score": float(s)}
                    for b, c, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist())])
    return out


def ground_truth(dataset: Any, indices: Sequence[int], label_map: Any) -> list[list[dict[str, Any]]]:
    """The ground-truth boxes of items ``indices`` (absolute xyxy of the original image)."""
    out = []
    for i in indices:
        r = dataset._records[i]
        out.append([{"box": [float(v) for v in box], "label": int(c), "name": _name(label_map, int(c))}
                    for box, c in zip(r.boxes.tolist(), r.labels.tolist())])
    return out


def _name(label_map: Any, index: int) -> str:
    try:
        return label_map.name_of_index(index)
    except (KeyError, ValueError, AttributeError):
        return str(index)


def write_gallery(path: str | Path, images: Sequence[Image.Image], columns: Sequence[tuple[str, Sequence[Any]]],
                  score_threshold: float, title: Optional[str] = None) -> Path:
    """One row per image, one column per ``(title, detections per image)`` (a column whose detections are
    ``None`` for an image shows "n/a"); written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + (0.4 if title else 0)), squeeze=False)
    for r, image in enumerate(images):
        for c, (name, per_image) in enumerate(columns):
            ax = axes[r][c]
            ax.axis("off")
            dets = per_image[r]
            if dets is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(draw_detections(image, dets, score_threshold))
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    written = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return written
