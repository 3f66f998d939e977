"""Distillation recipes: TOML files saying how a student is trained and what it learns from its teacher.

A recipe has top-level ``name``, ``description``, an optional ``extends`` and three tables: ``[train]``
(:class:`~kd_detr.engine.trainer.TrainConfig` fields that are not given on the command line),
``[distill]`` (:class:`DistillConfig`) and ``[teacher_check]`` (:class:`TeacherCheck`). Every field has a
default, so a recipe lists only what differs. The contract is ``docs/distillation.md`` ("Recipes").

Loading (:func:`load_recipe`): read the file, follow ``extends`` (deep merge, child over parent), apply
``--set dotted.key=value`` overrides, then validate into the dataclasses. Every problem is a
:class:`RecipeError` naming the dotted key and the file it came from (or ``--set``), because a typo in
a recipe must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "AttnDistill",
    "DistillConfig",
    "FixedGroup",
    "MatchCost",
    "PredDistill",
    "RECIPE_DIR",
    "Recipe",
    "RecipeError",
    "TeacherCheck",
    "check_value",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "parse_override",
    "recipe_dirs",
    "recipe_to_toml",
]

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"

# TrainConfig fields that describe *this* run (model, data, where it goes): the command line gives
# them, so a recipe stays reusable across students and data sets.
CLI_FIELDS = ("model", "model_overrides", "data", "train_ann", "train_images", "val_ann", "val_images",
              "output_dir", "resume")


class RecipeError(ValueError):
    """An invalid recipe: the message names the dotted key and the file (or ``--set``)."""


# --------------------------------------------------------------------------- schema
def _opt(default: Any, **checks: Any) -> Any:
    """A dataclass field carrying its validation: ``choices=(...)``, ``min`` (>=), ``gt`` (>), ``unique``."""
    return field(default=default, metadata=checks)


@dataclass
class MatchCost:
    """Adaptive Matching cost: ``class_weight * D_cls + bbox_weight * L1 + giou_weight * (-GIoU)``."""

    class_weight: float = _opt(2.0, min=0)
    bbox_weight: float = _opt(5.0, min=0)
    giou_weight: float = _opt(2.0, min=0)


@dataclass
class PredDistill:
    """Prediction distillation of matched pairs: soft-label class KL, box L1 and GIoU."""

    enabled: bool = True
    class_weight: float = _opt(1.0, min=0)
    bbox_weight: float = _opt(5.0, min=0)
    giou_weight: float = _opt(2.0, min=0)
    temperature: float = _opt(1.0, gt=0)
    confidence_weighting: bool = False


@dataclass
class AttnDistill:
    """Attention-map distillation (``[distill.self_attn]`` and ``[distill.cross_attn]``)."""

    enabled: bool = True
    weight: float = _opt(1.0, min=0)
    loss: str = _opt("kl", choices=("kl", "mse"))
    per_head: bool = False


@dataclass
class FixedGroup:
    """The Fixed Matching auxiliary group: teacher queries run through the student decoder."""

    gt_loss: bool = True
    teacher_assignment: str = _opt("last", choices=("last", "all", "off"))
    reference_points: str = _opt("student", choices=("student", "teacher"))
    query_projection: str = _opt("none", choices=("none", "linear"))


@dataclass
class DistillConfig:
    """What the student learns from the teacher (``[distill]``); defaults are the full D3ETR MixMatcher."""

    enabled: bool = True
    adaptive: bool = True
    fixed: bool = True
    layers: str | list[int] = _opt("all", choices=("all", "last"), min=0, unique=True)
    layer_map: str | list[int] = _opt("identity", choices=("identity", "uniform"), min=0)
    adaptive_weight: float = _opt(1.0, min=0)
    fixed_weight: float = _opt(1.0, min=0)
    match: MatchCost = field(default_factory=MatchCost)
    pred: PredDistill = field(default_factory=PredDistill)
    self_attn: AttnDistill = field(default_factory=AttnDistill)
    cross_attn: AttnDistill = field(default_factory=AttnDistill)
    fixed_group: FixedGroup = field(default_factory=FixedGroup)


@dataclass
class TeacherCheck:
    """Checks a teacher must pass before a run spends compute distilling from it."""

    image_size: bool = True
    eval_images: int = _opt(0, min=0)
    min_ap: float = _opt(0.0, min=0, max=100)
    max_ap_drop: float = _opt(10.0, min=0)


@dataclass
class MsDetrConfig:
    """MS-DETR mixed supervision of the student's primary queries (``[ms_detr]``, methods.md 3).

    A training-only one-to-many (o2m) loss beside the usual one-to-one Hungarian loss; the trained and
    exported student is a plain Conditional DETR (the auxiliary FFNs / class head live in the objective).

    * ``enabled``: switch the o2m objective on.
    * ``alpha``: class weight of the assignment score ``alpha * p(class) + (1 - alpha) * IoU`` (MS-DETR 0.3).
    * ``threshold``: a query is a candidate positive of its best GT when that score is ``>=`` this (0.4).
    * ``topk``: at most this many positives per GT, the best by score (MS-DETR ``K = 6``).
    * ``max_positive_fraction``: random cap on the positives of one image, as a fraction of the queries (0.25).
    * ``use_aux_ffn``: an auxiliary FFN (Linear-ReLU-Linear + residual + LayerNorm) per decoder layer on the
      o2m features, as MS-DETR's ``--use_aux_ffn``.
    * ``tap``: o2m features: ``"cross_attn"`` (each layer's features after cross-attention, before the FFN;
      the MS-DETR main implementation) or ``"layer_output"`` (the normal layer output, implementation (a)).
    * ``class_head``: ``"shared"`` (the student's class head, MS-DETR main) or ``"separate"`` (an own o2m class
      head, implementation (a)); the box head is always the student's.
    * ``class_weight``, ``bbox_weight``, ``giou_weight``: weights of the o2m focal, L1 and GIoU terms of every
      decoder layer (MS-DETR 2, 5, 2).
    """

    enabled: bool = False
    alpha: float = _opt(0.3, min=0, max=1)
    threshold: float = _opt(0.4, min=0, max=1)
    topk: int = _opt(6, min=1)
    max_positive_fraction: float = _opt(0.25, gt=0, max=1)
    use_aux_ffn: bool = True
    tap: str = _opt("cross_attn", choices=("cross_attn", "layer_output"))
    class_head: str = _opt("shared", choices=("shared", "separate"))
    class_weight: float = _opt(2.0, min=0)
    bbox_weight: float = _opt(5.0, min=0)
    giou_weight: float = _opt(2.0, min=0)


@dataclass
class CoDetrConfig:
    """Co-DETR collaborative hybrid assignments for the student (``[co_detr]``, methods.md 4).

    Training-only: the adapter, the auxiliary heads and the query projections live in the objective
    (:mod:`kd_detr.co_detr`), never in the exported student. ``heads`` entries are checked by the
    objective (``atss`` or ``faster_rcnn``).
    """

    enabled: bool = False
    """Train the student with auxiliary one-to-many heads and their customised positive queries."""
    heads: list[str] = field(default_factory=lambda: ["atss", "faster_rcnn"],
                             metadata={"choices": ("atss", "faster_rcnn"), "unique": True})
    """Auxiliary heads, each with its own positive-query decoder pass (K = 2 as in the paper)."""
    lambda1: float = _opt(1.0, min=0)
    """Weight of the positive queries' decoder losses (on top of the main focal 2 / L1 5 / GIoU 2)."""
    lambda2: float = _opt(2.0, min=0)
    """Weight of the auxiliary heads' own losses; multiplied by the decoder depth L as in Co-DETR's code."""
    max_positive_queries: int = _opt(300, min=1)
    """Cap on the positive queries per image and head (a random subset beyond it)."""
    min_queries: int = _opt(9, min=1)
    """Every image's query group is padded with negatives to the batch maximum, at least this many."""
    use_head_embedding: bool = True
    """Add a learnt per-head embedding to the positional queries."""
    content_from_features: bool = False
    """Add a projection of the head's feature (anchor location / pooled RoI) to the content queries."""
    atss_topk: int = _opt(9, min=1)
    """ATSS assigner: candidate anchors per pyramid level and GT (closest centres)."""
    rpn_batch_size_per_image: int = _opt(256, min=1)
    """RPN: anchors sampled per image for its loss."""
    rpn_positive_fraction: float = _opt(0.5, gt=0, max=1)
    """RPN: largest fraction of positives among the sampled anchors."""
    rpn_post_nms_top_n: int = _opt(1000, min=1)
    """RPN: proposals kept per image after NMS (IoU 0.7)."""
    roi_batch_size_per_image: int = _opt(512, min=1)
    """RoI head: proposals sampled per image (they are the R-CNN head's positive / negative coordinates)."""
    roi_positive_fraction: float = _opt(0.25, gt=0, max=1)
    """RoI head: largest fraction of positives among the sampled proposals."""


