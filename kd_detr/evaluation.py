"""COCO bbox evaluation with pycocotools, as the official DETR / Conditional DETR code does.

Pipeline: model outputs -> :class:`~kd_detr.postprocess.PostProcess` (top-100 over queries x
classes, absolute xyxy on the original image size) -> :func:`to_coco_results` (COCO results
format, model class index -> category id through the label map) -> :func:`evaluate_results`
(``COCOeval`` bbox, the verbatim 12-line summary, named metrics and a per-class AP table).

:func:`evaluate_model` runs a model over a loader (gathering across ranks when
``torch.distributed`` is initialised and scoring on rank 0); :func:`evaluate` additionally
writes ``results.json`` and ``metrics.json`` atomically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from .atomic import write_json_atomic
from .postprocess import PostProcess

__all__ = [
    "METRIC_NAMES",
    "EvalResult",
    "evaluate",
    "evaluate_model",
    "evaluate_results",
    "eval_ground_truth",
    "eval_loader",
    "format_per_class_table",
    "to_coco_results",
    "write_eval_outputs",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

# Names of COCOeval.stats[0..11] for bbox, in pycocotools order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class EvalResult:
    """Outcome of one COCO bbox evaluation.

    Attributes:
        stats: the 12 ``COCOeval.stats`` values (fractions in [0, 1]; -1 where pycocotools
            has no ground truth for that entry, e.g. no small objects).
        summary_text: the verbatim 12-line pycocotools summary.
        metrics: ``stats`` by name (:data:`METRIC_NAMES`).
        per_class: ``[{"category_id", "name", "AP"}]`` with AP@[.5:.95] (area all, maxDets 100)
            as a fraction; NaN for a category with no ground truth in the evaluated images.
        num_images: images evaluated.
        num_detections: detections scored.
        note: a remark on special cases (e.g. no detections), empty otherwise.
    """

    stats: list[float]
    summary_text: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    num_images: int = 0
    num_detections: int = 0
    note: str = ""

    @property
    def ap(self) -> float:
        """Headline AP@[.5:.95] (stats[0]) as a fraction."""
        return self.stats[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN per-class APs become ``None``)."""
        d = asdict(self)
        d["per_class"] = [
            {**c, "AP": None if c["AP"] is None or math.isnan(c["AP"]) else c["AP"]} for c in self.per_class
        ]
        return d


# ---------------------------------------------------------------------------- conversion
def _index_to_category(label_map: Any) -> Mapping[int, int]:
    if hasattr(label_map, "index_to_category"):
        mapping = label_map.index_to_category
    elif isinstance(label_map, Mapping):
        mapping = label_map
    else:
        raise TypeError(
            "label_map must have an `index_to_category` mapping (kd_detr.data.LabelMap) or be a "
            f"mapping model index -> category id, got {type(label_map).__name__}"
        )
    return {int(k): int(v) for k, v in mapping.items()}


def _xyxy_to_xywh_lists(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().to("cpu", torch.float64)
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).tolist()


def to_coco_results(predictions: Mapping[int, Mapping[str, torch.Tensor]], label_map: Any) -> list[dict]:
    """Convert post-processed detections to the COCO results format.

    Args:
        predictions: ``image_id -> {"scores" [k], "labels" [k], "boxes" [k, 4] absolute xyxy}``
            (as returned by :class:`~kd_detr.postprocess.PostProcess`).
        label_map: object with ``index_to_category: dict[int, int]`` (model class index ->
            COCO category id), or such a mapping itself.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``. Detections whose label
        has no category (e.g. the unused slots of the 91-way COCO head) are dropped: COCOeval
        would ignore them anyway, since it only scores the ground-truth categories.
    """
    idx2cat = _index_to_category(label_map)
    results: list[dict] = []
    for image_id, pred in predictions.items():
        labels = pred["labels"].tolist()
        if not labels:
            continue
        scores = pred["scores"].detach().float().tolist()
        boxes = _xyxy_to_xywh_lists(pred["boxes"])
        image_id = int(image_id)
        for label, score, box in zip(labels, scores, boxes):
            cat = idx2cat.get(int(label))
            if cat is None:
                continue
            results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
    return results


# ---------------------------------------------------------------------------- scoring
def _empty_detections(coco_gt: COCO) -> COCO:
    """A detections COCO with no annotations (pycocotools' ``loadRes([])`` raises IndexError)."""
    dt = COCO()
    dt.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


# Ground truths renumbered for COCOeval, by the caller's COCO object: renumbered (and logged) once per object,
# not at every evaluation of a training run.
_RENUMBERED: "weakref.WeakKeyDictionary[COCO, COCO]" = weakref.WeakKeyDictionary()


def _positive_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1


def eval_ground_truth(coco_gt: COCO) -> COCO:
    """The ground truth COCOeval scores against: ``coco_gt`` itself, or, when an annotation id is not a
    positive integer (many converters number from 0), a copy whose annotation ids are 1..N in file order.

    Why: ``COCOeval.evaluateImg`` records a match as the matched ground truth's id in ``dtm`` and
    ``accumulate`` counts a detection as a true positive where ``dtm`` is non-zero, so the ground truth with
    id 0 can never be matched: AP and AR drop with no error. Image and category id 0 are fine. ``coco_gt``
    and the user's file are left untouched; one warning names the file (``kd_detr_ann_file``, set by
    :class:`~kd_detr.data.CocoDetection`) the first time a given ``coco_gt`` is renumbered.
    """
    cached = _RENUMBERED.get(coco_gt)
    if cached is not None:
        return cached
    anns = coco_gt.dataset.get("annotations", [])
    bad = [a.get("id") for a in anns if not _positive_int(a.get("id"))]
    if not bad:
        return coco_gt
    data = dict(coco_gt.dataset)
    data["annotations"] = [{**a, "id": i} for i, a in enumerate(anns, start=1)]
    renumbered = COCO()
    renumbered.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        renumbered.createIndex()
    _RENUMBERED[coco_gt] = renumbered
    where = getattr(coco_gt, "kd_detr_ann_file", None) or "the ground truth"
    logger.warning("COCO evaluation: %d annotation id(s) of %s are not positive integers (first: %r), and "
                   "pycocotools never matches a ground truth with id 0 (AP and AR would drop): scoring with the "
                   "annotation ids renumbered 1..%d in file order (the file is unchanged)",
                   len(bad), where, bad[0], len(anns))
    return renumbered


def _per_class_ap(coco_eval: COCOeval, coco_gt: COCO) -> list[dict[str, Any]]:
    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M maxDets];
    # area "all" is index 0 and maxDets 100 the last index (detectron2 / mmdet convention).
    precision = coco_eval.eval["precision"]
    cats = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt.loadCats(coco_eval.params.catIds)}
    out = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        ap = float(np.mean(p)) if p.size else float("nan")
        out.append({"category_id": int(cat_id), "name": cats.get(cat_id, str(cat_id)), "AP": ap})
    return out


