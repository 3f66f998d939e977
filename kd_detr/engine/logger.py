"""Per-loss-term logging: JSON lines on disk (the progress bar is :mod:`kd_detr.progress`)."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

from kd_detr.atomic import write_text_atomic
from kd_detr.progress import Progress

__all__ = ["Progress", "RunLogger", "truncate_log"]


class RunLogger:
    """Appends one JSON object per logged step to ``log.jsonl`` (DETR's ``log.txt`` style), the source of truth,
    and the same numbers to TensorBoard event files beside it (``tensorboard --logdir OUTPUT_DIR``).

    Only the main process writes; other ranks get a logger that does nothing. Lines are flushed
    immediately so a killed run keeps everything it logged. TensorBoard is optional (the ``tensorboard``
    package, ``pip install "kd-detr[tensorboard]"``): without it only the JSONL is written. A resumed run
    purges the event steps after the log's last line, so the curves match the JSONL.
    """

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True,
                 filename: str = "log.jsonl", tensorboard: bool = True):
        self.enabled = enabled and output_dir is not None
        self.path = Path(output_dir) / filename if output_dir is not None else None
        self._f = None
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            last = _last_iteration(self.path)
            self._f = open(self.path, "a")
            if tensorboard:
                self._tb = _summary_writer(self.path.parent, purge_step=last + 1 if last is not None else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self._f:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._f.write(json.dumps(clean) + "\n")
            self._f.flush()
        except OSError as e:
            raise _append_error(self.path, e) from None
        if self._tb is not None and "iteration" in record:
            step = int(record["iteration"])
            for k, v in clean.items():
                if k not in ("iteration", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _append_error(path: Path, exc: OSError) -> OSError:
    """The one-line ``OSError`` (same errno) for a failed append to ``path``. A line cut by it is skipped when the
    log is read back (a resumed run rewrites the lines after its checkpoint)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on device? free some space"
    else:
        why = f"{exc.strerror or exc}: check the disk and the output dir"
    err = OSError(f"could not append to the training log {path}: {why}, then resume the run with --resume auto "
                  "(the checkpoints written so far are kept)")
    err.errno = exc.errno
    return err


def _last_iteration(path: Path) -> int | None:
    """The iteration of the last complete line of a JSONL log, or ``None``."""
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            last = int(json.loads(line).get("iteration", last))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue
    return last


def _summary_writer(log_dir: Path, purge_step: int | None):
    """A ``torch.utils.tensorboard.SummaryWriter``, or ``None`` when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional dependency
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


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

