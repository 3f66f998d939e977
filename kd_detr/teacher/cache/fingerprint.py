"""What a teacher cache records of the training images (``dataset.images_fingerprint``), and the check that a
run or a resumed build still has those images."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from .manifest import IMAGES_FINGERPRINT

__all__ = ["dataset_fingerprint", "images_problem"]


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 over each image's file name, size in bytes and modification time (``st_mtime_ns``), in data
    set order: what a cache records of the training images (``dataset.images_fingerprint``).

    Cheap by design: one ``stat`` per image, no image is read (COCO train2017, 118k images, takes about a
    second on a local disk). It changes when an image is replaced, edited, added, removed or renamed
    under an unchanged annotation file. It also changes when the images are copied without their times
    (``cp`` without ``-p``; ``rsync -a`` and ``cp -p`` keep them): then the cache must be rebuilt although
    the pixels are the same. A missing image counts with size and time ``-1``.

    Args:
        dataset: a :class:`~kd_detr.data.CocoDetection` (its ``img_dir``, ``image_ids`` and JSON images).
    """
    names = {int(img["id"]): str(img["file_name"]) for img in dataset.coco.dataset["images"]}
    img_dir = Path(dataset.img_dir)
    h = hashlib.sha256()
    for image_id in dataset.image_ids:
        name = names[int(image_id)]
        try:
            st = os.stat(img_dir / name)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def images_problem(manifest: Mapping[str, Any], dataset: Any, *, fingerprint: Optional[str] = None,
                   fix: str = "rebuild the cache with `kd-detr cache`") -> Optional[str]:
    """``None`` when the cache of ``manifest`` was built from the images ``dataset`` holds now, else one
    line saying what differs and ``fix``. A cache written before image fingerprints existed is refused
    too (nothing tells whether its images changed).

    Args:
        fingerprint: ``dataset_fingerprint(dataset)`` when the caller has it already.
    """
    have = (manifest.get("dataset") or {}).get(IMAGES_FINGERPRINT)
    where = getattr(dataset, "img_dir", "the data set")
    if not have:
        return (f"images: the cache records no image fingerprint (dataset.{IMAGES_FINGERPRINT}: it was built by an "
                f"older kd-detr), so nothing tells whether the images in {where} changed since: {fix}")
    if have != (fingerprint or dataset_fingerprint(dataset)):
        return (f"images: the images in {where} changed since the cache was built (file names, sizes or modification "
                f"times differ from the manifest's dataset.{IMAGES_FINGERPRINT}): {fix}")
    return None
