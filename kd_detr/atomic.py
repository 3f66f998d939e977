"""Atomic file writes: a reader (or a resumed job) never sees a half-written file.

Everything is written to a temporary file in the destination folder, flushed to disk, then renamed
onto the destination with ``os.replace`` (atomic on POSIX). On any failure the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, make_parents: bool = True) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then rename it onto ``path``."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