def evaluate_results(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], image_ids: Iterable[int] | None = None
) -> EvalResult:
    """Score COCO-format detections with pycocotools ``COCOeval`` (bbox).

    Args:
        coco_gt: ground truth.
        results: COCO results (:func:`to_coco_results`); not modified.
        image_ids: images to evaluate (default: every image of ``coco_gt``). Restrict it to the
            images that were actually run, as the official evaluator does, when evaluating a subset.

    Annotation ids that are not positive integers (e.g. numbered from 0) are renumbered for the
    evaluation: see :func:`eval_ground_truth`.

    Returns:
        :class:`EvalResult`. With no detections, pycocotools is run on an empty detection set
        (AP/AR are 0, or -1 where there is no ground truth) and ``note`` says so.

    Raises:
        ValueError: no image to evaluate, or a result refers to an image absent from ``coco_gt``.
    """
    coco_gt = eval_ground_truth(coco_gt)
    gt_ids = set(coco_gt.getImgIds())
    ids = sorted(gt_ids) if image_ids is None else sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("no image to evaluate")
    unknown = sorted(set(ids) - gt_ids)
    if unknown:
        raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}")
    res_ids = {int(r["image_id"]) for r in results}
    unknown = sorted(res_ids - gt_ids)
    if unknown:
        raise ValueError(f"results refer to images absent from the ground truth: {unknown[:10]}")

    note = ""
    # loadRes() writes area/id/iscrowd into each result dict: give it copies.
    dets = [dict(r) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            coco_dt = _empty_detections(coco_gt)
            note = "no detections: AP/AR are 0 (-1 where there is no ground truth)"
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_eval.summarize()
    stats = [float(x) for x in coco_eval.stats]
    if note:
        logger.warning("COCO evaluation: %s", note)
    id_set = set(ids)
    n_scored = sum(1 for r in results if int(r["image_id"]) in id_set)
    return EvalResult(
        stats=stats,
        summary_text=buf.getvalue().rstrip("\n"),
        metrics=dict(zip(METRIC_NAMES, stats)),
        per_class=_per_class_ap(coco_eval, coco_gt),
        num_images=len(ids),
        num_detections=n_scored,
        note=note,
    )


def format_per_class_table(per_class: Sequence[Mapping[str, Any]], num_columns: int = 3) -> str:
    """Per-class AP as a pipe table (detectron2 style), AP in percent with 3 decimals.

    Args:
        per_class: ``[{"category_id", "name", "AP"}]`` from :class:`EvalResult` (AP a fraction,
            NaN / None where undefined).
        num_columns: (category, AP) pairs per row.
    """
    if num_columns < 1:
        raise ValueError("num_columns must be >= 1")
    cells = []
    for c in per_class:
        ap = c.get("AP")
        txt = "nan" if ap is None or (isinstance(ap, float) and math.isnan(ap)) else f"{100 * ap:.3f}"
        cells.append((str(c.get("name", c.get("category_id"))), txt))
    if not cells:
        return "(no categories)"
    ncol = min(num_columns, len(cells))
    rows = [cells[i : i + ncol] for i in range(0, len(cells), ncol)]
    rows[-1] = rows[-1] + [("", "")] * (ncol - len(rows[-1]))
    name_w = max(len("category"), *(len(n) for n, _ in cells))
    ap_w = max(len("AP"), *(len(a) for _, a in cells))
    header = "| " + " | ".join(f"{'category':<{name_w}} | {'AP':<{ap_w}}" for _ in range(ncol)) + " |"
    sep = "|" + "|".join(f":{'-' * (name_w + 1)}|:{'-' * (ap_w + 1)}" for _ in range(ncol)) + "|"
    body = ["| " + " | ".join(f"{n:<{name_w}} | {a:<{ap_w}}" for n, a in row) + " |" for row in rows]
    return "\n".join([header, sep, *body])


# ---------------------------------------------------------------------------- files
def write_eval_outputs(
    output_dir: str | os.PathLike, result: EvalResult, results: Sequence[Mapping[str, Any]], prefix: str = ""
) -> tuple[Path, Path]:
    """Write ``{prefix}results.json`` (COCO results) and ``{prefix}metrics.json`` into ``output_dir``."""
    out = Path(output_dir)
    res_path = write_json_atomic(out / f"{prefix}results.json", list(results))
    met_path = write_json_atomic(out / f"{prefix}metrics.json", result.to_dict(), indent=2)
    return res_path, met_path


# ---------------------------------------------------------------------------- model loop
def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_ready() else 0


@torch.no_grad()
def eval_loader(dataset, batch_size: int = 2, max_images: int | None = None, num_workers: int = 0,
                distributed: tuple[int, int] | None = None, generator: torch.Generator | None = None):
    """The evaluation loader (one builder for training, teacher checks, compare and ``kd-detr eval``): images
    in data-set order, ``batch_size`` per batch (padding changes DETR AP: keep it fixed and logged), the first
    ``max_images`` only if given; ``distributed = (rank, world_size)`` shards it across ranks."""
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    from kd_detr.data import collate_fn

    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    sampler = None
    if distributed is not None:
        rank, world = distributed
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_fn, generator=generator)


