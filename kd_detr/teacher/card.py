"""Teacher cards: ``teachers/NAME.toml`` files naming a trained teacher.

A card says which registered architecture the teacher is, where its checkpoint lives (and where to
download it), its class space (number of classes, label map), the image-size preset it was trained
at and the AP it is known to reach, so that a distillation run can refuse a wrong or broken teacher
before spending compute on it. The contract is ``docs/distillation.md`` ("Teacher cards").
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_detr.schema import check_value, tomllib
from kd_detr.zoo import TEACHERS

__all__ = ["FORMATS", "LABEL_MAPS", "TeacherCard", "find_card", "list_cards", "load_card", "teacher_dirs"]

FORMATS = ("auto", "safetensors", "official", "hf")
LABEL_MAPS = ("coco91", "contiguous")
# The class space is never defaulted: a teacher read with the wrong label map ruins a run silently.
REQUIRED = ("model", "checkpoint", "num_classes", "label_map")
_CHECKS: dict[str, dict[str, Any]] = {
    "format": {"choices": FORMATS},
    "label_map": {"choices": LABEL_MAPS},
    "num_classes": {"min": 1},
    "image_size": {"min": 0},
    "known_ap": {"min": 0, "max": 100},
}


@dataclass
class TeacherCard:
    """A trained teacher: architecture, checkpoint, class space and known accuracy.

    ``checkpoint`` is relative to the card's folder unless absolute; ``image_size`` is the training
    image-size preset (0 = the official 800/1333 sizes); ``known_ap`` is an AP in percent.
    """

    name: str
    model: str
    checkpoint: str
    format: str = "auto"
    url: str = ""
    sha256: str = ""  # of the checkpoint file at ``url``: a download must match it
    num_classes: int = 91
    label_map: str = "coco91"
    image_size: int = 0
    known_ap: float | None = None
    ap_reference: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained: command, seed, data, time
    source: Path | None = None

    @property
    def image_size_preset(self) -> int | None:
        """``TrainConfig.image_size`` the teacher was trained at: ``None`` for the official sizes."""
        return self.image_size or None

    def checkpoint_path(self) -> Path:
        """The checkpoint file, relative paths resolved against the card's folder."""
        path = Path(self.checkpoint).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = Path(self.source).parent / path
        return path

    def downloaded_path(self) -> Path | None:
        """Where the checkpoint at ``url`` is kept once downloaded (``KD_DETR_HOME/teachers/``), or ``None``."""
        from kd_detr.download import cached_file

        return cached_file("teachers", self.url) if self.url else None

    def require_checkpoint(self, progress: bool = True) -> Path:
        """The checkpoint: the card's file when present, else the one downloaded from ``url`` into the user cache
        (fetched now on first use, checked against ``sha256``; never written inside the installed package).
        Without a file and a url: ``FileNotFoundError`` saying so."""
        path = self.checkpoint_path()
        if path.is_file():
            return path
        where = f"teacher card {self.source}" if self.source else f"teacher card {self.name!r}"
        if not self.url:
            raise FileNotFoundError(f"{where}: teacher checkpoint {path} not found and the card gives no url to "
                                    "download it from; pass --teacher-checkpoint PATH")
        from kd_detr.download import download

        return download(self.url, self.downloaded_path(), self.sha256 or None, progress=progress)

    def describe(self) -> str:
        """One line for listings: architecture, known AP and whether the checkpoint is present."""
        ap = f"{self.known_ap:.1f} AP" if self.known_ap is not None else "AP unknown"
        ref = f" ({self.ap_reference})" if self.ap_reference else ""
        cached = self.downloaded_path()
        have = ("present" if self.checkpoint_path().is_file() else "downloaded" if cached and cached.is_file()
                else "downloads on first use" if self.url else "missing")
        return f"{self.model}, {ap}{ref}, checkpoint {have}"


def teacher_dirs() -> list[Path]:
    """Folders searched for cards by name: ``$KD_DETR_TEACHERS`` (``os.pathsep``-separated) first, then the
    cards shipped with kd-detr."""
    return TEACHERS.dirs()


def find_card(name: str) -> Path | None:
    """The card file ``NAME.toml`` in the teacher folders, or ``None`` when there is none."""
    return TEACHERS.find(name)


def list_cards() -> dict[str, str]:
    """Card names -> a one-line description (``(invalid card: ...)`` for a card that does not load)."""
    out = {}
    for name in TEACHERS.names():
        try:
            out[name] = load_card(name).describe()
        except ValueError as e:
            out[name] = f"(invalid card: {e})"
    return out


def _from_dict(data: dict[str, Any], path: Path) -> TeacherCard:
    """Validate card data read from ``path``: every error names the key and the file."""
    from kd_detr.models import get_config  # local: importing the models pulls in torch

    hints = typing.get_type_hints(TeacherCard)
    valid = [f.name for f in dataclasses.fields(TeacherCard) if f.name != "source"]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=2)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"valid keys: {', '.join(valid)}"
            raise ValueError(f"teacher card {path}: unknown key {key!r}; {hint}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"teacher card {path}: missing key(s) {', '.join(missing)} "
                         f"(required: {', '.join(REQUIRED)})")
    kwargs: dict[str, Any] = {"name": path.stem, "source": path}
    for key, value in data.items():
        try:
            kwargs[key] = check_value(value, hints[key], _CHECKS.get(key))
        except ValueError as e:
            raise ValueError(f"teacher card {path}: {key!r} {e}") from None
    card = TeacherCard(**kwargs)
    try:
        config = get_config(card.model)
    except ValueError as e:
        raise ValueError(f"teacher card {path}: 'model' {e}") from None
    try:
        config.replace(**card.model_overrides)
    except ValueError as e:
        raise ValueError(f"teacher card {path}: 'model_overrides' {e}") from None
    if card.model_overrides.get("num_classes", card.num_classes) != card.num_classes:
        raise ValueError(f"teacher card {path}: model_overrides.num_classes disagrees with num_classes")
    if card.label_map == "coco91" and card.num_classes < 91:
        # coco91: the class index is the raw COCO category id (1..90)
        raise ValueError(f"teacher card {path}: label_map 'coco91' needs num_classes >= 91, "
                         f"got {card.num_classes}")
    if 0 < card.image_size < 8:
        raise ValueError(f"teacher card {path}: 'image_size' must be 0 (official sizes) or >= 8, "
                         f"got {card.image_size}")
    return card


def load_card(name_or_path: str | os.PathLike) -> TeacherCard:
    """Load a card by name (``teachers/NAME.toml``, ``$KD_DETR_TEACHERS``) or by path to a ``.toml`` file.

    Raises ``ValueError`` for an unknown name (listing the cards) or an invalid card (naming key and file).
    """
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"teacher card {path} does not exist")
        path = path.resolve()
    else:
        try:
            path = TEACHERS.require(text)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"teacher card {path}: invalid TOML: {e}") from None
    return _from_dict(data, path)
