"""DETR augmentation as explicit, replayable parameters.

Random augmentation is split in two steps so that an augmented sample can be reproduced exactly
(teacher caches, resume, any number of dataloader workers):

1. :meth:`AugmentationPolicy.sample` draws a :class:`View` -- plain numbers (flip, resize sizes, crop box)
   -- from a generator;
2. :func:`apply_view` applies exactly those numbers to an image and its absolute-``xyxy`` target with
   ``torchvision.transforms.v2`` functional ops on ``tv_tensors`` (so boxes follow the image), then
   returns the normalised image tensor and a normalised-``cxcywh`` target (the data contract).

The recipe is the official DETR one (``datasets/coco.py::make_coco_transforms``)::

    RandomHorizontalFlip(p=0.5)
    RandomSelect(RandomResize(scales, max_size),
                 Compose(RandomResize(crop_resize_sizes), RandomSizeCrop(crop_min, crop_max),
                         RandomResize(scales, max_size)))
    eval: RandomResize([eval_size], max_size)
"""

from __future__ import annotations

from dataclasses import replace, asdict, dataclass, fields
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HIGH_BIT_DEPTH_MODES",
    "AugmentationPolicy",
    "View",
    "apply_view",
    "make_policy",
    "resize_size",
    "to_rgb",
    "view_generator",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Generator = Union[torch.Generator, np.random.Generator]

# PIL modes whose values exceed 8 bits: ``Image.convert("RGB")`` clips them to 255 (an all-white image).
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB copy of a PIL image, converting high-bit-depth grayscale correctly.

    PIL's own ``convert("RGB")`` clips the values of 16-bit (``I;16*``), 32-bit integer (``I``) and float
    (``F``) images to 255, so a 16-bit PNG comes out all white. Here they are scaled instead:

    * ``I;16*`` (16-bit PNG / TIFF): ``round(v / 257)``, i.e. the full 16-bit range onto 0..255 (the file's
      declared bit depth, not the image's maximum, so every image of a data set gets the same scale;
      data that fills only part of the range, e.g. 12-bit values, comes out dark);
    * ``I``: as 16-bit when every value lies in 0..65535 (how older Pillow decodes 16-bit PNGs), otherwise
      the image's min..max onto 0..255;
    * ``F``: ``v * 255`` when every value lies in 0..1, otherwise min..max onto 0..255.

    Every other mode goes through ``convert("RGB")`` (palette, grayscale, alpha dropped, CMYK).
    """
    if image.mode == "RGB":
        return image.copy()
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 2:  # not expected for these modes; let PIL decide
        return image.convert("RGB")
    if image.mode.startswith("I;16"):
        out = (a.astype(np.uint32) + 128) // 257
    else:
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        if image.mode == "I" and lo >= 0 and hi <= 65535:
            out = np.floor(a / 257 + 0.5)
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            out = np.floor(a * 255 + 0.5)
        else:
            out = np.floor((a - lo) * (255 / (hi - lo)) + 0.5) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L").convert("RGB")


# --------------------------------------------------------------------------------------------------
# random draws that work with either generator type
# --------------------------------------------------------------------------------------------------
def _rand_float(gen: Generator) -> float:
    """Uniform draw in [0, 1)."""
    if isinstance(gen, np.random.Generator):
        return float(gen.random())
    return float(torch.rand((), generator=gen).item())


def _rand_int(gen: Generator, low: int, high: int) -> int:
    """Uniform integer in the closed range [low, high] (like ``random.randint``)."""
    if high < low:
        raise ValueError(f"empty integer range [{low}, {high}]")
    if isinstance(gen, np.random.Generator):
        return int(gen.integers(low, high + 1))
    return int(torch.randint(low, high + 1, (), generator=gen).item())


def _choice(gen: Generator, values: tuple[int, ...]) -> int:
    return int(values[_rand_int(gen, 0, len(values) - 1)])


def view_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-sample generator for ``(seed, epoch, index)``.

    ``SeedSequence`` mixes the three numbers into independent streams, so a sample's augmentation does
    not depend on worker count, access order or resume position.
    """
    for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0 for view seeding, got {v}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


