"""Recipes: TOML files saying how a student is trained and which methods it learns with.

A recipe has top-level ``name``, ``description``, an optional ``extends`` and tables: ``[train]``
(:class:`~kd_detr.engine.trainer.TrainConfig` fields that are not given on the command line), one table
per registered method (``[distill]``, ``[ms_detr]``, ``[co_detr]``: the method's config dataclass, see
:mod:`kd_detr.methods`) and ``[teacher_check]`` (:class:`~kd_detr.teacher.checks.TeacherCheck`). Every
field has a default, so a recipe lists only what differs. The loader only composes the registered
sections; the contract is ``docs/distillation.md`` ("Recipes").

Loading (:func:`load_recipe`): find the file (:data:`kd_detr.zoo.RECIPES`: ``$KD_DETR_RECIPES``, then the
recipes shipped with the package), follow ``extends`` (deep merge, child over parent), apply ``--set
dotted.key=value`` overrides, then validate into the dataclasses. Every problem is a :class:`RecipeError`
naming the dotted key and the file it came from (or ``--set``), because a typo in a recipe must never
silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_detr.errors import UserError
from kd_detr.schema import check_value, show_value, tomllib
from kd_detr.zoo import RECIPES

__all__ = [
    "Recipe",
    "RecipeError",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "parse_override",
    "recipe_dirs",
    "recipe_to_toml",
    "sections",
]

# TrainConfig fields that describe *this* run (model, data, where it goes): the command line gives
# them, so a recipe stays reusable across students and data sets.
CLI_FIELDS = ("model", "model_overrides", "data", "train_ann", "train_images", "val_ann", "val_images",
              "output_dir", "resume")


class RecipeError(UserError, ValueError):
    """An invalid recipe: the message names the dotted key and the file (or ``--set``)."""


# --------------------------------------------------------------------------- schema
def sections() -> dict[str, type]:
    """Sections of a recipe beside ``[train]``: one per registered method (its config dataclass, in
    registration order), then ``[teacher_check]``. Each is validated field by field."""
    from kd_detr.methods import list_methods
    from kd_detr.teacher.checks import TeacherCheck

    return {**{name: cls.config_class for name, cls in list_methods().items()}, "teacher_check": TeacherCheck}


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
    defaults); ``sections`` every other section's config (``recipe.distill``, ``recipe.ms_detr``, ... read
    them as attributes); ``source`` is the recipe file; ``chain`` the files merged, this one first, then its
    parent, grandparent ...
    """

    name: str
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    chain: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, cls in sections().items():  # every section present, at its defaults unless given
            self.sections.setdefault(name, cls())

    def __getattr__(self, name: str) -> Any:
        sections_ = self.__dict__.get("sections") or {}
        if name in sections_:
            return sections_[name]
        raise AttributeError(f"recipe has no section or attribute {name!r}")

    @property
    def distils(self) -> bool:
        """A method of the recipe needs a teacher."""
        from kd_detr.methods import list_methods

        return any(cls.uses_teacher and cls.enabled(self.sections[name]) for name, cls in list_methods().items())

    def to_dict(self) -> dict[str, Any]:
        """The merged recipe with every section's fields (TOML-writable, no ``extends``)."""
        return {
            "name": self.name,
            "description": self.description,
            "train": dict(self.train),
            **{name: dataclasses.asdict(self.sections[name]) for name in sections()},
        }

    def train_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``TrainConfig`` (the recipe's ``[train]`` values)."""
        return dict(self.train)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Recipe:
        """Validate a recipe given as a dict (e.g. :meth:`to_dict` output); ``extends`` is not followed."""
        data = dict(data)
        if "extends" in data:
            raise _error("extends", source, "is only followed when loading a file (use load_recipe)")
        return _validate(data, {}, source, [source])


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
    from .train_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in CLI_FIELDS}


def _all_keys() -> list[str]:
    keys = ["name", "description", "extends", "train", *sections()] + ["train." + k for k in _train_hints()]
    for name, cls in sections().items():
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
        raise _error(key, where, f"must be a table ([{key}]), got {show_value(value)}")
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

    top = ["name", "description", "train", *sections()]
    for key in data:
        if key not in top:
            raise _unknown(key, top, where(key))
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise _error(key, where(key), f"must be a string, got {show_value(data[key])}")
    built = {name: _build(cls, _table(data.get(name, {}), name, where(name)), name, where)
             for name, cls in sections().items()}
    for name, cfg in built.items():  # checks across a section's fields, declared by its config class
        for keys, problem in getattr(cfg, "problems", lambda: [])():
            dotted = [f"{name}.{k}" for k in keys]
            raise _error(dotted[0], " and ".join(dict.fromkeys(where(k) for k in dotted)), problem)
    return Recipe(
        name=data.get("name", Path(source).stem),
        description=data.get("description", ""),
        train=_build_train(_table(data.get("train", {}), "train", where("train")), where),
        sections=built,
        source=source,
        chain=chain,
    )


# --------------------------------------------------------------------------- files, extends, overrides
def recipe_dirs() -> list[Path]:
    """Folders searched for recipes by name: ``$KD_DETR_RECIPES`` (``os.pathsep``-separated) first, then the
    recipes shipped with kd-detr."""
    return RECIPES.dirs()


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or os.sep in text


def list_recipes() -> dict[str, str]:
    """Recipe names (file stems) in the recipe folders -> the first line of their description."""
    out = {}
    for name in RECIPES.names():
        try:
            desc = _read_toml(RECIPES.find(name)).get("description", "")
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
    try:
        return RECIPES.require(text)
    except FileNotFoundError as e:
        raise RecipeError(f"{e}; a path to a .toml file also works") from None


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
        raise _error("extends", str(child), f"must be a recipe name or a .toml path, got {show_value(parent)}")
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
