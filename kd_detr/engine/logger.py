"""Per-loss-term logging: JSON lines on disk (the progress bar is :mod:`kd_detr.progress`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kd_detr.atomic import write_text_atomic
from kd_detr.progress import Progress

__all__ = ["Progress", "RunLogger", "truncate_log"]


class RunLogger:
    """Appends one JSON object per logged step to ``log.jsonl`` (DETR's ``log.txt`` style).

    Only the main process writes; other ranks get a logger that does nothing. Lines are flushed
    immediately so a killed run keeps everything it logged.
    """

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True,
                 filename: str = "log.jsonl"):
        self.enabled = enabled and output_dir is not None
        self.path = Path(output_dir) / filename if output_dir is not None else None
        self._f = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        if not self._f:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


def truncate_log(path: str | os.PathLike, after_iteration: int) -> None:
    """Drop log lines written after ``after_iteration`` (a resumed run rewrites them)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("iteration", -1) <= after_iteration:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))

