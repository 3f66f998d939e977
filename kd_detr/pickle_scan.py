"""What a pickle would import, read from its opcodes and never by unpickling it.

kd-detr loads torch files with ``torch.load(weights_only=True)``, which refuses any global outside torch's
allow-list; this module names the globals a refused file asks for, so that the refusal can say "this file
holds code" (and which) instead of torch's advice to load it with ``weights_only=False`` (which would run it).
Used for model weights (``models/backbone.py``) and training states (``engine/checkpointing.py``).
"""

from __future__ import annotations

import os
import pickletools
from typing import Union

__all__ = ["SAFE_PREFIXES", "pickle_globals", "starts_like_pickle", "unsafe_globals"]

# globals a plain torch state dict pickles (tensors, storages, the ordered dict): not code of the file's own
SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.slice")
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")
_PUT_OPS = ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT")
_GET_OPS = ("BINGET", "LONG_BINGET", "GET")


def starts_like_pickle(path: Union[str, os.PathLike]) -> bool:
    """The file begins with a pickle protocol 2+ header (``\\x80`` and a protocol number)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def pickle_globals(path: Union[str, os.PathLike], max_pickles: int = 6) -> list[str]:
    """The ``module.name`` globals outside :data:`SAFE_PREFIXES` that the pickles at the start of ``path`` would
    import (a legacy torch file is a few pickles in a row, then raw storage bytes). Best effort: stops at the
    first byte that is not a pickle, keeping what it found."""
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            for _ in range(max_pickles):
                strings: list[str] = []  # the strings pushed so far (STACK_GLOBAL takes the last two)
                memo: dict[int, str] = {}
                for op, arg, _pos in pickletools.genops(f):
                    name = op.name
                    if name in _STRING_OPS:
                        strings.append(str(arg))
                    elif name in _PUT_OPS and strings:
                        memo[len(memo) if name == "MEMOIZE" else int(arg)] = strings[-1]
                    elif name in _GET_OPS and int(arg) in memo:
                        strings.append(memo[int(arg)])
                    elif name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                if not f.peek(1):
                    break
    except Exception:  # noqa: BLE001 - raw bytes after the pickles, or a cut file: keep what was found
        pass
    return sorted({g for g in found if not g.startswith(SAFE_PREFIXES)})


def unsafe_globals(path: Union[str, os.PathLike]) -> list[str]:
    """The globals a torch file would import beyond what ``weights_only`` allows: torch's own finder for its
    zip format, else :func:`pickle_globals`. Empty when the file is not readable that far."""
    import zipfile

    import torch

    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None and zipfile.is_zipfile(path):
        try:
            return sorted(finder(os.fspath(path)))
        except Exception:  # noqa: BLE001 - a corrupt file: the caller reports it unreadable
            return []
    return pickle_globals(path)
