"""Synthetic COCO-format detection data: textured shapes on cluttered backgrounds.

The category of an object is its *shape* (ellipse, rectangle, triangle, cross, ring, star); colour and
texture are drawn independently of the category so they carry no label information. Each image has a
gradient + noise background, random lines and distractor strokes (zig-zags, open arcs, dot clusters)
that are not categories, 1-8 objects (some images none) of COCO small / medium / large size, random
aspect ratios and rotations, solid / striped / noisy / gradient fills, overlaps and truncation at the
image border.

Parameter choices (for ``image_size=128``, the CPU quickstart size):

* Sizes follow COCO's absolute area ranges (small < 32^2, medium < 96^2, large >= 96^2 px^2); the
  nominal side ``sqrt(w*h)`` is drawn log-uniformly inside a bucket chosen with probabilities
  (0.35, 0.45, 0.20). The smallest side is ``max(8, 0.08 * image_size)`` (10 px at 128): below a third
  of the stride-32 cell objects become guesswork for a tiny DETR, while 10-32 px objects still leave
  small-object AP as headroom for bigger models. The largest side is 0.9 * image_size, at most
  ``max(1, 0.5 * image_size^2 / 96^2)`` large objects per image (one at 128 px). At 64 px the large
  range is empty by COCO's definition and the remaining buckets are renormalised.
* Objects are placed largest first (so smaller ones lie on top). A placement is rejected and redrawn
  (up to 30 tries, then the object is left out) when it would leave any object -- itself included,
  through truncation at the border -- with less than ``min_visible`` (0.6) of its pixels visible. So
  no object is occluded beyond the threshold and no unlabelled fragment of a "dropped" object stays in
  the image.
* Boxes are COCO style: the tight box of the object's *visible* pixels (``amodal_boxes=True``: the
  full extent of the shape, clipped to the image), ``area`` = box area, ``iscrowd`` = 0.
* Object colours are resampled (up to 10 times) until they differ from the mean colour underneath by at
  least 80 (RGB distance): colour is uninformative about the class but objects stay visible.
* ``clutter`` scales background noise (sigma 6 * clutter), lines (Poisson mean 3 * clutter), distractors
  (Poisson mean 2.5 * clutter) and a few thin lines drawn over objects (mean 0.5 * clutter).

Every image is drawn from its own generator seeded by ``(seed, split, index)``: output bytes are
identical on a rerun and image ``i`` does not depend on how many images are generated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORY_NAMES", "generate_synthetic", "render_image"]

logger = logging.getLogger(__name__)

CATEGORY_NAMES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "cross", "ring", "star")
SPLITS = ("train", "val")
_VAL_ID_OFFSET = 1_000_000  # image ids unique across splits, as in COCO
_SIZE_BUCKETS = ((0.0, 32.0), (32.0, 96.0), (96.0, math.inf))  # COCO area ranges, as box sides
_BUCKET_PROBS = (0.35, 0.45, 0.20)
_MIN_CONTRAST = 80.0
_PLACEMENT_TRIES = 30
_MAX_OVERHANG = 0.3  # fraction of a box that may lie outside the image before the visibility test
_FORMAT_VERSION = 1
# one saturated colour per category for ``class_colours=True`` (red, blue, green, yellow, magenta, cyan)
_CLASS_COLOURS = np.array([[230, 40, 40], [40, 70, 230], [40, 190, 60], [235, 220, 40], [210, 50, 210],
                           [40, 210, 220]], dtype=np.float64)

# aspect-ratio ranges (w/h, log-uniform) and rotation ranges (radians) per shape
_ASPECT = {
    "ellipse": (0.5, 2.0), "rectangle": (0.4, 2.5), "triangle": (0.6, 1.6),
    "cross": (0.7, 1.4), "ring": (0.6, 1.6), "star": (0.75, 1.33),
}


# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------
def _circle(n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _to_unit_box(p: np.ndarray) -> np.ndarray:
    """Affinely stretch points so their bounding box is [-1, 1]^2 (w, h then set the real extent)."""
    lo, hi = p.min(0), p.max(0)
    return (p - (lo + hi) / 2) / ((hi - lo) / 2)


def _unit_shape(name: str, rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, int]], float]:
    """Polygons (points in [-1,1]^2, fill 1 = paint / 0 = cut) and a rotation angle for one shape."""
    if name == "ellipse":
        return [(_circle(), 1)], rng.uniform(0, np.pi)
    if name == "rectangle":
        sq = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
        return [(sq, 1)], rng.uniform(-0.35, 0.35)
    if name == "triangle":
        a = np.pi / 2 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        return [(_to_unit_box(np.stack([np.cos(a), np.sin(a)], 1)), 1)], rng.uniform(0, 2 * np.pi)
    if name == "cross":
        t = rng.uniform(0.22, 0.36)
        bar_h = np.array([[-1.0, -t], [1.0, -t], [1.0, t], [-1.0, t]])
        bar_v = bar_h[:, ::-1].copy()
        # upright "+" or diagonal "x": both are the cross category
        return [(bar_h, 1), (bar_v, 1)], rng.choice([0.0, np.pi / 4]) + rng.uniform(-0.2, 0.2)
    if name == "ring":
        rho = rng.uniform(0.45, 0.65)
        return [(_circle(), 1), (_circle() * rho, 0)], rng.uniform(0, np.pi)
    if name == "star":
        k = int(rng.integers(5, 7))
        r = np.where(np.arange(2 * k) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        a = np.pi / 2 + np.arange(2 * k) * np.pi / k
        return [(_to_unit_box(np.stack([r * np.cos(a), r * np.sin(a)], 1)), 1)], rng.uniform(0, 2 * np.pi)
    raise ValueError(f"unknown shape {name!r}")


def _rasterise(polys: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int, int]:
    """Render polygons (image coordinates) into a tight local mask.

    Returns ``(mask [h,w] bool, x_off, y_off)``: pixel ``(y, x)`` of the mask is image pixel
    ``(y + y_off, x + x_off)``. The mask is not clipped to the image, so its sum is the full area.
    """
    allp = np.concatenate([p for p, _ in polys])
    x_off, y_off = int(np.floor(allp[:, 0].min())), int(np.floor(allp[:, 1].min()))
    w = int(np.ceil(allp[:, 0].max())) - x_off + 1
    h = int(np.ceil(allp[:, 1].max())) - y_off + 1
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for p, fill in polys:
        draw.polygon([(float(x - x_off), float(y - y_off)) for x, y in p], fill=fill)
    return np.asarray(im, dtype=bool), x_off, y_off


# --------------------------------------------------------------------------------------------------
# rendering of one image
# --------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, s: int, clutter: float, grey: bool = False) -> np.ndarray:
    """Gradient between two random colours along a random direction, plus pixel noise: float32 [s,s,3].

    ``grey``: the two colours are grey levels, so saturated class colours stand out against it.
    """
    if grey:
        c0 = np.full(3, rng.uniform(40, 215), np.float32)
        c1 = np.full(3, rng.uniform(40, 215), np.float32)
    else:
        c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = np.arange(s, dtype=np.float32)
    t = np.float32(np.cos(ang)) * ramp[None, :] + np.float32(np.sin(ang)) * ramp[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    if clutter > 0:
        # float32 draws: the noise is the single most expensive step of an image
        img += rng.standard_normal((s, s, 3), dtype=np.float32) * np.float32(6.0 * clutter)
    return img


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _draw_lines(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, n: int, max_width: int) -> None:
    for _ in range(n):
        p = rng.uniform(-0.1 * s, 1.1 * s, 4)
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=_random_colour(rng), width=int(rng.integers(1, max_width + 1)))


def _draw_distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, n: int) -> None:
    """Non-category clutter of object-like size: zig-zag strokes, open arcs, dot clusters."""
    for _ in range(n):
        kind = int(rng.integers(0, 3))
        size = rng.uniform(0.1, 0.4) * s
        cx, cy = rng.uniform(0, s, 2)
        colour = _random_colour(rng)
        if kind == 0:
            k = int(rng.integers(3, 7))
            xs = cx + np.linspace(-size / 2, size / 2, k)
            ys = cy + rng.uniform(-size / 2, size / 2, k)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            start = rng.uniform(0, 360)
            # at most 180 degrees so an arc never reads as a (partly hidden) ring
            draw.arc([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], start,
                     start + rng.uniform(60, 180), fill=colour, width=int(rng.integers(1, 4)))
        else:
            for _ in range(int(rng.integers(5, 16))):
                x, y = cx + rng.uniform(-size / 2, size / 2), cy + rng.uniform(-size / 2, size / 2)
                r = rng.uniform(0.6, 1.6)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _texture(rng: np.random.Generator, colour: np.ndarray, ys: np.ndarray, xs: np.ndarray, s: int) -> np.ndarray:
    """Fill colours ``[M,3]`` for the pixels ``(ys, xs)`` of one object: solid, stripes, noise or gradient."""
    kind = int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))
    if kind == 0:
        return np.broadcast_to(colour, (len(ys), 3))
    if kind == 1:
        period = rng.uniform(3.0, 8.0) * max(s / 128.0, 0.5)
        ang = rng.uniform(0, np.pi)
        phase = (np.cos(ang) * xs + np.sin(ang) * ys) / period
        band = (np.floor(phase) % 2 == 0)[:, None]
        return np.where(band, colour, colour * rng.uniform(0.35, 0.7))
    if kind == 2:
        return colour + rng.normal(0.0, 35.0, (len(ys), 3))
    other = rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.cos(ang) * xs + np.sin(ang) * ys
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[:, None]
    return colour * (1 - 0.6 * t) + other * 0.6 * t


def _sample_sizes(rng: np.random.Generator, n: int, s: int, min_side: float) -> list[float]:
    """Nominal sides ``sqrt(w*h)`` of ``n`` objects, COCO-bucketed (see the module docstring)."""
    max_side = 0.9 * s
    ranges = [(max(lo, min_side), min(hi, max_side)) for lo, hi in _SIZE_BUCKETS]
    probs = np.array([p if lo < hi else 0.0 for p, (lo, hi) in zip(_BUCKET_PROBS, ranges)])
    max_large = max(1, int(0.5 * s * s / 96.0**2))
    sides, n_large = [], 0
    for _ in range(n):
        p = probs.copy()
        if n_large >= max_large:
            p[2] = 0.0
        b = int(rng.choice(3, p=p / p.sum()))
        n_large += b == 2
        lo, hi = ranges[b]
        sides.append(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    return sorted(sides, reverse=True)  # largest first: small objects end up on top


def render_image(
    rng: np.random.Generator,
    image_size: int = 128,
    num_categories: int = 6,
    objects_per_image: tuple[int, int] = (1, 8),
    empty_prob: float = 0.05,
    clutter: float = 1.0,
    min_visible: float = 0.6,
    min_object_size: float | None = None,
    amodal_boxes: bool = False,
    class_colours: bool = False,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image.

    Returns:
        ``(image [S,S,3] uint8, objects)`` with ``objects`` a list of ``{"category": index in
        CATEGORY_NAMES, "bbox": [x, y, w, h] ints (COCO pixels)}``.
    """
    s = int(image_size)
    min_side = float(min_object_size) if min_object_size is not None else max(8.0, 0.08 * s)
    canvas = _background(rng, s, clutter, grey=class_colours)
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    lw = max(1, s // 64)
    _draw_lines(draw, rng, s, int(rng.poisson(3.0 * clutter)), lw + 1)
    _draw_distractors(draw, rng, s, int(rng.poisson(2.5 * clutter)))
    canvas = np.asarray(pil, dtype=np.float32).copy()

    n = 0 if rng.random() < empty_prob else int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    owner = np.full((s, s), -1, dtype=np.int32)  # index of the object that shows at each pixel
    full_area: list[int] = []
    visible: list[int] = []
    placed: list[tuple[int, np.ndarray, int, int]] = []  # (category, local mask, x_off, y_off)
    for side in _sample_sizes(rng, n, s, min_side):
        cat = int(rng.integers(0, num_categories))
        name = CATEGORY_NAMES[cat]
        lo, hi = _ASPECT[name]
        ar = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        w, h = side * math.sqrt(ar), side / math.sqrt(ar)
        polys, theta = _unit_shape(name, rng)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        polys = [((p * [w / 2, h / 2]) @ rot.T, f) for p, f in polys]
        allp = np.concatenate([p for p, _ in polys])
        (x0, y0), (x1, y1) = allp.min(0), allp.max(0)
        bw, bh = x1 - x0, y1 - y0
        for _ in range(_PLACEMENT_TRIES):
            left = rng.uniform(-_MAX_OVERHANG * bw, s - (1 - _MAX_OVERHANG) * bw)
            top = rng.uniform(-_MAX_OVERHANG * bh, s - (1 - _MAX_OVERHANG) * bh)
            mask, ox, oy = _rasterise([(p + [left - x0, top - y0], f) for p, f in polys])
            area = int(mask.sum())
            if area == 0:
                continue
            # part of the local mask that falls inside the image
            ya, yb, xa, xb = max(oy, 0), min(oy + mask.shape[0], s), max(ox, 0), min(ox + mask.shape[1], s)
            if ya >= yb or xa >= xb:
                continue
            m_in = mask[ya - oy:yb - oy, xa - ox:xb - ox]
            if m_in.sum() < min_visible * area:
                continue
            covered = owner[ya:yb, xa:xb][m_in]
            lost = np.bincount(covered[covered >= 0], minlength=len(placed))
            if any(visible[j] - lost[j] < min_visible * full_area[j] for j in range(len(placed))):
                continue
            break
        else:
            continue  # no valid placement: leave the object out rather than break the occlusion rule
        for j in range(len(placed)):
            visible[j] -= int(lost[j])
        i = len(placed)
        owner[ya:yb, xa:xb][m_in] = i
        placed.append((cat, mask, ox, oy))
        full_area.append(area)
        visible.append(int(m_in.sum()))
        region = canvas[ya:yb, xa:xb]
        ys, xs = np.nonzero(m_in)
        if class_colours:
            # the category's own saturated colour, slightly jittered, solid fill: a learnable cue
            region[ys, xs] = _CLASS_COLOURS[cat] + rng.uniform(-20.0, 20.0, 3)
            continue
        under = region[m_in].mean(0)
        for _ in range(10):
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
                break
        region[ys, xs] = _texture(rng, colour, ys.astype(np.float32), xs.astype(np.float32), s)

    # thin lines over everything: real clutter also crosses objects (too thin to count as occlusion)
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _draw_lines(ImageDraw.Draw(pil), rng, s, int(rng.poisson(0.5 * clutter)), 1)

    objects = []
    for i, (cat, mask, ox, oy) in enumerate(placed):
        if amodal_boxes:
            ys, xs = np.nonzero(mask)
            ys, xs = ys + oy, xs + ox
            keep = (ys >= 0) & (ys < s) & (xs >= 0) & (xs < s)
            ys, xs = ys[keep], xs[keep]
        else:
            ys, xs = np.nonzero(owner == i)
        x, y = int(xs.min()), int(ys.min())
        objects.append({"category": cat, "bbox": [x, y, int(xs.max()) + 1 - x, int(ys.max()) + 1 - y]})
    return np.asarray(pil), objects


# --------------------------------------------------------------------------------------------------
# dataset writer
# --------------------------------------------------------------------------------------------------
def _params(image_size, seed, num_categories, objects_per_image, empty_prob, clutter, min_visible,
            min_object_size, amodal_boxes, class_colours=False) -> dict[str, Any]:
    params = {
        "format_version": _FORMAT_VERSION,
        "image_size": int(image_size),
        "seed": int(seed),
        "num_categories": int(num_categories),
        "objects_per_image": [int(objects_per_image[0]), int(objects_per_image[1])],
        "empty_prob": float(empty_prob),
        "clutter": float(clutter),
        "min_visible": float(min_visible),
        "min_object_size": None if min_object_size is None else float(min_object_size),
        "amodal_boxes": bool(amodal_boxes),
    }
    if class_colours:  # only recorded when set, so data sets written before the option still match
        params["class_colours"] = True
    return params


def _existing_matches(out_dir: Path, params: dict[str, Any], counts: dict[str, int]) -> bool:
    """True when ``out_dir`` already holds a complete dataset generated with the same parameters."""
    for split in SPLITS:
        f = out_dir / "annotations" / f"instances_{split}2017.json"
        try:
            info = json.loads(f.read_text())["info"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if info.get("generator_params") != params or info.get("num_images") != counts[split]:
            return False
    return True


def generate_synthetic(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 128,
    seed: int = 0,
    *,
    num_categories: int = 6,
    objects_per_image: Sequence[int] = (1, 8),
    empty_prob: float = 0.05,
    clutter: float = 1.0,
    min_visible: float = 0.6,
    min_object_size: float | None = None,
    amodal_boxes: bool = False,
    class_colours: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write a synthetic COCO-format dataset in the standard tree.

    Layout: ``out_dir/annotations/instances_{train,val}2017.json`` and ``out_dir/{train,val}2017/*.png``
    (RGB ``image_size x image_size``). Deterministic for ``seed``: a rerun writes identical bytes.
    Written atomically: everything goes to a hidden sibling temp dir that is renamed to ``out_dir`` at
    the end, so an interrupted run leaves no partial dataset.

    Args:
        out_dir: dataset root to create.
        num_train, num_val: number of images per split (val ids start at 1_000_001).
        image_size: side of the square images in pixels (>= 32).
        seed: base seed; image ``i`` of a split uses its own generator seeded by ``(seed, split, i)``.
        num_categories: use the first K of ``CATEGORY_NAMES`` (1..6); category ids are 1..K.
        objects_per_image: inclusive ``(min, max)`` objects per non-empty image (fewer when a placement
            cannot satisfy the occlusion rule).
        empty_prob: probability that an image has no objects (background and clutter only).
        clutter: 0 = plain gradient background; 1 = default; larger = busier (see module docstring).
        min_visible: minimum visible fraction of every object (occlusion + truncation).
        min_object_size: smallest nominal object side in pixels (default ``max(8, 0.08 * image_size)``).
        amodal_boxes: boxes of the full shape instead of the visible pixels.
        class_colours: each category is drawn in its own saturated colour (solid, jittered) on a grey
            background: an easier task where colour tells the class (the CPU quickstart's data set).
        overwrite: replace an existing ``out_dir``. Without it an existing ``out_dir`` generated with the
            same parameters is returned as is, and any other existing ``out_dir`` raises FileExistsError.
        progress: tqdm progress bar (default: when more than 500 images).

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    lo_hi = tuple(int(v) for v in objects_per_image)
    if int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not 1 <= int(num_categories) <= len(CATEGORY_NAMES):
        raise ValueError(f"num_categories must be in 1..{len(CATEGORY_NAMES)}, got {num_categories}")
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
        raise ValueError(f"objects_per_image must be (min, max) with 0 <= min <= max, got {objects_per_image}")
    if num_train < 0 or num_val < 0 or num_train >= _VAL_ID_OFFSET:
        raise ValueError(f"need 0 <= num_train < {_VAL_ID_OFFSET} and num_val >= 0, got {num_train}, {num_val}")
    if not 0.0 <= empty_prob <= 1.0 or not 0.0 < min_visible <= 1.0 or clutter < 0:
        raise ValueError("need 0 <= empty_prob <= 1, 0 < min_visible <= 1 and clutter >= 0")
    params = _params(image_size, seed, num_categories, lo_hi, empty_prob, clutter, min_visible,
                     min_object_size, amodal_boxes, class_colours)
    counts = {"train": int(num_train), "val": int(num_val)}
    if out_dir.exists() and not overwrite:
        if _existing_matches(out_dir, params, counts):
            logger.info("synthetic dataset %s already exists with the same parameters; reusing it", out_dir)
            return out_dir
        raise FileExistsError(
            f"{out_dir} exists and was not generated with these parameters; pass overwrite=True to replace it"
        )

    from tqdm import tqdm

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    total = num_train + num_val
    show = total > 500 if progress is None else progress
    categories = [
        {"id": k + 1, "name": CATEGORY_NAMES[k], "supercategory": "shape"} for k in range(num_categories)
    ]
    render_kw = dict(
        image_size=int(image_size), num_categories=int(num_categories), objects_per_image=lo_hi,
        empty_prob=float(empty_prob), clutter=float(clutter), min_visible=float(min_visible),
        min_object_size=min_object_size, amodal_boxes=bool(amodal_boxes), class_colours=bool(class_colours),
    )
    try:
        (tmp / "annotations").mkdir(parents=True)
        with tqdm(total=total, desc=f"synthetic data -> {out_dir}", disable=not show, unit="img") as bar:
            for split_code, split in enumerate(SPLITS):
                img_dir = tmp / f"{split}2017"
                img_dir.mkdir()
                images, annotations = [], []
                id_offset = 0 if split == "train" else _VAL_ID_OFFSET
                for i in range(counts[split]):
                    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_code, i]))
                    pixels, objects = render_image(rng, **render_kw)
                    image_id = id_offset + i + 1
                    file_name = f"{image_id:012d}.png"
                    # compress_level 1: noisy images barely compress anyway, and it is 3x faster
                    Image.fromarray(pixels).save(img_dir / file_name, format="PNG", compress_level=1)
                    images.append({"id": image_id, "file_name": file_name, "width": int(image_size),
                                   "height": int(image_size), "license": 1})
                    for obj in objects:
                        x, y, w, h = obj["bbox"]
                        annotations.append({
                            "id": len(annotations) + 1 + id_offset, "image_id": image_id,
                            "category_id": obj["category"] + 1, "bbox": [x, y, w, h],
                            "area": w * h, "iscrowd": 0,
                        })
                    bar.update(1)
                doc = {
                    "info": {
                        "description": "kd-detr synthetic shapes (category = shape; colour "
                                       + ("= category)" if class_colours else "uninformative)"),
                        "version": str(_FORMAT_VERSION), "year": 2026, "contributor": "kd_detr.data.synth",
                        "date_created": "2026-01-01", "split": split, "num_images": counts[split],
                        "generator_params": params,
                    },
                    "licenses": [{"id": 1, "name": "generated", "url": ""}],
                    "images": images, "annotations": annotations, "categories": categories,
                }
                # JSON last within each split; the whole tree only becomes visible with the rename below
                (tmp / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
        if out_dir.exists() and not overwrite:
            # another process (e.g. a second rank) finished the same dataset meanwhile: keep its copy
            if not _existing_matches(out_dir, params, counts):
                raise FileExistsError(f"{out_dir} appeared during generation with different content")
            shutil.rmtree(tmp, ignore_errors=True)
        elif out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, trash)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out_dir)
            except OSError:
                if not _existing_matches(out_dir, params, counts):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a benign race to an identical dataset
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
