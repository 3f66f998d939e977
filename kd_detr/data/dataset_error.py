"""The data layer's one error type: :class:`DatasetError`, one line naming the file (also when raised in a
DataLoader worker), and :func:`one_line`, an exception's text squeezed onto one line."""

from __future__ import annotations

import re
from typing import Any

from kd_detr.errors import UserError

__all__ = ["DatasetError", "one_line"]


def _last_exception_line(text: str, name: str) -> str | None:
    """The message of the last ``[module.]name: message`` line of a formatted traceback."""
    pat = re.compile(rf"^(?:[\w.]+\.)?{re.escape(name)}: (.*\S)\s*$")
    for line in reversed(text.splitlines()):
        m = pat.match(line)
        if m:
            return m.group(1)
    return None


class DatasetError(UserError, ValueError):
    """Invalid dataset input; the message is one line naming the file and, where relevant, the record and key.

    A DataLoader worker's exception reaches the main process as ``DatasetError(text)`` where ``text`` is
    torch's "Caught DatasetError in DataLoader worker process N. Original Traceback ..." (the whole
    worker traceback). The constructor recognises that text and keeps only the original one-line
    message as ``str(error)`` (what the CLI prints); the worker traceback stays available as
    ``error.worker_traceback`` (and as an exception note, shown in full tracebacks with ``-v``).
    """

    def __init__(self, message: Any = "", *args: Any) -> None:
        text = message if isinstance(message, str) else str(message)
        worker_traceback = None
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            line = _last_exception_line(text, type(self).__name__)
            if line is not None:
                worker_traceback, message = text, line
        super().__init__(message, *args)
        self.worker_traceback = worker_traceback
        if worker_traceback is not None and hasattr(self, "add_note"):  # Python >= 3.11
            self.add_note(worker_traceback.rstrip())


def one_line(e: BaseException) -> str:
    """``Type: message`` of an exception, whitespace (newlines included) collapsed, at most 300 characters."""
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
