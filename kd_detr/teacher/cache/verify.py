"""``kd-detr cache verify`` and ``kd-detr cache info``: check a cache folder without a teacher
(:func:`verify_report`), and summarize one (:func:`cache_info`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open

from .attention_codec import StoreConfig, batch_keys
from .manifest import (IMAGES_FINGERPRINT, MANIFEST, QUERIES, CacheError, _header_mismatch, _read_manifest,
                       _view_index, sha256_file)

__all__ = ["VerifyReport", "verify_report", "verify_cache", "missing_views", "cache_info"]


@dataclass
class VerifyReport:
    """What :func:`verify_report` found: integrity ``problems`` (empty: none), completeness (``present`` of
    ``total`` image views, the first ``missing`` ``(image, view)``), and ``unchecked``: what was not checked
    and how to check it."""

    root: Path
    problems: list[str] = field(default_factory=list)
    present: int = 0
    total: int = 0
    missing: list[tuple[int, int]] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.present == self.total

    def completeness(self) -> str:
        """``complete (M views)`` or ``incomplete: N of M views present (first missing: ...); ...``."""
        if self.complete:
            return f"complete ({self.total} image views)"
        first = ", ".join(f"view {k} of image {i}" for i, k in self.missing[:3])
        return (f"incomplete: {self.present} of {self.total} image views present"
                + (f" (first missing: {first})" if first else "")
                + "; finish it: rerun `kd-detr cache` with the same options")


def _expected_views(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """``(images, views per image)`` the manifest's plan covers."""
    plan, dataset = manifest["plan"], manifest["dataset"]
    images = plan.get("num_images", dataset.get("images")) if isinstance(plan, Mapping) else None
    views = plan.get("num_views") if isinstance(plan, Mapping) else None
    return (images if isinstance(images, int) and not isinstance(images, bool) else 0,
            views if isinstance(views, int) and not isinstance(views, bool) else 0)


def missing_views(manifest: Mapping[str, Any], index: Mapping[tuple[int, int], Any],
                  views: Optional[Iterable[tuple[int, int]]] = None) -> list[tuple[int, int]]:
    """The ``(image, view)`` of ``views`` (default: every view of the plan, view 0 of every image first) that
    ``index`` (:func:`_view_index`) does not hold."""
    if views is None:
        n, k = _expected_views(manifest)
        views = ((i, v) for v in range(k) for i in range(n))
    return [(int(i), int(k)) for i, k in views if (int(i), int(k)) not in index]


def _inside_folder(path: Path, folder: Path) -> bool:
    real, base = path.resolve(), folder.resolve()
    return real != base and base in real.parents


def _teacher_sha256(path: Path) -> str:
    from ..loading import teacher_weights_sha256

    class _Spec:  # teacher_weights_sha256 reads only the checkpoint path (a file, or an hf: folder)
        checkpoint = path
    return teacher_weights_sha256(_Spec())


def verify_report(root: str | os.PathLike, *, checkpoint: Optional[str | os.PathLike] = None,
                  annotations: Optional[str | os.PathLike] = None,
                  data: Optional[str | os.PathLike] = None) -> VerifyReport:
    """Check a cache folder without a teacher (what ``kd-detr cache verify`` prints).

    Checks: the manifest parses and has this format; ``queries.safetensors`` is present and readable;
    every listed shard is present with the listed size and SHA-256, its header metadata names the same
    view, images and plan fingerprint, and it holds every tensor of every listed view; how many of the plan's
    image views are present (:attr:`VerifyReport.complete`).

    Files outside the cache folder are read only when the caller names them: ``checkpoint`` (the teacher, by
    SHA-256 against ``teacher.checkpoint_sha256``), ``annotations`` (against ``dataset.annotations_sha256``),
    or ``data``, a data folder: the manifest's annotation file is hashed when it lies inside it. The paths a
    manifest records are data, not instructions: they are never opened on their own (a manifest could name
    any file on the machine); what was not checked is listed in :attr:`VerifyReport.unchecked`.
    """
    root = Path(root)
    report = VerifyReport(root)
    try:
        manifest = _read_manifest(root)
        index = _view_index(manifest, root)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    problems = report.problems
    try:
        store = StoreConfig.from_dict(manifest["store"])
    except ValueError as e:
        problems.append(f"{root / MANIFEST}: bad store section: {e}")
        return report
    n, k = _expected_views(manifest)
    report.total = n * k
    outside = sorted((i, v) for i, v in index if not (0 <= i < n and 0 <= v < k))
    if outside:
        problems.append(f"{root / MANIFEST}: lists image views outside its plan of {n} images x {k} views "
                        f"(first: view {outside[0][1]} of image {outside[0][0]})")
    on_disk = {key: e for key, e in index.items() if (root / e["file"]).is_file()}  # a deleted shard's views are absent
    report.missing = missing_views(manifest, on_disk)
    report.present = report.total - len(report.missing)
    qpath = root / QUERIES
    if not qpath.is_file():
        problems.append(f"{qpath}: missing")
    else:
        try:
            with safe_open(str(qpath), framework="pt") as f:
                if "query_embed" not in f.keys():
                    problems.append(f"{qpath}: no query_embed tensor")
        except Exception as e:
            problems.append(f"{qpath}: unreadable ({e})")
    _check_sources(manifest, report, checkpoint, annotations, data)
    required = batch_keys(store)
    for entry in manifest["shards"]:
        path = root / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing (listed in {MANIFEST})")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{entry['file']}: {size} bytes, the manifest says {entry['bytes']}")
            continue
        sha = sha256_file(path)
        if sha != entry["sha256"]:
            problems.append(f"{entry['file']}: SHA-256 {sha} differs from the manifest's {entry['sha256']}")
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
        except Exception as e:
            problems.append(f"{entry['file']}: unreadable ({e})")
            continue
        mismatch = _header_mismatch(meta, entry, manifest)
        if mismatch:
            problems.append(f"{entry['file']}: {mismatch}")
        for i in entry["images"]:
            lacking = [k for k in required if f"i{i}.{k}" not in keys]
            if lacking:
                problems.append(f"{entry['file']}: view {entry['view']} of image {i} lacks {lacking}")
    return report


