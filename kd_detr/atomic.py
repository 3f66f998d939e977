"""Atomic file writes: a reader (or a resumed job) never sees a half-written file.

Everything is written to a temporary file in the destination folder, flushed to disk, then renamed
onto the destination with ``os.replace`` (atomic on POSIX). On any failure the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


# The temporary names ``atomic_write`` uses: ``.<target name>.<8 random characters>.tmp`` (``tempfile.mkstemp``
# with the prefix and suffix below). A write killed mid-way (SIGKILL, power loss) leaves one behind;
# :func:`remove_stale_temp_files` removes them.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

# What a full disk looks like when the writer is not Python's own file I/O: torch's zip writer
# (``inline_container.cc ... unexpected pos``, ``PytorchStreamWriter failed writing file``), safetensors'
# Rust I/O (``StorageFull``) and libc messages.
_DISK_FULL_SIGNS = ("unexpected pos", "file write failed", "failed writing file", "no space left", "storagefull",
                    "disk quota exceeded", "disk full")


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in _DISK_FULL_SIGNS)


def _first_line(exc: BaseException) -> str:
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _write_error(path: Path, exc: Exception) -> OSError | None:
    """The one-line ``OSError`` that replaces a failed write of ``path`` (None: re-raise ``exc`` as it is)."""
    if _disk_full(exc):
        err = OSError(f"could not write {path}: no space left on device? ({_first_line(exc)}); free some space "
                      "and run again (the previous file, if any, is unchanged)")
        err.errno = errno.ENOSPC
    elif isinstance(exc, OSError):
        msg = (f"could not write {path}: {exc.strerror or _first_line(exc)}"
               f"{f' ({exc.filename})' if exc.filename and str(exc.filename) != str(path) else ''}; "
               "the previous file, if any, is unchanged")
        try:  # keep the type (PermissionError, ...) for callers that tell them apart
            err = type(exc)(msg)
        except Exception:  # noqa: BLE001 - an OSError subclass with another constructor
            err = OSError(msg)
        err.errno = exc.errno
    else:  # a RuntimeError (or another writer's error) that is not about the disk: a bug, keep it as it is
        return None
    return err  # (no .filename: OSError would then print "[Errno N] strerror: filename" instead of the message)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, make_parents: bool = True) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then rename it onto ``path``.

    A failed write (full disk, permissions, I/O error) removes the temporary file and raises an ``OSError``
    whose one-line message names ``path`` (and says "no space left on device?" when it looks like it); the
    destination keeps its previous content."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        err = _write_error(path, e)
        raise err from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        err = _write_error(path, e)
        if err is None:
            raise
        raise err from e
    except BaseException:  # KeyboardInterrupt, SystemExit: clean up, change nothing else
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(*folders: str | os.PathLike, pattern: re.Pattern = TEMP_NAME) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` (or another writer whose temp names match ``pattern``)
    left in ``folders`` when a write was killed mid-way (only plain files, not recursive). Call it only while
    no writer uses the folders (e.g. under the run's output-dir lock). Returns the removed paths."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                except OSError:
                    continue
                removed.append(p)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats (invalid in strict JSON) by ``None``, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON; NaN / Inf floats (e.g. the AP of a category without ground
    truth) become ``null`` so other tools can read the file. Non-JSON values go through ``str``."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=str)
    except ValueError:  # only pay for the recursive copy when there is something to replace
        text = json.dumps(_json_safe(obj), indent=indent, allow_nan=False, default=str)
    return write_text_atomic(path, text + "\n")
