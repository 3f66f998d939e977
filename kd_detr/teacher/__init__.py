"""The teacher layer: what a teacher provides (:class:`TeacherOutputs`), where it is described (teacher
cards), how it is loaded and checked, and the three sources a distillation gets its outputs from
(in-process, cache, Ray actors). It imports only what lies below it (models, matcher, evaluation, data): never the methods or the engine.

* :mod:`.outputs`: ``TeacherOutputs`` and its one wire format.
* :mod:`.card`, :mod:`.loading`: teacher cards, ``--teacher`` resolution, loading and fit checks.
* :mod:`.sources`: the ``TeacherSource`` interface and its three implementations.
* :mod:`.ray_session`, :mod:`.ray_actor`, :mod:`.ray_serving`: one Ray start-up, one teacher actor, serving.
* :mod:`.cache`: the safetensors teacher cache (store, attention codec, Ray build).
"""

from .loading import TeacherSpec, check_teacher_fits, describe_teacher, load_teacher, resolve_teacher
from .outputs import ATTN_MODES, TeacherOutputs, stack_layers
from .inprocess import InProcessTeacher
from .sources import CacheSource, InProcessSource, RaySource, TeacherSource

__all__ = ["ATTN_MODES", "CacheSource", "InProcessSource", "InProcessTeacher", "RaySource", "TeacherOutputs",
           "TeacherSource", "TeacherSpec", "check_teacher_fits", "describe_teacher", "load_teacher",
           "resolve_teacher", "stack_layers"]
