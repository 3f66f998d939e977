"""Explicit label space: model class index <-> COCO category id.

Two schemes exist in the DETR world and mixing them up silently ruins a run:

* ``raw_ids``: official DETR / Conditional DETR / HF checkpoints use ``num_classes=91`` slots and the
  model index *is* the COCO category id (slots without a category are never a target).
* ``contiguous``: custom data (and mmdet) number the categories ``0..K-1`` in order of category id.

A :class:`LabelMap` is stored in checkpoints and teacher-cache metadata (``to_dict`` is JSON-safe), and a
teacher and its student must share one (:meth:`LabelMap.check_compatible`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kd_detr.errors import UserError

__all__ = ["COCO_CATEGORIES", "LabelMap", "LabelMapError"]


# The 80 COCO 2017 detection categories with their (non-contiguous) ids 1..90: the label space of
# the official DETR / Conditional DETR checkpoints, whose 91 class slots are indexed by these ids.
COCO_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "person"},
    {"id": 2, "name": "bicycle"},
    {"id": 3, "name": "car"},
    {"id": 4, "name": "motorcycle"},
    {"id": 5, "name": "airplane"},
    {"id": 6, "name": "bus"},
    {"id": 7, "name": "train"},
    {"id": 8, "name": "truck"},
    {"id": 9, "name": "boat"},
    {"id": 10, "name": "traffic light"},
    {"id": 11, "name": "fire hydrant"},
    {"id": 13, "name": "stop sign"},
    {"id": 14, "name": "parking meter"},
    {"id": 15, "name": "bench"},
    {"id": 16, "name": "bird"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
    {"id": 19, "name": "horse"},
    {"id": 20, "name": "sheep"},
    {"id": 21, "name": "cow"},
    {"id": 22, "name": "elephant"},
    {"id": 23, "name": "bear"},
    {"id": 24, "name": "zebra"},
    {"id": 25, "name": "giraffe"},
    {"id": 27, "name": "backpack"},
    {"id": 28, "name": "umbrella"},
    {"id": 31, "name": "handbag"},
    {"id": 32, "name": "tie"},
    {"id": 33, "name": "suitcase"},
    {"id": 34, "name": "frisbee"},
    {"id": 35, "name": "skis"},
    {"id": 36, "name": "snowboard"},
    {"id": 37, "name": "sports ball"},
    {"id": 38, "name": "kite"},
    {"id": 39, "name": "baseball bat"},
    {"id": 40, "name": "baseball glove"},
    {"id": 41, "name": "skateboard"},
    {"id": 42, "name": "surfboard"},
    {"id": 43, "name": "tennis racket"},
    {"id": 44, "name": "bottle"},
    {"id": 46, "name": "wine glass"},
    {"id": 47, "name": "cup"},
    {"id": 48, "name": "fork"},
    {"id": 49, "name": "knife"},
    {"id": 50, "name": "spoon"},
    {"id": 51, "name": "bowl"},
    {"id": 52, "name": "banana"},
    {"id": 53, "name": "apple"},
    {"id": 54, "name": "sandwich"},
    {"id": 55, "name": "orange"},
    {"id": 56, "name": "broccoli"},
    {"id": 57, "name": "carrot"},
    {"id": 58, "name": "hot dog"},
    {"id": 59, "name": "pizza"},
    {"id": 60, "name": "donut"},
    {"id": 61, "name": "cake"},
    {"id": 62, "name": "chair"},
    {"id": 63, "name": "couch"},
    {"id": 64, "name": "potted plant"},
    {"id": 65, "name": "bed"},
    {"id": 67, "name": "dining table"},
    {"id": 70, "name": "toilet"},
    {"id": 72, "name": "tv"},
    {"id": 73, "name": "laptop"},
    {"id": 74, "name": "mouse"},
    {"id": 75, "name": "remote"},
    {"id": 76, "name": "keyboard"},
    {"id": 77, "name": "cell phone"},
    {"id": 78, "name": "microwave"},
    {"id": 79, "name": "oven"},
    {"id": 80, "name": "toaster"},
    {"id": 81, "name": "sink"},
    {"id": 82, "name": "refrigerator"},
    {"id": 84, "name": "book"},
    {"id": 85, "name": "clock"},
    {"id": 86, "name": "vase"},
    {"id": 87, "name": "scissors"},
    {"id": 88, "name": "teddy bear"},
    {"id": 89, "name": "hair drier"},
    {"id": 90, "name": "toothbrush"},
]


class LabelMapError(UserError, ValueError):
    """Raised for invalid or incompatible label maps."""


def _normalise_categories(categories: Iterable[Mapping[str, Any] | int]) -> list[tuple[int, str]]:
    """Accept COCO category dicts (``{"id", "name"}``) or bare ids; return sorted ``(id, name)`` pairs."""
    out: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if isinstance(cat, Mapping):
            if "id" not in cat:
                raise LabelMapError(f"categories[{i}] has no 'id' key: {dict(cat)!r}")
            cid, name = cat["id"], cat.get("name", str(cat["id"]))
        else:
            cid, name = cat, str(cat)
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise LabelMapError(f"categories[{i}] id must be an integer, got {cid!r}")
        if cid in out:
            raise LabelMapError(f"duplicate category id {cid} (categories[{i}])")
        out[cid] = str(name)
    return sorted(out.items())


@dataclass(frozen=True)
class LabelMap:
    """Mapping between model class indices and dataset category ids.

    Attributes:
        num_classes: number of classification slots of the model (``C`` in ``pred_logits [B,Q,C]``).
        index_to_category: model index -> category id, for the slots that carry a category.
        names: category id -> human-readable name.
        scheme: ``"contiguous"``, ``"raw_ids"`` or ``"custom"`` (informational only).
    """

    num_classes: int
    index_to_category: dict[int, int]
    names: dict[int, str] = field(default_factory=dict)
    scheme: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise LabelMapError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        seen: dict[int, int] = {}
        for idx, cid in self.index_to_category.items():
            if not (0 <= idx < self.num_classes):
                raise LabelMapError(f"model index {idx} (category {cid}) outside 0..{self.num_classes - 1}")
            if cid in seen:
                raise LabelMapError(f"category {cid} mapped to two model indices ({seen[cid]} and {idx})")
            seen[cid] = idx
        # frozen dataclass: write the derived inverse map through object.__setattr__
        object.__setattr__(self, "_category_to_index", seen)

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, categories: Iterable[Mapping[str, Any] | int]) -> LabelMap:
        """Indices ``0..K-1`` assigned to the categories sorted by id (custom data, mmdet style)."""
        cats = _normalise_categories(categories)
        if not cats:
            raise LabelMapError("cannot build a label map from an empty category list")
        return cls(
            num_classes=len(cats),
            index_to_category={i: cid for i, (cid, _) in enumerate(cats)},
            names=dict(cats),
            scheme="contiguous",
        )

    @classmethod
    def raw_ids(cls, categories: Iterable[Mapping[str, Any] | int], num_classes: int = 91) -> LabelMap:
        """Index == raw category id (official COCO checkpoints: 91 slots, ids 1..90 with gaps)."""
        cats = _normalise_categories(categories)
        if not cats:
            raise LabelMapError("cannot build a label map from an empty category list")
        bad = [cid for cid, _ in cats if not (0 <= cid < num_classes)]
        if bad:
            raise LabelMapError(
                f"raw-id label map with num_classes={num_classes} cannot hold category ids {bad}; "
                f"use num_classes > {max(bad)} or LabelMap.contiguous"
            )
        return cls(
            num_classes=num_classes,
            index_to_category={cid: cid for cid, _ in cats},
            names=dict(cats),
            scheme="raw_ids",
        )

    # -- lookups ----------------------------------------------------------------------------------
    @property
    def category_to_index(self) -> dict[int, int]:
        """Category id -> model index."""
        return dict(self._category_to_index)  # type: ignore[attr-defined]

    @property
    def category_ids(self) -> list[int]:
        """Category ids covered by the map, sorted."""
        return sorted(self._category_to_index)  # type: ignore[attr-defined]

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._category_to_index  # type: ignore[attr-defined]

    def __len__(self) -> int:
        """Number of categories (not slots; see ``num_classes``)."""
        return len(self.index_to_category)

    def to_index(self, category_id: int) -> int:
        """Model index of a category id; ``KeyError`` naming the id if unknown."""
        try:
            return self._category_to_index[int(category_id)]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in the label map ({self.category_ids})") from None

    def to_category(self, index: int) -> int:
        """Category id of a model index; ``KeyError`` if that slot carries no category."""
        try:
            return self.index_to_category[int(index)]
        except KeyError:
            raise KeyError(f"model index {index} carries no category in this label map") from None

    def name_of_index(self, index: int) -> str:
        """Name of the category at a model index."""
        return self.names.get(self.to_category(index), str(self.to_category(index)))

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists, string keys only) for checkpoints and cache metadata."""
        return {
            "scheme": self.scheme,
            "num_classes": self.num_classes,
            "categories": [
                {"index": idx, "id": cid, "name": self.names.get(cid, str(cid))}
                for idx, cid in sorted(self.index_to_category.items())
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict`."""
        try:
            cats = d["categories"]
            return cls(
                num_classes=int(d["num_classes"]),
                index_to_category={int(c["index"]): int(c["id"]) for c in cats},
                names={int(c["id"]): str(c.get("name", c["id"])) for c in cats},
                scheme=str(d.get("scheme", "custom")),
            )
        except (KeyError, TypeError) as e:
            raise LabelMapError(f"malformed label-map dict (missing or bad {e}): {dict(d)!r}") from None

    # -- comparison -------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        # scheme is informational: two maps with identical slots are interchangeable
        return (
            self.num_classes == other.num_classes
            and self.index_to_category == other.index_to_category
            and self.names == other.names
        )

    def __hash__(self) -> int:
        return hash((self.num_classes, tuple(sorted(self.index_to_category.items()))))

    def differences(self, other: LabelMap) -> list[str]:
        """Human-readable list of differences (empty when the maps are equal)."""
        diffs: list[str] = []
        if self.num_classes != other.num_classes:
            diffs.append(f"num_classes {self.num_classes} ({self.scheme}) vs {other.num_classes} ({other.scheme})")
        idx = sorted(set(self.index_to_category) | set(other.index_to_category))
        changed = [
            (i, self.index_to_category.get(i), other.index_to_category.get(i))
            for i in idx
            if self.index_to_category.get(i) != other.index_to_category.get(i)
        ]
        if changed:
            shown = ", ".join(f"index {i}: category {a} vs {b}" for i, a, b in changed[:5])
            more = f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
            diffs.append(f"{len(changed)} index->category assignments differ: {shown}{more}")
        names = [
            (c, self.names.get(c), other.names.get(c))
            for c in sorted(set(self.names) & set(other.names))
            if self.names.get(c) != other.names.get(c)
        ]
        if names:
            shown = ", ".join(f"category {c}: {a!r} vs {b!r}" for c, a, b in names[:5])
            diffs.append(f"{len(names)} category names differ: {shown}")
        return diffs

    def check_compatible(self, other: LabelMap, what: str = "label maps") -> None:
        """Raise :class:`LabelMapError` listing the differences if ``other`` is not the same map.

        Teacher and student must predict in one label space; ``what`` names the pair in the message,
        e.g. ``"teacher vs student"``.
        """
        diffs = self.differences(other)
        if diffs:
            raise LabelMapError(
                f"incompatible {what}: " + "; ".join(diffs)
                + ". Build both with the same LabelMap (e.g. LabelMap.raw_ids for official COCO checkpoints, "
                "LabelMap.contiguous for custom data)."
            )

    def __repr__(self) -> str:
        return f"LabelMap(scheme={self.scheme!r}, num_classes={self.num_classes}, categories={len(self)})"