# --------------------------------------------------------------------------------------------------
# View: the parameters of one augmentation
# --------------------------------------------------------------------------------------------------
def _pair(v: Any, name: str) -> tuple[int, int] | None:
    if v is None:
        return None
    t = tuple(int(x) for x in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"View.{name} must be (h, w) with positive ints, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class View:
    """Plain-number description of one augmentation, applied in this order.

    Attributes:
        source_size: ``(h, w)`` of the image the view was sampled for (checked by :func:`apply_view`
            so a cached view is never replayed on the wrong image); ``None`` skips the check.
        flip: horizontal flip first.
        resize: ``(h, w)`` of the first resize (``None``: keep size).
        crop: ``(top, left, h, w)`` crop in the coordinates after ``resize`` (``None``: no crop).
        resize2: ``(h, w)`` of the resize after the crop (``None``: none).
    """

    source_size: tuple[int, int] | None = None
    flip: bool = False
    resize: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    resize2: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # normalise lists (from JSON) to tuples of ints so equality and hashing work after a round trip
        object.__setattr__(self, "source_size", _pair(self.source_size, "source_size"))
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "resize", _pair(self.resize, "resize"))
        object.__setattr__(self, "resize2", _pair(self.resize2, "resize2"))
        if self.crop is not None:
            c = tuple(int(x) for x in self.crop)
            if len(c) != 4 or c[0] < 0 or c[1] < 0 or c[2] < 1 or c[3] < 1:
                raise ValueError(f"View.crop must be (top, left, h, w) with h, w >= 1, got {self.crop!r}")
            object.__setattr__(self, "crop", c)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the image after the view, if it is determined by the view alone."""
        if self.resize2 is not None:
            return self.resize2
        if self.crop is not None:
            return (self.crop[2], self.crop[3])
        return self.resize if self.resize is not None else self.source_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists of ints, bools, None)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> View:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown View fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------
def resize_size(image_hw: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output ``(h, w)`` when resizing the shorter side to ``size``, longer side capped at ``max_size``.

    Integer arithmetic identical to the official DETR ``get_size_with_aspect_ratio`` so sizes (and thus
    AP) match the reference implementation.
    """
    h, w = image_hw
    if max_size is not None:
        min_orig, max_orig = float(min(w, h)), float(max(w, h))
        if max_orig / min_orig * size > max_size:
            size = int(round(max_size * min_orig / max_orig))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        return (int(size * h / w), size)
    return (size, int(size * w / h))


