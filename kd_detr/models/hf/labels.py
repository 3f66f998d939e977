"""Mapping a transformers model's classes (``id2label``) onto a dataset's label map, by name."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["class_map_by_name"]


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def class_map_by_name(id2label: dict[int, str], data_label_map: Any, what: str) -> list[int]:
    """For each of the data's ``C`` class slots, the model class with the same name (case, spaces, ``_`` and
    ``-`` ignored), ``-1`` for slots that carry no category (COCO's 91-slot gaps).

    A data category the model does not know is refused, naming the unmatched categories (distilling it from
    a teacher that cannot predict it would teach "never this class"). Model classes the data lacks are
    dropped. COCO ids and names agree between the 91-slot (DETR) and 80-class (RT-DETR) maps, so matching
    by name maps either onto COCO data in either label-map mode.
    """
    by_name: dict[str, int] = {}
    for idx, name in sorted(id2label.items()):
        by_name.setdefault(_norm(name), int(idx))
    out, unmatched = [], []
    for slot in range(data_label_map.num_classes):
        if slot not in data_label_map.index_to_category:
            out.append(-1)
            continue
        name = data_label_map.name_of_index(slot)
        if _norm(name) in by_name:
            out.append(by_name[_norm(name)])
        else:
            out.append(-1)
            unmatched.append(name)
    if unmatched:
        known = ", ".join(list(id2label.values())[:12]) + (" ..." if len(id2label) > 12 else "")
        raise ValueError(f"{what}: {len(unmatched)} of the data's categories have no class of that name in the "
                         f"model's id2label: {', '.join(map(str, unmatched[:20]))}"
                         f"{' ...' if len(unmatched) > 20 else ''} (the model knows: {known}); use a model "
                         "trained on these categories, or give its config.json an id2label with their names")
    return out
