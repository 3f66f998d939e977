"""Co-DETR collaborative hybrid assignments for the student, a training-only objective (docs/methods.md 4).

Modules: :mod:`.adapter` (single-scale memory -> 5-level pyramid), :mod:`.anchors` (anchors at the
pyramid's strides), :mod:`.atss_head` and :mod:`.rcnn_head` (the one-to-many auxiliary heads),
:mod:`.assignment` (what a head hands over), :mod:`.queries` (customised positive queries) and
:mod:`.config` (``[co_detr]``, :class:`CoDetrConfig`) and :mod:`.objective` (:class:`CollaborativeHybrid`, the losses).
"""

from .config import CoDetrConfig
from .objective import CollaborativeHybrid

__all__ = ["CoDetrConfig", "CollaborativeHybrid"]
