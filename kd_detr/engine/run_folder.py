"""The output dir of a run: held under one lock for the whole run (every DDP rank stops when another run holds
it), cleaned of temporary files an interrupted write left, and refused as a fresh run's dir when it already
holds one; ``recipe.toml`` written there and compared on resume."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from kd_detr.atomic import remove_stale_temp_files, write_text_atomic
from kd_detr.schema import tomllib

from . import checkpointing
from .distributed import DistInfo

log = logging.getLogger("kd_detr.train")

__all__ = ["held_output_dir", "record_recipe"]


@contextmanager
def held_output_dir(out: Path, dist: DistInfo) -> Iterator[None]:
    """Hold ``out``'s lock (the main rank takes it for all ranks of a DDP run) and remove stale temporary files."""
    lock = checkpointing.OutputDirLock(out)
    busy = None
    if dist.is_main:
        try:
            lock.acquire()
        except (checkpointing.OutputDirInUse, checkpointing.OutputDirLockRefused) as e:
            busy = e
    if dist.enabled:  # every rank stops when the dir is busy (not only the main one)
        message = [str(busy) if busy is not None else None]
        torch.distributed.broadcast_object_list(message, src=0)
        if message[0] is not None and busy is None:
            busy = checkpointing.OutputDirInUse(message[0])
    if busy is not None:
        raise busy
    try:
        if dist.is_main:
            removed = remove_stale_temp_files(out, out / "checkpoints")
            if removed:
                log.info("removed %d stale temporary file(s) left by an interrupted write in %s: %s", len(removed),
                         out, ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
        yield
    finally:
        lock.release()


def record_recipe(out: Path, recipe: Any, resumed: bool, main: bool) -> None:
    """Write ``recipe.toml``; on resume, refuse a recipe whose methods differ from the run's."""
    from .recipe import recipe_to_toml

    saved = out / "recipe.toml"
    current = recipe.to_dict()
    if resumed and saved.exists():
        # the schedule may change on resume (e.g. more iterations); the methods may not
        before = tomllib.loads(saved.read_text())
        changed = [name for name in recipe.sections if name != "teacher_check" and before.get(name) != current[name]]
        if changed:
            raise ValueError(f"--resume: the [{changed[0]}] section of {saved} differs from the recipe given now "
                             f"({recipe.name} with its --set overrides); resume with the same recipe, or start a "
                             "new --output-dir")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, recipe_to_toml(current))