# Sections of a recipe beside [train] that are dataclasses (validated field by field).
SECTIONS: dict[str, type] = {"distill": DistillConfig, "teacher_check": TeacherCheck,
                             "ms_detr": MsDetrConfig, "co_detr": CoDetrConfig}


# A few TrainConfig fields get range checks too (the rest are type-checked only).
_TRAIN_CHECKS: dict[str, dict[str, Any]] = {
    "label_map": {"choices": ("contiguous", "coco91")},
    "image_size": {"min": 8},
    "batch_size": {"min": 1},
    "eval_batch_size": {"min": 1},
    "epochs": {"min": 1},
    "num_workers": {"min": 0},
    "warmup_iters": {"min": 0},
    **{k: {"min": 0} for k in ("lr", "lr_backbone", "weight_decay", "clip_max_norm")},
}


@dataclass
class Recipe:
    """A loaded, validated recipe.

    ``train`` holds only the ``[train]`` keys the recipe chain set (the rest stay ``TrainConfig``
    defaults); ``source`` is the recipe file; ``chain`` the files merged, this one first, then its
    parent, grandparent ...
    """

    name: str
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_check: TeacherCheck = field(default_factory=TeacherCheck)
    ms_detr: MsDetrConfig = field(default_factory=MsDetrConfig)
    co_detr: CoDetrConfig = field(default_factory=CoDetrConfig)
    source: str = ""
    chain: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The merged recipe with every distill/teacher_check field (TOML-writable, no ``extends``)."""
        return {
            "name": self.name,
            "description": self.description,
            "train": dict(self.train),
            **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS},
        }

    def train_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``TrainConfig`` (the recipe's ``[train]`` values)."""
        return dict(self.train)

    def to_toml(self) -> str:
        return recipe_to_toml(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Recipe:
        """Validate a recipe given as a dict (e.g. :meth:`to_dict` output); ``extends`` is not followed."""
        data = dict(data)
        if "extends" in data:
            raise _error("extends", source, "is only followed when loading a file (use load_recipe)")
        return _validate(data, {}, source, [source])


# --------------------------------------------------------------------------- value checks
_BAD = object()
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               dict: "a table", Any: "any value"}