def _check_sources(manifest: Mapping[str, Any], report: VerifyReport, checkpoint, annotations, data) -> None:
    """Compare the teacher checkpoint and the annotation file the caller named with the manifest's SHA-256."""
    teacher, dataset = manifest.get("teacher") or {}, manifest.get("dataset") or {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            report.problems.append(f"{path}: the teacher checkpoint to check does not exist")
        elif teacher.get("checkpoint_sha256") and _teacher_sha256(path) != teacher["checkpoint_sha256"]:
            report.problems.append(f"{path}: not the teacher checkpoint the cache was built from (SHA-256 differs "
                                   "from the manifest's teacher.checkpoint_sha256): use that checkpoint, or "
                                   "rebuild the cache")
    else:
        report.unchecked.append(f"the teacher checkpoint (the manifest names {teacher.get('checkpoint')!r}; pass "
                                "--teacher-checkpoint to check it against its recorded SHA-256)")
    ann = Path(annotations) if annotations is not None else None
    recorded = dataset.get("annotations")
    if ann is None and data is not None and isinstance(recorded, str) and recorded:
        if _inside_folder(Path(recorded), Path(data)):
            ann = Path(recorded)
        else:
            report.unchecked.append(f"the annotation file: the manifest names {recorded!r}, outside --data "
                                    f"{data} (pass --train-ann to check a file)")
            return
    if ann is None:
        report.unchecked.append(f"the annotation file (the manifest names {recorded!r}; pass --data or --train-ann "
                                "to check it against its recorded SHA-256)")
    elif not ann.is_file():
        report.problems.append(f"{ann}: the annotation file to check does not exist")
    elif dataset.get("annotations_sha256") and sha256_file(ann) != dataset["annotations_sha256"]:
        report.problems.append(f"{ann}: the annotation file changed since the cache was built (SHA-256 differs "
                               "from the manifest's dataset.annotations_sha256): the cache is stale, rebuild it")
    report.unchecked.append("the training images (a run checks them against dataset.images_fingerprint)")


def verify_cache(root: str | os.PathLike, **sources: Any) -> list[str]:
    """The integrity problems :func:`verify_report` finds (empty: none); an incomplete cache has none (see
    :attr:`VerifyReport.complete`). ``sources``: ``checkpoint``, ``annotations``, ``data`` of
    :func:`verify_report`."""
    return verify_report(root, **sources).problems


def cache_info(root: str | os.PathLike) -> str:
    """A human summary of a cache folder (no hashing: use :func:`verify_cache` for integrity)."""
    root = Path(root)
    m = _read_manifest(root)
    store = StoreConfig.from_dict(m["store"])
    teacher, dataset, plan = m["teacher"], m["dataset"], m["plan"]
    shards = m["shards"]
    image_views = sum(len(e["image_ids"]) for e in shards)
    shard_bytes = sum(int(e["bytes"]) for e in shards)
    qpath = root / QUERIES
    total = shard_bytes + (qpath.stat().st_size if qpath.is_file() else 0) \
        + (root / MANIFEST).stat().st_size
    per_view: dict[int, int] = {}
    for e in shards:
        per_view[int(e["view"])] = per_view.get(int(e["view"]), 0) + len(e["images"])
    sha = str(teacher.get("checkpoint_sha256") or "")
    lines = [
        f"teacher cache {root}",
        f"  teacher:  {teacher.get('name', '?')} ({teacher.get('model', '?')}), checkpoint "
        f"{teacher.get('checkpoint', '?')} sha256 {sha[:12] or '?'}",
        f"  dataset:  {dataset.get('annotations', '?')}, {dataset.get('images', '?')} images"
        + (f" in {dataset['image_dir']}" if dataset.get("image_dir") else "")
        + (f", image fingerprint {str(dataset[IMAGES_FINGERPRINT])[:12]}" if dataset.get(IMAGES_FINGERPRINT)
           else ", no image fingerprint (older cache: rebuild it to distil from it)"),
        f"  plan:     K={plan.get('num_views', '?')} views per image (one entry per image view: any batch "
        f"size), seed {plan.get('seed', '?')}, fingerprint {str(plan.get('fingerprint', '?'))[:12]}",
        f"  store:    {store.describe()}",
        f"  content:  {len(shards)} shards, {image_views} image views"
        + (f" (images per view: {', '.join(f'{v}: {n}' for v, n in sorted(per_view.items()))})"
           if per_view else ""),
        f"  size:     {_human(total)} total ({total} bytes), "
        + (f"{_human(shard_bytes / image_views)} per image view" if image_views else "no image views yet"),
    ]
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover
