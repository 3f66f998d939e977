"""The teacher cache's use of :class:`~kd_detr.folder_lock.FolderLock`: one writer per cache folder, the lock
shared by the holders of one process (:class:`CacheLock`), and the clean-up of a killed build's temporary files."""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Optional

from kd_detr.atomic import remove_stale_temp_files
from kd_detr.folder_lock import FolderLock, FolderLockError, LockBusy, LockFileRefused, LockUnsupported

from .manifest import _SHARD_NAME, LOCK, MANIFEST, QUERIES, CacheError

log = logging.getLogger("kd_detr.teacher.cache")

__all__ = ["CacheLock"]


def _check_adoptable(root: Path) -> None:
    """Refuse to adopt a folder with foreign files (a mistyped path must not fill someone's folder);
    shard/queries/temp/lock files of a build that crashed before its first manifest write are fine."""
    if not root.exists():
        return
    if not root.is_dir():
        raise CacheError(f"{root} exists and is not a folder: give --out a new or empty folder")
    if (root / MANIFEST).exists():
        return
    foreign = [p.name for p in root.iterdir()
               if not (p.name in (QUERIES, LOCK) or _SHARD_NAME.match(p.name) or p.name.endswith(".tmp")
                       or _STALE_TEMP.match(p.name))]
    if foreign:
        raise CacheError(f"{root} is not empty and holds no teacher cache ({MANIFEST} missing; "
                         f"found {sorted(foreign)[:5]}): choose an empty or new folder")


def _acquire(root: Path) -> FolderLock:
    """Take the folder lock (:class:`~kd_detr.folder_lock.FolderLock`: exclusive, non-blocking, this pid written
    into ``root/.lock``, never through a link), then remove the temporary files a killed build left."""
    lock = FolderLock(root)
    try:
        lock.acquire()
    except LockBusy as e:
        raise CacheError(f"another kd-detr cache build is writing {root} (pid {e.holder}): wait for it, "
                         f"or use another --out") from None
    except LockFileRefused as e:
        raise CacheError(f"teacher cache {root}: {e}") from None
    except LockUnsupported as e:
        raise CacheError(f"{e}: build into a folder on a local disk") from None
    except FolderLockError as e:
        raise CacheError(str(e)) from None
    _remove_stale_temps(root)
    return lock


# temporary files of a write killed mid-way: atomic_write's ``.<name>.<8 chars>.tmp`` and safetensors'
# own ``.tmp`` plus six random characters
_STALE_TEMP = re.compile(r"^\..+\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


def _remove_stale_temps(root: Path) -> None:
    """Remove the temporary files a killed build left in ``root``. Only right after the lock was taken by
    a process that held none: then no write of any process is in flight there."""
    for p in remove_stale_temp_files(root, pattern=_STALE_TEMP):
        log.info("teacher cache %s: removed %s, left by an interrupted write", root, p.name)


_held: dict[str, list] = {}  # real path of a cache folder -> [its FolderLock, holders in this process]
_held_guard = threading.Lock()


class CacheLock:
    """The exclusive folder lock (:class:`~kd_detr.folder_lock.FolderLock`, the one a training run takes on its
    output dir) on ``<cache>/.lock`` that makes a cache folder single-writer. A ``.lock`` that is not a regular
    file (a link to another file, ...) is refused naming it: nothing is written through it.

    Taken without waiting: while another process holds it, :class:`CacheError` says at once
    ``another kd-detr cache build is writing X (pid N)``. The kernel drops it when the holder exits
    (a crashed build leaves no stale lock; the ``.lock`` file itself stays, harmlessly). Within one
    process the lock is shared: a second :class:`~.writer.CacheWriter` (or
    :func:`~kd_detr.teacher.cache.build.build_cache` and its writer) on the folder counts as the same holder,
    and the lock goes when the last one releases.

    Creates the folder if needed (after refusing one with foreign files).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        _check_adoptable(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {self.root}: {e.strerror}") from None
        key = os.path.realpath(self.root)
        with _held_guard:
            held = _held.get(key)
            if held is None:
                held = _held[key] = [_acquire(self.root), 0]
            held[1] += 1
        self._key: Optional[str] = key

    def release(self) -> None:
        """Give up this holder's share (idempotent)."""
        key, self._key = getattr(self, "_key", None), None
        if key is None:
            return
        with _held_guard:
            held = _held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                del _held[key]
                held[0].release()

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown: the kernel drops the lock anyway
            pass