def _arms(hint: Any) -> tuple[Any, ...]:
    """The members of a union hint (``str | None`` -> ``(str, NoneType)``), else ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint``, or ``_BAD``. bool is never an int; ints are valid floats."""
    if len(_arms(hint)) > 1:
        for arm in _arms(hint):
            out = _coerce(value, arm)
            if out is not _BAD:
                return out
        return _BAD
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if isinstance(value, bool) or value is None:
        # TOML has no null: an Optional field is left at None by leaving the key out.
        return _BAD
    if hint is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _BAD
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _BAD
        items = [_coerce(v, typing.get_args(hint)[0]) for v in value]
        return _BAD if any(v is _BAD for v in items) else items
    if hint is dict or origin is dict:
        return dict(value) if isinstance(value, Mapping) else _BAD
    return _BAD


def _describe(hint: Any, choices: Sequence[str] = ()) -> str:
    """Human words for a hint: ``"all", "last" or a list of integers``."""
    words: list[str] = []
    for arm in _arms(hint):
        if arm is type(None):
            continue
        if arm is str and choices:
            words += [f'"{c}"' for c in choices]
        elif typing.get_origin(arm) is list:
            inner = _TYPE_WORDS.get(typing.get_args(arm)[0], "values")
            words.append("a list of " + inner.replace("an integer", "integers").replace("a number", "numbers"))
        else:
            words.append(_TYPE_WORDS.get(typing.get_origin(arm) or arm, getattr(arm, "__name__", str(arm))))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_value(value: Any, hint: Any, checks: Mapping[str, Any] | None = None) -> Any:
    """``value`` converted to the type ``hint`` and checked against ``checks``; ``ValueError`` if not.

    ``checks``: ``choices`` (allowed strings), ``min`` / ``max`` (inclusive) and ``gt`` (exclusive)
    bounds for numbers and list entries, ``unique`` (no repeated list entries). Lists must be non-empty.
    The message reads on from the key ("must be ...") so callers prefix the key and the file.
    """
    checks = checks or {}
    choices = checks.get("choices", ())
    out = _coerce(value, hint)
    if out is _BAD:
        optional = " (leave the key out for none)" if type(None) in _arms(hint) else ""
        raise ValueError(f"must be {_describe(hint, choices)}{optional}, got {_show(value)}")
    if isinstance(out, str) and choices and out not in choices:
        close = difflib.get_close_matches(out, choices, n=1)
        hint_ = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"must be {_describe(hint, choices)}, got {out!r}{hint_}")
    numbers = out if isinstance(out, list) else [out]
    must = "entries must be" if isinstance(out, list) else "must be"
    for x in numbers:
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        if not math.isfinite(x):
            raise ValueError(f"{must} finite, got {out!r}")
        if "min" in checks and x < checks["min"]:
            raise ValueError(f"{must} >= {checks['min']}, got {out!r}")
        if "max" in checks and x > checks["max"]:
            raise ValueError(f"{must} <= {checks['max']}, got {out!r}")
        if "gt" in checks and x <= checks["gt"]:
            raise ValueError(f"{must} > {checks['gt']}, got {out!r}")
    if isinstance(out, list):
        if not out:
            raise ValueError("must not be an empty list")
        if checks.get("unique") and len(set(out)) != len(out):
            raise ValueError(f"must not repeat entries, got {out!r}")
    return out


