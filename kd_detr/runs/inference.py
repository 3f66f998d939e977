"""Loading a trained detector for evaluation or prediction (``kd-detr eval`` / ``kd-detr predict``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kd_detr import data as kd_data
from kd_detr.data.coco import read_image
from kd_detr.data.label_map import LabelMap
from kd_detr.evaluation import EvalResult, eval_loader, evaluate_model, write_eval_outputs
from kd_detr.postprocess import PostProcess

log = logging.getLogger("kd_detr.inference")


def load_detector(checkpoint: str | Path, model_name: str | None = None, num_classes: int | None = None,
                  device: str = "cpu") -> tuple[torch.nn.Module, LabelMap | None, dict[str, Any]]:
    """Load a detector from our ``.safetensors`` (architecture and label map from its metadata) or
    from an official Conditional DETR ``.pth`` (``model_name`` required; 91 COCO-id slots by default).

    Returns ``(model in eval mode on device, label map or None, metadata)``. ``None`` label map means
    the class index is the category id (official checkpoints).
    """
    from kd_detr.models import build_model, load_model, model_from_official

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():  # a transformers save_pretrained folder: its id2label names the classes
        model = build_model(f"hf:{checkpoint}")  # a kd-detr export's input square comes with its config
        meta = {"model_name": model.config.name, "id2label": model.config.id2label}
        # a kd-detr export records the training image size (kd-detr export --format hf)
        hf = model.config.hf_config
        image_size = (hf.get("kd_detr_export") or {}).get("image_size")
        if image_size:
            meta["extra_metadata"] = {"image_size": int(image_size)}
        return model.to(device).eval(), None, meta
    if checkpoint.suffix == ".safetensors":
        model, meta = load_model(checkpoint)
        saved_name = meta.get("model_name")
        if model_name is not None and saved_name is not None and model_name != saved_name:
            raise ValueError(f"--model {model_name} does not match {checkpoint}, which holds a {saved_name}")
        if num_classes is not None and num_classes != model.config.num_classes:
            raise ValueError(f"--num-classes {num_classes} does not match {checkpoint} "
                             f"({model.config.num_classes} classes)")
        label_map = LabelMap.from_dict(meta["label_map"]) if meta.get("label_map") else None
    else:
        if model_name is None:
            raise ValueError(f"{checkpoint} is not a kd-detr .safetensors file: give --model NAME for an "
                             "official .pth checkpoint")
        model = model_from_official(checkpoint, model_name, num_classes)
        meta, label_map = {"model_name": model_name}, None
    return model.to(device).eval(), label_map, meta


def evaluate_checkpoint(checkpoint: str | Path, *, model_name: str | None = None, num_classes: int | None = None,
                        data: str | None = None, ann: str | None = None, images: str | None = None,
                        split: str = "val", image_size: int | None = None,
                        num_workers: int = 2, batch_size: int = 2, max_images: int | None = None,
                        output_dir: str | None = None, device: str = "auto",
                        skip_bad_labels: bool = False) -> tuple[EvalResult, Path]:
    """Evaluate a checkpoint on a COCO split; writes ``results.json`` and ``metrics.json``.

    The label map is the checkpoint's; official checkpoints index classes by COCO category id.
    ``image_size`` defaults to the preset the checkpoint was trained with (official sizes if none).
    """
    from kd_detr.engine.trainer import resolve_device

    device = resolve_device(device)
    model, label_map, meta = load_detector(checkpoint, model_name, num_classes, device)
    if image_size is None:
        image_size = meta.get("extra_metadata", {}).get("image_size")
    if not (ann and images):
        if data is None:
            raise ValueError(f"no {split} data: give --data DIR (a COCO tree or a YOLO data set) or --{split}-ann "
                             f"and --{split}-images")
        a, i = kd_data.DataSpec(data, skip_bad_labels=skip_bad_labels).files(split)  # a YOLO split or a JSON path
        ann, images = (ann or a), str(images or i)
    if label_map is None and meta.get("id2label") is not None:
        # transformers folder: its classes mapped onto the data's categories by name
        import dataclasses

        from kd_detr.data.annotations import load_annotations
        from kd_detr.models.hf.labels import class_map_by_name

        label_map = LabelMap.contiguous(load_annotations(ann)["categories"])
        model.config = dataclasses.replace(
            model.config, class_map=class_map_by_name(meta["id2label"], label_map, f"{checkpoint}"))
    if label_map is None:  # official checkpoint: class index == COCO category id
        from kd_detr.data.annotations import load_annotations
        label_map = LabelMap.raw_ids(load_annotations(ann)["categories"], num_classes=model.config.num_classes)
    dataset = kd_data.CocoDetection(images, ann, transforms=kd_data.make_policy(False, image_size),
                                    label_map=label_map, check_files=True)
    if label_map.num_classes != model.config.num_classes:
        raise ValueError(f"the label map has {label_map.num_classes} classes but the model has "
                         f"{model.config.num_classes}")
    loader = eval_loader(dataset, batch_size, max_images=max_images, num_workers=num_workers)
    result, results = evaluate_model(model, loader, dataset.coco, label_map, device)
    out_dir = Path(output_dir) if output_dir else Path(checkpoint).parent / f"eval_{Path(checkpoint).stem}_{split}"
    write_eval_outputs(out_dir, result, results)
    return result, out_dir


@torch.no_grad()
def predict_images(checkpoint: str | Path, image_paths: list[str], *, model_name: str | None = None,
                   num_classes: int | None = None, resize: bool = True, image_size: int | None = None,
                   top_k: int = 100, device: str = "auto") -> list[dict[str, Any]]:
    """Detect objects; one entry per image: ``{image, width, height, detections: [{score, label, name,
    query, box [x1,y1,x2,y2]}]}`` with boxes in absolute pixels of the original image (not clipped),
    ``label`` the COCO category id and ``query`` the decoder query the detection came from."""
    from kd_detr.engine.trainer import resolve_device

    device = resolve_device(device)
    model, label_map, meta = load_detector(checkpoint, model_name, num_classes, device)
    if image_size is None:
        image_size = meta.get("extra_metadata", {}).get("image_size")
    if label_map is None and meta.get("id2label") is not None:  # transformers folder: its own names
        id2label = meta["id2label"]
        label_map = LabelMap(num_classes=model.config.num_classes, index_to_category={i: i for i in id2label},
                             names={i: n for i, n in id2label.items()}, scheme="custom")
    if label_map is None:  # official checkpoint: slot i is COCO category id i
        n = model.config.num_classes
        label_map = LabelMap.raw_ids([c for c in kd_data.COCO_CATEGORIES if c["id"] < n], num_classes=n)
    policy = kd_data.make_policy(False, image_size)
    post = PostProcess(num_select=top_k)
    entries = []
    for path in image_paths:
        image = read_image(path)  # 8-bit RGB (16-bit files scaled), one-line errors naming the file
        w, h = image.size
        view = policy.sample(None, (h, w)) if resize else kd_data.View(source_size=(h, w))
        x, _ = kd_data.apply_view(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
                                  view)
        mask = torch.zeros(1, x.shape[1], x.shape[2], dtype=torch.bool)
        out = model(x[None].to(device), mask.to(device))
        det = post(out, torch.tensor([[h, w]], device=device))[0]
        detections = []
        for score, label, box, query in zip(det["scores"].tolist(), det["labels"].tolist(),
                                            det["boxes"].tolist(), det["query"].tolist()):
            # a slot with no category (e.g. unused COCO ids) keeps its index as the label
            cat = label_map.index_to_category.get(label, label)
            entry = {"score": score, "label": cat, "query": query, "box": box}
            if cat in label_map.names:
                entry["name"] = label_map.names[cat]
            detections.append(entry)
        entries.append({"image": str(path), "width": w, "height": h, "detections": detections})
    return entries