def evaluate_model(
    model: nn.Module,
    data_loader: Iterable,
    coco_gt: COCO,
    label_map: Any,
    device: torch.device | str,
    postprocess: nn.Module | None = None,
    progress: bool = True,
) -> tuple[EvalResult | None, list[dict]]:
    """Run ``model`` over ``data_loader`` and score its detections with COCOeval.

    Args:
        model: called as ``model(images, mask)``; returns ``pred_logits [B, Q, C]`` and
            ``pred_boxes [B, Q, 4]``. Put in eval mode for the loop, its mode restored after.
        data_loader: yields ``(images [B, 3, H, W], mask [B, H, W], targets)``; each target has
            ``image_id`` and ``orig_size`` ``(h, w)``.
        coco_gt: ground truth of the images in the loader.
        label_map: model class index -> category id (see :func:`to_coco_results`).
        device: device to run the model on.
        postprocess: default ``PostProcess(num_select=100)`` (official).
        progress: show a tqdm bar on rank 0.

    Returns:
        ``(result, results)``. Under ``torch.distributed`` the detections of all ranks are
        gathered (``all_gather_object``; images duplicated by a padding sampler are kept once),
        scored on rank 0, and the :class:`EvalResult` is broadcast to every rank; ``results``
        (the COCO results list) is filled on rank 0 and empty on other ranks. Only the images
        seen by the loader are evaluated.
    """
    postprocess = postprocess if postprocess is not None else PostProcess(100)
    was_training = model.training
    model.eval()
    is_main = _rank() == 0
    idx2cat = _index_to_category(label_map)  # validate and normalise once, not per image
    per_image: dict[int, list[dict]] = {}
    iterator = data_loader
    bar = None
    from .progress import in_ray_worker

    if progress and is_main and not in_ray_worker():  # inside a compare run only its training bar shows
        from tqdm.auto import tqdm

        iterator = bar = tqdm(data_loader, desc="eval", dynamic_ncols=True)
    try:
        for images, mask, targets in iterator:
            images = images.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            outputs = model(images, mask)
            sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
            dets = postprocess(outputs, sizes)
            for t, d in zip(targets, dets):
                image_id = int(t["image_id"])
                per_image[image_id] = to_coco_results({image_id: d}, idx2cat)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
            # tqdm writes the bar's final newline without flushing: flush it so that the
            # summary printed next does not land on the bar's line (buffered stderr, logs).
            with contextlib.suppress(Exception):
                bar.fp.flush()

    if _dist_ready():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_image)
    else:
        gathered = [per_image]

    result: EvalResult | None = None
    results: list[dict] = []
    if is_main:
        merged: dict[int, list[dict]] = {}
        for part in gathered:
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)  # first copy wins: sampler padding repeats images
        for image_id in sorted(merged):
            results.extend(merged[image_id])
        result = evaluate_results(coco_gt, results, image_ids=merged.keys())
    if _dist_ready():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result, results


def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    coco_gt: COCO,
    label_map: Any,
    device: torch.device | str,
    output_dir: str | os.PathLike | None = None,
    postprocess: nn.Module | None = None,
    progress: bool = True,
    prefix: str = "",
) -> EvalResult:
    """:func:`evaluate_model`, then on rank 0 log the summary and, with ``output_dir``, write
    ``{prefix}results.json`` and ``{prefix}metrics.json`` there (atomically)."""
    result, results = evaluate_model(model, data_loader, coco_gt, label_map, device, postprocess, progress)
    if _rank() == 0:
        logger.info("COCO bbox evaluation (%d images):\n%s", result.num_images, result.summary_text)
        if output_dir is not None:
            write_eval_outputs(output_dir, result, results, prefix)
    return result
