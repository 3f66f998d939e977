"""The ``kd-detr`` command line: options become specs (:class:`~kd_detr.data.DataSpec`,
:class:`~kd_detr.runs.assemble.TeacherSourceSpec`, ``TrainConfig`` fields) and calls into :mod:`kd_detr.runs`
and the teacher layer; nothing is computed here.

:mod:`.group` (the ``kd-detr`` group and its one-line errors), :mod:`.options` (options and values shared by
several commands), and one module per family of commands: :mod:`.train_command`, :mod:`.distill_commands`
(recipes, distill, compare, quickstart), :mod:`.cache_commands`, :mod:`.model_commands` (models, convert,
eval, predict, export), :mod:`.data_commands`. Importing this package registers every command on ``main``.
"""

from __future__ import annotations

from . import cache_commands, data_commands, distill_commands, model_commands, train_command  # noqa: F401
from .cache_commands import DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC
from .group import KdDetrGroup, main
from .options import parse_overrides

__all__ = ["main", "KdDetrGroup", "parse_overrides", "DEFAULT_ATTENTION_SPEC", "DEFAULT_CLASSES_SPEC"]