def _ints(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class AugmentationPolicy:
    """Sizes and probabilities of the DETR augmentation recipe.

    Attributes:
        train: random augmentation when True; the fixed eval resize when False.
        scales: candidate shorter-side sizes of the multi-scale resize.
        max_size: cap on the longer side (``None``: no cap).
        crop_resize_sizes: shorter-side sizes of the resize before the random crop (no max_size, as DETR).
        crop_min, crop_max: side range of the random-size crop (clamped to the image).
        flip_prob: probability of a horizontal flip.
        crop_prob: probability of taking the resize-crop-resize branch (DETR's ``RandomSelect`` p=0.5).
        eval_size: shorter side at evaluation (``None``: ``max(scales)``).
    """

    train: bool = True
    scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int | None = 1333
    crop_resize_sizes: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    eval_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", _ints(self.scales))
        object.__setattr__(self, "crop_resize_sizes", _ints(self.crop_resize_sizes))
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be non-empty positive sizes, got {self.scales}")
        if self.crop_prob > 0 and (not self.crop_resize_sizes or min(self.crop_resize_sizes) < 1):
            raise ValueError(f"crop_resize_sizes must be non-empty positive sizes, got {self.crop_resize_sizes}")
        if not (1 <= self.crop_min <= self.crop_max):
            raise ValueError(f"need 1 <= crop_min <= crop_max, got {self.crop_min}, {self.crop_max}")
        for name in ("flip_prob", "crop_prob"):
            p = getattr(self, name)
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be positive or None, got {self.max_size}")

    @property
    def test_size(self) -> int:
        """Shorter side used at evaluation."""
        return int(self.eval_size) if self.eval_size is not None else max(self.scales)

    def sample(self, generator: Generator | None, image_hw: tuple[int, int]) -> View:
        """Draw the :class:`View` for an image of size ``image_hw = (h, w)``.

        With ``train=False`` the view is the fixed eval resize and ``generator`` is not used (may be None).
        Draw order (fixed, so a seed always yields the same view): flip, branch, sizes, crop.
        """
        h, w = int(image_hw[0]), int(image_hw[1])
        if not self.train:
            return View(source_size=(h, w), resize=resize_size((h, w), self.test_size, self.max_size))
        if generator is None:
            raise ValueError("a training policy needs a generator (torch.Generator or numpy Generator)")
        flip = _rand_float(generator) < self.flip_prob
        if _rand_float(generator) >= self.crop_prob:
            size = _choice(generator, self.scales)
            return View(source_size=(h, w), flip=flip, resize=resize_size((h, w), size, self.max_size))
        rh, rw = resize_size((h, w), _choice(generator, self.crop_resize_sizes), None)
        # RandomSizeCrop: side uniform in [crop_min, min(side, crop_max)], clamped for small images
        ch = _rand_int(generator, min(self.crop_min, rh), min(rh, self.crop_max))
        cw = _rand_int(generator, min(self.crop_min, rw), min(rw, self.crop_max))
        top = _rand_int(generator, 0, rh - ch)
        left = _rand_int(generator, 0, rw - cw)
        size = _choice(generator, self.scales)
        return View(
            source_size=(h, w),
            flip=flip,
            resize=(rh, rw),
            crop=(top, left, ch, cw),
            resize2=resize_size((ch, cw), size, self.max_size),
        )

    def without_strong_augmentation(self) -> AugmentationPolicy:
        """The policy of a schedule's last epochs (``train.no_aug_fraction``, as RT-DETR's, D-FINE's and DEIM's
        ``stop_epoch``): no crop and no multi-scale (every image at the evaluation size); the flip stays."""
        if not self.train:
            return self
        return replace(self, scales=(self.test_size,), crop_prob=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (cache metadata records the augmentation parameters)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentationPolicy:
        return cls(**d)


_OFFICIAL_SCALES = tuple(range(480, 801, 32))


def make_policy(train: bool, image_size: int | None = None, **overrides: Any) -> AugmentationPolicy:
    """Preset policies.

    * ``image_size=None``: the official COCO recipe (scales 480..800 step 32, max 1333, crop (384, 600)
      after a resize to 400/500/600; eval 800 / 1333).
    * ``image_size=s``: every size scaled by ``s / 800`` (so ``s`` is the eval shorter side and the
      largest train scale), e.g. ``128`` -> scales 77..128, max 213, crop (61, 96) after 64/80/96.

    ``overrides`` replace any :class:`AugmentationPolicy` field.
    """
    if image_size is None:
        kw: dict[str, Any] = dict(
            scales=_OFFICIAL_SCALES, max_size=1333, crop_resize_sizes=(400, 500, 600),
            crop_min=384, crop_max=600, eval_size=800,
        )
    else:
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        f = int(image_size) / 800.0

        def sc(x: float) -> int:
            return max(1, int(round(x * f)))

        kw = dict(
            scales=tuple(sorted({sc(s) for s in _OFFICIAL_SCALES})),
            max_size=sc(1333),
            crop_resize_sizes=tuple(sorted({sc(s) for s in (400, 500, 600)})),
            crop_min=sc(384),
            crop_max=sc(600),
            eval_size=int(image_size),
        )
    kw.update(overrides)
    return AugmentationPolicy(train=train, **kw)


# --------------------------------------------------------------------------------------------------
# apply_view
# --------------------------------------------------------------------------------------------------
def _clip_boxes(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    h, w = hw
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def apply_view(
    image: Any,
    target: dict[str, torch.Tensor],
    view: View | dict[str, Any],
    normalize: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply exactly the parameters of ``view`` to an image and its target.

    Args:
        image: PIL image (any mode other than RGB goes through :func:`to_rgb`), or uint8/float tensor
            ``[3,H,W]`` (float in [0, 1]).
        target: dict with ``boxes [N,4]`` absolute ``xyxy`` pixels of ``image``, ``labels [N]`` and
            optionally ``area [N]``, ``iscrowd [N]`` (any other per-box tensor of length N is filtered
            alongside) and scalar entries (``image_id``, ``orig_size``) that are copied.
        view: a :class:`View` or its dict.
        normalize: convert to float and normalise with ImageNet mean/std (False: float in [0, 1]).

    Returns:
        ``(image [3,H',W'] float32, target)`` with ``boxes [M,4]`` float32 normalised ``cxcywh`` w.r.t.
        ``(H', W')``, per-box entries filtered to the ``M`` boxes that keep a positive size, ``area``
        scaled by resizes and recomputed from the clipped box after a crop (as DETR), and
        ``size = [H', W']`` int64.
    """
    if isinstance(view, dict):
        view = View.from_dict(view)
    if not isinstance(image, torch.Tensor):
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = to_rgb(image)
        image = F.pil_to_tensor(image)
    img = tv_tensors.Image(image)
    h, w = int(img.shape[-2]), int(img.shape[-1])
    if view.source_size is not None and view.source_size != (h, w):
        raise ValueError(f"view was sampled for an image of size {view.source_size}, got {(h, w)}")

    boxes_t = torch.as_tensor(target.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4)
    n = boxes_t.shape[0]
    area = target.get("area")
    area = (
        torch.as_tensor(area, dtype=torch.float32).clone()
        if area is not None
        else (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1])
    )
    boxes = tv_tensors.BoundingBoxes(_clip_boxes(boxes_t, (h, w)), format="XYXY", canvas_size=(h, w))

    if view.flip:
        img, boxes = F.horizontal_flip(img), F.horizontal_flip(boxes)

    def _resize(img, boxes, area, size):
        oh, ow = int(img.shape[-2]), int(img.shape[-1])
        if (oh, ow) == tuple(size):
            return img, boxes, area
        img = F.resize(img, list(size), antialias=True)
        boxes = F.resize(boxes, list(size))
        return img, boxes, area * (size[0] / oh) * (size[1] / ow)

    if view.resize is not None:
        img, boxes, area = _resize(img, boxes, area, view.resize)
    keep = torch.ones(n, dtype=torch.bool)
    if view.crop is not None:
        top, left, ch, cw = view.crop
        ih, iw = int(img.shape[-2]), int(img.shape[-1])
        if top + ch > ih or left + cw > iw:
            raise ValueError(f"crop {view.crop} exceeds the resized image {(ih, iw)}")
        img, boxes = F.crop(img, top, left, ch, cw), F.crop(boxes, top, left, ch, cw)
        # clip explicitly: tv_tensors' clamping behaviour differs across torchvision versions
        clipped = _clip_boxes(boxes.as_subclass(torch.Tensor), (ch, cw))
        boxes = tv_tensors.BoundingBoxes(clipped, format="XYXY", canvas_size=(ch, cw))
        area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if view.resize2 is not None:
        img, boxes, area = _resize(img, boxes, area, view.resize2)

    oh, ow = int(img.shape[-2]), int(img.shape[-1])
    xyxy = _clip_boxes(boxes.as_subclass(torch.Tensor).float(), (oh, ow))
    keep &= (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])

    out: dict[str, torch.Tensor] = {}
    for k, v in target.items():
        if k in ("boxes", "area", "size"):
            continue
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n and k not in ("orig_size",):
            out[k] = v[keep]
        else:
            out[k] = v
    scale = torch.tensor([ow, oh, ow, oh], dtype=torch.float32)
    out["boxes"] = box_convert(xyxy[keep], "xyxy", "cxcywh") / scale
    out["area"] = area[keep].float()
    out["size"] = torch.tensor([oh, ow], dtype=torch.int64)

    x = img.as_subclass(torch.Tensor)
    x = F.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x.float()
    if normalize:
        x = F.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return x.contiguous(), out
