"""The base of the errors kd-detr raises for what a user can fix: a bad file, option, folder or cluster.

The command line prints a :class:`UserError` as one ``Error: ...`` line (``-v`` shows the traceback); any
other exception is a bug and keeps its traceback. Concrete errors keep their builtin kind as well
(``ValueError`` for bad content, ``OSError`` for folders and files, ``RuntimeError`` for a teacher actor
that keeps dying), so code that catches those still does.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message alone tells the user what is wrong and what to do (one line, naming the file,
    field or option)."""