# --------------------------------------------------------------------------- keys and errors
def _error(key: str, where: str, problem: str) -> RecipeError:
    return RecipeError(f"recipe key {key!r} in {where}: {problem}")


def _schema_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys += _schema_keys(hint, prefix + name + ".")
    return keys


@functools.lru_cache(maxsize=None)
def _train_hints() -> dict[str, Any]:
    """Type hints of the TrainConfig fields a recipe may set (imported lazily: it pulls in torch)."""
    from kd_detr.engine.trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in CLI_FIELDS}


def _all_keys() -> list[str]:
    keys = ["name", "description", "extends", "train", *SECTIONS] + ["train." + k for k in _train_hints()]
    for name, cls in SECTIONS.items():
        keys += _schema_keys(cls, name + ".")
    return keys


def _unknown(key: str, valid_here: Sequence[str], where: str) -> RecipeError:
    """Unknown-key error suggesting close spellings here and same-named keys in other tables."""
    prefix, _, leaf = key.rpartition(".")
    prefix = prefix + "." if prefix else ""
    close = [prefix + c for c in difflib.get_close_matches(leaf, valid_here, n=3)]
    elsewhere = [k for k in _all_keys() if k.rpartition(".")[2] == leaf and k != key]
    candidates = list(dict.fromkeys(close + elsewhere))
    if candidates:
        return _error(key, where, "unknown key; did you mean " + " or ".join(map(repr, candidates)) + "?")
    return _error(key, where, "unknown key; valid keys here: " + ", ".join(valid_here))


# --------------------------------------------------------------------------- validation
def _table(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _error(key, where, f"must be a table ([{key}]), got {_show(value)}")
    return value


def _build(cls: type, table: dict[str, Any], prefix: str, where: typing.Callable[[str], str]) -> Any:
    """Instantiate the dataclass ``cls`` from a TOML table, checking every key and value."""
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}"
        if name not in fields_:
            raise _unknown(key, list(fields_), where(key))
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], _table(value, key, where(key)), key, where)
            continue
        try:
            kwargs[name] = check_value(value, hints[name], fields_[name].metadata)
        except ValueError as e:
            raise _error(key, where(key), str(e)) from None
    return cls(**kwargs)


