"""The one lookup of named TOML files shipped with kd-detr: recipes and teacher cards.

The repository keeps them at its top level (``recipes/``, ``teachers/``). A wheel carries a copy
inside the package, ``kd_detr/_zoo/{recipes,teachers}/``, made by ``setup.py``'s ``build_py`` at
build time (as detectron2 does with its ``configs/``); an editable install or a plain source tree
has no such copy and reads the checkout's folders. ``$KD_DETR_RECIPES`` / ``$KD_DETR_TEACHERS``
(``os.pathsep``-separated folders) are searched first, so a user's file shadows a built-in one.

Standard library only: importing this module must not import torch.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

__all__ = ["KINDS", "builtin_dir", "NamedTomls", "RECIPES", "TEACHERS"]

KINDS = ("recipes", "teachers")

_PACKAGE_DIR = Path(__file__).resolve().parent


def builtin_dir(kind: str) -> Path:
    """The folder of built-in ``kind`` files (``"recipes"`` or ``"teachers"``).

    ``kd_detr/_zoo/KIND`` when the package carries a copy (wheel install), else the checkout's
    top-level ``KIND/`` folder (editable install, source tree).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown zoo kind {kind!r}; expected one of {', '.join(KINDS)}")
    packaged = _PACKAGE_DIR / "_zoo" / kind
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parent / kind


class NamedTomls:
    """Named ``NAME.toml`` files of one kind: ``$ENV_VAR`` folders first, then the built-in folder.

    Args:
        kind: ``"recipes"`` or ``"teachers"`` (the built-in folder, see :func:`builtin_dir`).
        env_var: environment variable holding extra folders (``os.pathsep``-separated).
        what: the word used in messages, e.g. ``"recipe"`` or ``"teacher card"``.
    """

    def __init__(self, kind: str, env_var: str, what: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown zoo kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.env_var = env_var
        self.what = what

    def __repr__(self) -> str:
        return f"NamedTomls({self.kind!r}, {self.env_var!r}, {self.what!r})"

    def dirs(self) -> list[Path]:
        """Folders searched, in order: ``$ENV_VAR`` entries (``~`` expanded), then the built-in one."""
        extra = [Path(p).expanduser() for p in os.environ.get(self.env_var, "").split(os.pathsep) if p]
        return [*extra, builtin_dir(self.kind)]

    def names(self) -> list[str]:
        """Sorted names (file stems) of every ``*.toml`` in the folders, ``README`` excluded."""
        found = {p.stem for d in self.dirs() if d.is_dir() for p in d.glob("*.toml") if p.is_file()}
        return sorted(n for n in found if n.lower() != "readme")

    def find(self, name: str) -> Path | None:
        """``NAME.toml`` from the first folder that has it (resolved), or ``None``."""
        if not name or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
            return None
        for folder in self.dirs():
            candidate = folder / f"{name}.toml"
            if candidate.is_file():
                return candidate.resolve()
        return None

    def require(self, name: str) -> Path:
        """Like :meth:`find`, but an unknown name raises ``FileNotFoundError`` listing the names."""
        found = self.find(name)
        if found is not None:
            return found
        available = self.names()
        folders = ", ".join(str(d) for d in self.dirs())
        message = (f"unknown {self.what} {name!r}; available: {', '.join(available) or 'none'} "
                   f"(searched {folders}; set ${self.env_var} to add a folder)")
        close = difflib.get_close_matches(name, available, n=3)
        if close:
            message += f"; did you mean {' or '.join(map(repr, close))}?"
        raise FileNotFoundError(message)


RECIPES = NamedTomls("recipes", "KD_DETR_RECIPES", "recipe")
TEACHERS = NamedTomls("teachers", "KD_DETR_TEACHERS", "teacher card")
