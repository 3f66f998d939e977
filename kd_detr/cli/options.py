"""Options and values shared by several ``kd-detr`` commands: the data options, ``--allow-partial-weights``,
``KEY=VALUE`` model overrides and comma-separated seeds."""

from __future__ import annotations

import json
from typing import Any

import click


def parse_overrides(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they parse (numbers, bools, lists), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint=option)
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_seeds(text: str, option: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a one-line usage error naming ``option`` otherwise."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"expected distinct comma-separated integers, got {text!r}", param_hint=option)
    return seeds


def partial_weights_option(f):
    """``--allow-partial-weights`` (train, distill, compare, cache)."""
    return click.option(
        "--allow-partial-weights", is_flag=True,
        help="Let a transformers (hf:DIR) model load although tensors of its folder are missing, unexpected or "
             "mis-shaped (those are re-initialised at random; recorded in the run). Without it a teacher must "
             "load every tensor, and a student may re-initialise only its class head.")(f)


def teacher_precision_option(f):
    """``--teacher-precision`` (distill, compare, cache): the teacher's forward dtype, the same in every source."""
    return click.option(
        "--teacher-precision", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
        show_default=True,
        help="The dtype the teacher runs at (autocast; outputs float32), the same in process, in Ray actors and "
             "in a cache build, whatever the student's --amp. A cache records it; distilling from a cache needs "
             "the same value.")(f)


def is_hf_model(name: str | None) -> bool:
    """Whether ``name`` is a transformers model (``hf:DIR`` or a registered tiny transformers model)."""
    from kd_detr.models.hf import is_hf_name

    return bool(name) and is_hf_name(name)


def student_overrides(student: str, student_opt: tuple[str, ...], option: str, allow_partial: bool,
                      teacher: str | None = None) -> dict[str, Any]:
    """``--student-opt`` / ``--model-opt`` pairs, plus ``allow_partial_weights`` for a transformers student.
    kd-detr's own loaders are always strict, so the flag must reach a transformers model: the student, or the
    ``teacher`` of a distillation (which gets it through its spec)."""
    overrides = parse_overrides(student_opt, option)
    if allow_partial:
        if is_hf_model(student):
            overrides["allow_partial_weights"] = True
        elif not is_hf_model(teacher):
            raise click.UsageError("--allow-partial-weights relaxes the loading of transformers models (hf:DIR); "
                                   f"{student!r}{' and ' + repr(teacher) if teacher else ''} load strictly as "
                                   "kd-detr models")
    return overrides


skip_bad_labels_option = click.option(
    "--skip-bad-labels", is_flag=True, default=False,
    help="YOLO data: skip (and count) label lines with a wrong field count, a class outside names, coordinates "
         "outside [0, 1] or zero size, instead of stopping at the first one.")


def data_options(f):
    """Where the data is (``--data`` or per-split paths), ``--image-size`` and ``--num-workers``: the
    fields of :class:`~kd_detr.data.DataSpec` (train, distill, compare, eval)."""
    opts = [
        click.option("--data", type=click.Path(exists=True), default=None,
                     help="COCO tree (annotations/instances_{train,val}2017.json, train2017/, val2017/) or a YOLO "
                          "data set (its data.yaml, or the folder holding it: images/, labels/, names)."),
        click.option("--train-ann", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Custom training annotation JSON (with --train-images)."),
        click.option("--train-images", type=click.Path(exists=True, file_okay=False), default=None),
        click.option("--val-ann", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Custom validation annotation JSON (with --val-images)."),
        click.option("--val-images", type=click.Path(exists=True, file_okay=False), default=None),
        click.option("--image-size", type=int, default=None,
                     help="Small-image preset S (e.g. 128): DETR sizes scaled by S/800. Default: official sizes "
                          "(800, max 1333); eval: the checkpoint's training preset."),
        click.option("--num-workers", type=int, default=2, show_default=True),
        skip_bad_labels_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f