def _build_train(table: dict[str, Any], where: typing.Callable[[str], str]) -> dict[str, Any]:
    hints = _train_hints()
    out = {}
    for name, value in table.items():
        key = f"train.{name}"
        if name in CLI_FIELDS:
            raise _error(key, where(key), "is given on the command line, not in a recipe "
                                          "(recipes are shared across students and data sets)")
        if name not in hints:
            raise _unknown(key, list(hints), where(key))
        try:
            out[name] = check_value(value, hints[name], _TRAIN_CHECKS.get(name))
        except ValueError as e:
            raise _error(key, where(key), str(e)) from None
    return out


def _validate(data: dict[str, Any], origins: dict[str, str], source: str, chain: list[str]) -> Recipe:
    """Turn merged recipe data into a :class:`Recipe`; ``origins`` maps dotted keys to their file."""

    def where(key: str) -> str:
        return origins.get(key, source)

    top = ["name", "description", "train", *SECTIONS]
    for key in data:
        if key not in top:
            raise _unknown(key, top, where(key))
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise _error(key, where(key), f"must be a string, got {_show(data[key])}")
    sections = {name: _build(cls, _table(data.get(name, {}), name, where(name)), name, where)
                for name, cls in SECTIONS.items()}
    distill = sections["distill"]
    if distill.enabled and not (distill.adaptive or distill.fixed):
        files = " and ".join(dict.fromkeys([where("distill.adaptive"), where("distill.fixed")]))
        raise _error("distill.adaptive", files,
                     "distill.adaptive and distill.fixed are both false, so nothing would be distilled; "
                     "set distill.enabled = false to train the student alone")
    return Recipe(
        name=data.get("name", Path(source).stem),
        description=data.get("description", ""),
        train=_build_train(_table(data.get("train", {}), "train", where("train")), where),
        **sections,
        source=source,
        chain=chain,
    )


# --------------------------------------------------------------------------- files, extends, overrides
def recipe_dirs() -> list[Path]:
    """Folders searched for recipes by name: ``$KD_DETR_RECIPES`` (``os.pathsep``-separated) first."""
    extra = [Path(p).expanduser() for p in os.environ.get("KD_DETR_RECIPES", "").split(os.pathsep) if p]
    return [*extra, RECIPE_DIR]


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or os.sep in text


def list_recipes() -> dict[str, str]:
    """Recipe names (file stems) in the recipe folders -> the first line of their description."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else ():
            if path.stem.lower() != "readme":
                found.setdefault(path.stem, path)  # earlier folders shadow later ones
    out = {}
    for name in sorted(found):
        try:
            desc = _read_toml(found[name]).get("description", "")
        except RecipeError as e:
            desc = f"(unreadable: {e})"
        out[name] = str(desc).strip().splitlines()[0] if str(desc).strip() else ""
    return out


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """The recipe file for a name (``recipes/NAME.toml``) or a path to a ``.toml`` file."""
    text = os.fspath(name_or_path)
    if _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return path.resolve()
    for folder in recipe_dirs():
        if (folder / f"{text}.toml").is_file():
            return (folder / f"{text}.toml").resolve()
    folders = ", ".join(str(d) for d in recipe_dirs())
    raise RecipeError(f"unknown recipe {text!r}; available: {', '.join(list_recipes()) or 'none'} "
                      f"(searched {folders}; a path to a .toml file also works)")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None


def _record(origins: dict[str, str], data: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Remember which file (or ``--set``) each dotted key came from, for error messages."""
    for k, v in data.items():
        origins[prefix + k] = where
        if isinstance(v, Mapping):
            _record(origins, v, where, prefix + k + ".")


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key, everything else (lists too) is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_extends(parent: Any, child: Path) -> Path:
    """``extends`` value -> file: a path (relative to the child's folder) or a recipe name (the child's
    folder first, so a folder of private recipes can extend each other, then the recipe folders)."""
    if not isinstance(parent, str):
        raise _error("extends", str(child), f"must be a recipe name or a .toml path, got {_show(parent)}")
    if _looks_like_path(parent):
        path = Path(parent).expanduser()
        path = path if path.is_absolute() else child.parent / path
        if not path.is_file():
            raise _error("extends", str(child), f"recipe file {path} does not exist")
        return path.resolve()
    if (child.parent / f"{parent}.toml").is_file():
        return (child.parent / f"{parent}.toml").resolve()
    try:
        return find_recipe(parent)
    except RecipeError as e:
        raise _error("extends", str(child), str(e)) from None


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str], list[Path]]:
    """(merged data, key origins, files leaf-first) for ``path`` with its ``extends`` chain resolved."""
    path = path.resolve()
    if path in seen:
        cycle = " -> ".join(p.name for p in (*seen, path))
        raise RecipeError(f"'extends' cycle: {cycle} ({path.parent})")
    own = _read_toml(path)
    parent = own.pop("extends", None)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    chain: list[Path] = []
    if parent is not None:
        merged, origins, chain = _load_chain(_resolve_extends(parent, path), (*seen, path))
        # name and description describe one file: a child never inherits its parent's
        merged.pop("name", None)
        merged.pop("description", None)
    _record(origins, own, str(path))
    return _deep_merge(merged, own), origins, [path, *chain]


