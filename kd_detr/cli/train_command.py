"""``kd-detr train``: a detector trained on ground truth alone. Its options are :class:`TrainConfig` fields
of the same name except those in :data:`RENAMED` and :data:`NEGATED`; :mod:`kd_detr.runs.assemble` builds
the run, as for ``kd-detr distill``."""

from __future__ import annotations

from typing import Any

from pathlib import Path

import click

from .group import main
from .options import data_options, partial_weights_option, student_overrides

__all__ = ["RENAMED", "NEGATED", "train_config_fields", "train_cmd"]

# `kd-detr train`'s options whose TrainConfig field has another name (model_opt: KEY=VALUE pairs, parsed below)
RENAMED = {"model_name": "model", "model_opt": "model_overrides"}
# --no-X flags: the field they switch off
NEGATED = {"no_augment": "augment", "no_aux_loss": "aux_loss", "no_progress": "progress"}


def train_config_fields(options: dict[str, Any]) -> dict[str, Any]:
    """``TrainConfig`` field -> value of ``kd-detr train``'s click ``options`` (keyed by parameter name), with
    ``model_overrides`` parsed from ``--model-opt`` (and ``--allow-partial-weights``, which is no field)."""
    options = dict(options)
    allow_partial = options.pop("allow_partial_weights")
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if name in NEGATED:
            fields[NEGATED[name]] = not value
        else:
            fields[RENAMED.get(name, name)] = value
    fields["model_overrides"] = student_overrides(fields["model"], fields["model_overrides"], "--model-opt",
                                                  allow_partial)
    return fields


def _backbone_weights(ctx, param, value):
    """``--backbone-weights``: ``imagenet`` or an existing file."""
    if value is None or value == "imagenet" or Path(value).is_file():
        return value
    raise click.BadParameter(f"{value!r} is neither a file nor 'imagenet'")


@main.command("train")
@click.option("--model", "model_name", default="cond_detr_r18_tiny", show_default=True)
@click.option("--model-opt", multiple=True, metavar="KEY=VALUE",
              help="Override a model config field (repeatable), e.g. --model-opt num_queries=30; a transformers "
                   "model's nested field by its dotted path, e.g. backbone_config.depths=[2,2,2,2].")
@click.option("--backbone-weights", default=None, metavar="PATH|imagenet", callback=_backbone_weights,
              help="torchvision ImageNet ResNet weights for the backbone: a local file, or 'imagenet' for "
                   "torchvision's (IMAGENET1K_V1, as the official code), downloaded on first use into KD_DETR_HOME.")
@click.option("--init-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from these weights (kd-detr .safetensors or official .pth).")
@data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default="contiguous", show_default=True,
              help="Class indices: the data's categories numbered 0..K-1, or COCO ids as indices (official 91 slots).")
@click.option("--no-augment", is_flag=True, help="Train on the eval resize only (no flip/crop/multi-scale).")
@click.option("--preset", default="auto", show_default=True,
              help="Training preset: auto (the student family's: rt_detr, rt_detr_v2, d_fine, deimv2, lw_detr; "
                   "official for the others), official (Conditional DETR's recipe) or a family's name. It fills "
                   "every option below left unset; `kd-detr presets` lists them.")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Images per process.")
@click.option("--lr", type=float, default=None, help="Base learning rate [default: the preset's; official 1e-4].")
@click.option("--lr-backbone", type=float, default=None, help="Backbone learning rate [default: the preset's; "
              "official 1e-5].")
@click.option("--weight-decay", type=float, default=None, help="[default: the preset's; official 1e-4]")
@click.option("--clip-max-norm", type=float, default=None, help="[default: the preset's; official 0.1]")
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--max-iters", type=int, default=None, help="Iteration budget (overrides --epochs).")
@click.option("--lr-drop", type=int, default=None, help="Epoch after which lr x0.1 [default: the preset's; official 40].")
@click.option("--lr-drop-iter", type=int, default=None, help="Iteration after which lr x0.1 (wins over --lr-drop).")
@click.option("--warmup-iters", type=int, default=None, help="[default: the preset's; official 0]")
@click.option("--schedule", type=click.Choice(["step", "flat_cosine"]), default=None,
              help="Learning-rate schedule [default: the preset's; official step].")
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--ema/--no-ema", default=None,
              help="Keep an exponential moving average of the weights; it is evaluated (the run's AP), saved as "
                   "model_best/model_final and exported (the raw weights are evaluated beside it) [default: the "
                   "preset's; official off].")
@click.option("--ema-decay", type=float, default=None, help="EMA decay [default: the preset's, 0.9999].")
@click.option("--ema-warmup", type=int, default=None,
              help="EMA ramp in updates: decay * (1 - exp(-updates / N)) [default: the preset's].")
@click.option("--output-dir", default="runs/train", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Iterations.")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True,
              help="Checkpoints kept in OUTPUT_DIR/checkpoints (0 keeps every one).")
@click.option("--eval-every-epochs", type=int, default=1, show_default=True)
@click.option("--eval-every-iters", type=int, default=None)
@click.option("--eval-batch-size", type=int, default=2, show_default=True)
@click.option("--eval-max-images", type=int, default=None, help="Evaluate on the first N validation images.")
@click.option("--resume", default=None, help="'auto' (latest in --output-dir) or a checkpoint path.")
@click.option("--no-aux-loss", is_flag=True, help="Supervise the last decoder layer only.")
@click.option("--deterministic", is_flag=True, help="torch.use_deterministic_algorithms (warn-only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@partial_weights_option
def train_cmd(**options: Any) -> None:
    """Train a detector on ground truth alone, by its family's training preset (`kd-detr presets`; Conditional
    DETR's official recipe for kd-detr's models). Multi-GPU: torchrun --nproc_per_node N -m kd_detr train ..."""
    from kd_detr.data import DataSpec
    from kd_detr.runs.assemble import assemble_train_run

    fields = train_config_fields(options)
    data = DataSpec(**{name: fields.pop(name) for name in DataSpec.__dataclass_fields__})
    run = assemble_train_run(fields.pop("model"), data, fields.pop("output_dir"),
                             model_overrides=fields.pop("model_overrides"), resume=fields.pop("resume"),
                             train_options=fields)
    metrics = run.run()
    if metrics:
        click.echo(f"final AP {100 * metrics['AP']:.1f} (best {100 * metrics['best_ap']:.1f}); "
                   f"outputs in {run.cfg.output_dir}")