def parse_override(text: str) -> tuple[str, Any]:
    """``"dotted.key=value"`` -> ``(key, value)``; the value is read as TOML, else kept as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected dotted.key=value, e.g. distill.pred.temperature=2")
    try:
        parsed = tomllib.loads("v = " + raw)
    except tomllib.TOMLDecodeError:
        parsed = {}
    # a bare word (cuda:0, last) is not TOML: take it as the string the user meant
    return key, parsed["v"] if list(parsed) == ["v"] else raw.strip()


def _apply_overrides(data: dict[str, Any], origins: dict[str, str],
                     overrides: Sequence[str] | Mapping[str, Any]) -> None:
    if isinstance(overrides, str):
        overrides = [overrides]
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        parts = key.split(".")
        if parts[0] == "extends":
            raise _error(key, "--set", "can only be given in a recipe file")
        if not all(parts):
            raise _error(key, "--set", "is not a valid dotted key")
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _error(".".join(parts[: i + 1]), origins.get(".".join(parts[: i + 1]), "--set"),
                             f"is not a table, so --set {key} cannot apply")
        node[parts[-1]] = value
        origins[key] = "--set"
        if isinstance(value, Mapping):
            _record(origins, value, "--set", key + ".")


def load_recipe(name_or_path: str | os.PathLike,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> Recipe:
    """Load, merge (``extends``), override (``--set``) and validate a recipe.

    Args:
        name_or_path: a recipe name (``recipes/NAME.toml`` or ``$KD_DETR_RECIPES``) or a ``.toml`` path.
        overrides: ``"dotted.key=value"`` strings (TOML values; unparsable ones are strings), or a
            mapping of dotted keys to Python values.
    """
    path = find_recipe(name_or_path)
    data, origins, chain = _load_chain(path)
    _apply_overrides(data, origins, overrides)
    return _validate(data, origins, str(path), [str(p) for p in chain])


# --------------------------------------------------------------------------- TOML writer
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    out = (_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in s)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _write_table(lines: list[str], table: Mapping[str, Any], path: list[str]) -> None:
    if path:
        lines += ["", "[" + ".".join(map(_toml_key, path)) + "]"]
    # a table's own keys must come before its sub-tables' headers
    for k, v in table.items():
        if not isinstance(v, Mapping):
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in table.items():
        if isinstance(v, Mapping):
            _write_table(lines, v, [*path, k])


def recipe_to_toml(d: Mapping[str, Any]) -> str:
    """TOML text for a nested dict of str/int/float/bool/lists (``tomllib.loads`` gives ``d`` back)."""
    lines: list[str] = []
    _write_table(lines, d, [])
    return "\n".join(lines).lstrip("\n") + "\n"
