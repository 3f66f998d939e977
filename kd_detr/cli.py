"""The ``kd-detr`` command line: options become specs (:class:`~kd_detr.data.DataSpec`,
:class:`~kd_detr.runs.assemble.TeacherSourceSpec`, ``TrainConfig``) and calls into :mod:`kd_detr.runs`,
the engine and the teacher layer; nothing is computed here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from kd_detr.runs.quickstart import TEACHER_ITERS as QUICKSTART_TEACHER_ITERS  # light: no torch at import

# `kd-detr cache`'s storage defaults: kd_detr.teacher.cache.attention_codec.DEFAULT_ATTENTION_SPEC /
# DEFAULT_CLASSES_SPEC, spelled out here so that `--help` does not import torch (a test asserts they agree)
DEFAULT_ATTENTION_SPEC = "topk:14"
DEFAULT_CLASSES_SPEC = "topk:4"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


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


class KdDetrGroup(click.Group):
    """Turns expected user errors (bad files, bad options) into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from kd_detr.errors import UserError

        try:
            return super().invoke(ctx)
        except (UserError, OSError, ValueError, KeyError) as e:
            # UserError: kd-detr's own (a teacher actor that keeps dying, a refused lock, ...); OSError:
            # FileNotFoundError, a full disk (their messages name the file); ValueError: bad content or options
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise click.ClickException(str(msg)) from e


@click.group(cls=KdDetrGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.version_option(package_name="kd-detr")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """kd-detr: knowledge distillation for DETR-style object detectors."""
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose)
    from kd_detr.dependencies import untested_warnings

    for line in untested_warnings():
        logging.getLogger("kd_detr").warning(line)


# --------------------------------------------------------------------------- models / convert
@main.command("models")
def models_cmd() -> None:
    """List the registered model architectures."""
    from kd_detr.models import list_models

    for name, desc in list_models().items():
        click.echo(f"{name:24s} {desc}")


@main.command("convert")
@click.option("--from-official", "official", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Official Conditional DETR checkpoint (.pth holding {'model': state_dict}).")
@click.option("--from-hf", "hf", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Hugging Face ConditionalDetrForObjectDetection weights (model.safetensors or pytorch_model.bin).")
@click.option("--model", "model_name", required=True, help="Registered architecture, e.g. cond_detr_r50.")
@click.option("--model-opt", multiple=True, metavar="KEY=VALUE",
              help="Override a model config field (repeatable), for checkpoints of non-registry variants.")
@click.option("--num-classes", type=int, default=None,
              help="Number of class logits (default: read from the checkpoint; 91 for the official COCO models).")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False), default=None,
              help="COCO JSON whose categories label the class slots (default: slot i is COCO category id i).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
def convert_cmd(official: str | None, hf: str | None, model_name: str, model_opt: tuple[str, ...],
                num_classes: int | None, annotations: str | None, out: str) -> None:
    """Convert official (or Hugging Face) Conditional DETR weights to kd-detr's safetensors format.

    The load is strict: every tensor used, none missing, shapes checked; offending keys are named.
    """
    from kd_detr.data import COCO_CATEGORIES, LabelMap, read_categories
    from kd_detr.models import convert_official

    if (official is None) == (hf is None):
        raise click.UsageError("give exactly one of --from-official and --from-hf")
    categories = read_categories(annotations) if annotations else COCO_CATEGORIES

    def label_map(n: int) -> LabelMap:  # class slots are COCO category ids in these checkpoints
        return LabelMap.raw_ids([c for c in categories if c["id"] < n], num_classes=n)

    model = convert_official(official or hf, model_name, num_classes, out, label_map=label_map,
                             fmt="official" if official else "hf", **parse_overrides(model_opt, "--model-opt"))
    n = model.config.num_classes
    click.echo(f"wrote {out} ({model_name}, {n} class slots, label map: {label_map(n)!r})")


# --------------------------------------------------------------------------- data
@main.group("data")
def data_group() -> None:
    """Data sets: the synthetic COCO-format generator."""


@data_group.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (COCO tree).")
@click.option("--train", "num_train", type=int, default=1000, show_default=True, help="Training images.")
@click.option("--val", "num_val", type=int, default=200, show_default=True, help="Validation images.")
@click.option("--image-size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--objects-per-image", nargs=2, type=int, default=(1, 8), show_default=True, metavar="MIN MAX",
              help="Objects per non-empty image.")
@click.option("--clutter", type=float, default=1.0, show_default=True,
              help="Background noise, lines and distractors: 0 = plain gradient.")
@click.option("--min-object-size", type=float, default=None,
              help="Smallest object side in pixels [default: max(8, 0.08 x image size)].")
@click.option("--class-colours", is_flag=True,
              help="Each category in its own colour on a grey background (the quickstart's easier task).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out generated with other parameters.")
def synth_cmd(out: str, num_train: int, num_val: int, image_size: int, seed: int, objects_per_image, clutter: float,
              min_object_size, class_colours: bool, overwrite: bool) -> None:
    """Write a synthetic COCO-format detection data set (deterministic for a seed)."""
    from kd_detr.data import generate_synthetic

    try:
        generate_synthetic(out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                           objects_per_image=tuple(objects_per_image), clutter=clutter,
                           min_object_size=min_object_size, class_colours=class_colours, overwrite=overwrite)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    except FileExistsError as e:
        raise click.UsageError(f"{out} exists and was generated with other parameters; pass --overwrite to "
                               "replace it") from e
    click.echo(f"wrote {num_train} train / {num_val} val images to {out}")


# --------------------------------------------------------------------------- train
def _partial_weights_option(f):
    return click.option(
        "--allow-partial-weights", is_flag=True,
        help="Let a transformers (hf:DIR) model load although tensors of its folder are missing, unexpected or "
             "mis-shaped (those are re-initialised at random; recorded in the run). Without it a teacher must "
             "load every tensor, and a student may re-initialise only its class head.")(f)


def _is_hf(name: str | None) -> bool:
    from kd_detr.models.hf import is_hf_name

    return bool(name) and is_hf_name(name)


def _student_overrides(student: str, student_opt: tuple[str, ...], option: str, allow_partial: bool,
                       teacher: str | None = None) -> dict[str, Any]:
    """``--student-opt`` / ``--model-opt`` pairs, plus ``allow_partial_weights`` for a transformers student.
    kd-detr's own loaders are always strict, so the flag must reach a transformers model: the student, or the
    ``teacher`` of a distillation (which gets it through its spec)."""
    overrides = parse_overrides(student_opt, option)
    if allow_partial:
        if _is_hf(student):
            overrides["allow_partial_weights"] = True
        elif not _is_hf(teacher):
            raise click.UsageError("--allow-partial-weights relaxes the loading of transformers models (hf:DIR); "
                                   f"{student!r}{' and ' + repr(teacher) if teacher else ''} load strictly as "
                                   "kd-detr models")
    return overrides


def _data_options(f):
    opts = [
        click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
                     help="COCO tree: annotations/instances_{train,val}2017.json, train2017/, val2017/."),
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
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command("train")
@click.option("--model", "model_name", default="cond_detr_r18_tiny", show_default=True)
@click.option("--model-opt", multiple=True, metavar="KEY=VALUE",
              help="Override a model config field (repeatable), e.g. --model-opt num_queries=30.")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local torchvision ImageNet ResNet weights for the backbone.")
@click.option("--init-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from these weights (kd-detr .safetensors or official .pth).")
@_data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default="contiguous", show_default=True,
              help="Class indices: the data's categories numbered 0..K-1, or COCO ids as indices (official 91 slots).")
@click.option("--no-augment", is_flag=True, help="Train on the eval resize only (no flip/crop/multi-scale).")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Images per process.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-backbone", type=float, default=1e-5, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--clip-max-norm", type=float, default=0.1, show_default=True)
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--max-iters", type=int, default=None, help="Iteration budget (overrides --epochs).")
@click.option("--lr-drop", type=int, default=40, show_default=True, help="Epoch after which lr x0.1.")
@click.option("--lr-drop-iter", type=int, default=None, help="Iteration after which lr x0.1 (wins over --lr-drop).")
@click.option("--warmup-iters", type=int, default=0, show_default=True)
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
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
@_partial_weights_option
def train_cmd(model_name, model_opt, backbone_weights, init_checkpoint, data, train_ann, train_images, val_ann,
              val_images, image_size, label_map, num_workers, no_augment, batch_size, lr, lr_backbone, weight_decay,
              clip_max_norm, epochs, max_iters, lr_drop, lr_drop_iter, warmup_iters, amp, output_dir, seed,
              device, log_every, checkpoint_every, keep_checkpoints, eval_every_epochs, eval_every_iters,
              eval_batch_size, eval_max_images, resume, no_aux_loss, deterministic, no_progress,
              allow_partial_weights) -> None:
    """Train a Conditional DETR (official recipe by default). Multi-GPU: torchrun --nproc_per_node N -m kd_detr train ..."""
    from kd_detr.engine.trainer import TrainConfig, train

    cfg = TrainConfig(
        model=model_name,
        model_overrides=_student_overrides(model_name, model_opt, "--model-opt", allow_partial_weights),
        backbone_weights=backbone_weights, init_checkpoint=init_checkpoint, data=data, train_ann=train_ann,
        train_images=train_images, val_ann=val_ann, val_images=val_images, image_size=image_size,
        label_map=label_map, num_workers=num_workers, augment=not no_augment, batch_size=batch_size, lr=lr, lr_backbone=lr_backbone,
        weight_decay=weight_decay, clip_max_norm=clip_max_norm, epochs=epochs, max_iters=max_iters,
        lr_drop=lr_drop, lr_drop_iter=lr_drop_iter, warmup_iters=warmup_iters, amp=amp, output_dir=output_dir,
        seed=seed, device=device, log_every=log_every, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        eval_every_epochs=eval_every_epochs, eval_every_iters=eval_every_iters, eval_batch_size=eval_batch_size,
        eval_max_images=eval_max_images, resume=resume, aux_loss=not no_aux_loss, deterministic=deterministic,
        progress=not no_progress)
    metrics = train(cfg)
    if metrics:
        click.echo(f"final AP {100 * metrics['AP']:.1f} (best {100 * metrics['best_ap']:.1f}); "
                   f"outputs in {output_dir}")


# --------------------------------------------------------------------------- distillation
@main.command("recipes")
@click.argument("name", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field (dotted key, TOML value), e.g. distill.pred.temperature=2.")
def recipes_cmd(name: str | None, overrides: tuple[str, ...]) -> None:
    """List the distillation recipes, or print NAME merged with its defaults (and --set overrides)."""
    from kd_detr.engine.recipe import list_recipes, load_recipe, recipe_to_toml

    from kd_detr.methods import list_methods

    if name is None:
        if overrides:
            raise click.UsageError("--set needs a recipe NAME")
        for rname, desc in list_recipes().items():
            click.echo(f"{rname:24s} {desc}")
        methods = ", ".join(f"[{section}] {cls.__name__}" for section, cls in list_methods().items())
        click.echo(f"\nmethods (recipe sections): {methods}")
        return
    recipe = load_recipe(name, overrides)
    on = [section for section, cls in list_methods().items() if cls.enabled(recipe.sections[section])]
    click.echo(f"# recipe {recipe.name} from {' <- '.join(recipe.chain)}")
    click.echo(f"# methods: {', '.join(on) or 'none (ground-truth loss only)'}")
    click.echo(recipe_to_toml(recipe.to_dict()), nl=False)


@main.command("distill")
@click.option("--teacher", default=None,
              help="Teacher card name (teachers/NAME.toml) or a registered model name with --teacher-checkpoint.")
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher weights (kd-detr .safetensors or official .pth); replaces a card's checkpoint.")
@click.option("--teacher-cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="Read the teacher's outputs from this cache (kd-detr cache); no teacher model is loaded.")
@click.option("--teacher-serve", type=click.Choice(["inprocess", "ray"]), default="inprocess", show_default=True,
              help="Run the teacher in this process, or in Ray actors ahead of the student.")
@click.option("--teacher-actors", type=int, default=1, show_default=True, help="Ray teacher actors (--teacher-serve ray).")
@click.option("--views", type=int, default=None,
              help="Train on K recorded views per image with fixed batches (the plan a cache is built on).")
@click.option("--view-seed", type=int, default=0, show_default=True, help="Seed of the view plan (--views).")
@click.option("--student", required=True, help="Student architecture, e.g. cond_detr_r50.")
@click.option("--student-opt", multiple=True, metavar="KEY=VALUE",
              help="Override a student model config field (repeatable).")
@click.option("--recipe", "recipe_name", default="d3etr", show_default=True,
              help="Recipe name (recipes/NAME.toml; see `kd-detr recipes`) or path to a recipe TOML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any recipe field, e.g. --set train.max_iters=1000 --set distill.self_attn.weight=2.")
@_data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default=None,
              help="Class indices (default: the recipe's train.label_map, contiguous).")
@click.option("--output-dir", default="runs/distill", show_default=True)
@click.option("--resume", default=None, help="'auto' (latest in --output-dir) or a checkpoint path.")
@click.option("--seed", type=int, default=None, help="Default: the recipe's train.seed (42).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the recipe's, auto).")
@click.option("--amp", is_flag=True, default=None, help="Mixed precision (CUDA only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_partial_weights_option
def distill_cmd(teacher, teacher_checkpoint, teacher_cache, teacher_serve, teacher_actors, views, view_seed, student,
                student_opt, recipe_name, overrides, data, train_ann,
                train_images, val_ann, val_images, image_size, num_workers, label_map, output_dir, resume, seed,
                device, amp, no_progress, allow_partial_weights) -> None:
    """Distil a teacher into a student with a recipe (D3ETR by default).

    The teacher runs in this process (eval mode, no gradients) on the student's padded batch. The
    schedule comes from the recipe's [train] section; the merged recipe is saved as
    OUTPUT_DIR/recipe.toml and in config.json with library versions and the git SHA.
    Multi-GPU: torchrun --nproc_per_node N -m kd_detr distill ...
    """
    from kd_detr.data import DataSpec
    from kd_detr.runs.assemble import TeacherSourceSpec, assemble_run

    if teacher_cache and teacher_serve == "ray":
        raise click.UsageError("--teacher-cache and --teacher-serve ray exclude each other")
    train_options = {"seed": seed, "device": device, "amp": amp, "num_workers": num_workers,
                     "progress": False if no_progress else None}
    run = assemble_run(student, recipe_name,
                       DataSpec(data, train_ann, train_images, val_ann, val_images, image_size, label_map),
                       TeacherSourceSpec(teacher=teacher, checkpoint=teacher_checkpoint, cache=teacher_cache,
                                         serve=teacher_serve, actors=teacher_actors,
                                         allow_partial_weights=allow_partial_weights),
                       output_dir,
                       student_overrides=_student_overrides(student, student_opt, "--student-opt",
                                                            allow_partial_weights, teacher),
                       overrides=overrides, train_options=train_options, resume=resume, views=views,
                       view_seed=view_seed)
    metrics = run.run()
    if metrics:
        click.echo(f"final AP {100 * metrics['AP']:.1f} (best {100 * metrics['best_ap']:.1f}); "
                   f"outputs in {output_dir}")


@main.group("cache", invoke_without_command=True)
@click.option("--teacher", default=None, help="Teacher card name, or a model name with --teacher-checkpoint.")
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="COCO tree whose training split is cached.")
@click.option("--train-ann", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--train-images", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--image-size", type=int, default=None, help="Small-image preset (as in distill); default official sizes.")
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default="contiguous", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Cache folder.")
@click.option("--views", type=int, default=4, show_default=True, help="Recorded augmentation views per image (K).")
@click.option("--view-seed", type=int, default=0, show_default=True)
@click.option("--actors", type=int, default=1, show_default=True, help="Ray teacher actors (one GPU each when GPUs exist).")
@click.option("--attention", default=DEFAULT_ATTENTION_SPEC, show_default=True,
              help="none | full | topk:K[:REST] (keys kept per query row; the others rebuilt from REST = uniform, "
                   "the row's remaining mass spread evenly (default), or renorm).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--heads", type=click.Choice(["mean", "per_head"]), default="mean", show_default=True,
              help="Store attention maps averaged over heads or per head.")
@click.option("--classes", default=DEFAULT_CLASSES_SPEC, show_default=True,
              help="Class logits: dense | topk:K | topk:K:REST (each query's K largest logits; the other "
                   "classes rebuilt from REST = floor | mean_logit | mean_prob, default mean_prob).")
@click.option("--images-per-shard", type=int, default=32, show_default=True,
              help="Image views per shard file (keep it when resuming). The cache holds one entry per image view: "
                   "students read it at any batch size.")
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--pipeline", type=click.Choice(["auto", "stream", "actor_pool"]), default="auto", show_default=True,
              help="stream: Ray Data decode tasks feeding the teacher actors; actor_pool: each actor decodes its "
                   "own shards; auto: stream when the cluster has GPUs, else actor_pool (faster on CPUs).")
@click.option("--teacher-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Image views per teacher-stage call of the stream pipeline (each still runs alone).")
@click.option("--no-progress", is_flag=True)
@_partial_weights_option
@click.pass_context
def cache_group(ctx, teacher, teacher_checkpoint, data, train_ann, train_images, image_size, label_map, out, views,
                view_seed, actors, attention, dtype, heads, classes, images_per_shard, address, pipeline,
                teacher_batch_size, no_progress, allow_partial_weights):
    """Precompute a teacher's decoder outputs on K recorded views per image into a safetensors cache.

    Resumable: rerunning skips finished shards. `kd-detr cache verify CACHE` checks it, `kd-detr cache
    info CACHE` describes it. Distil from it with `kd-detr distill --teacher-cache CACHE`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if teacher is None or out is None:
        raise click.UsageError("building a cache needs --teacher and --out (or a subcommand: verify, info)")
    from kd_detr.data import DataSpec
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher import check_teacher_fits, describe_teacher, resolve_teacher
    from kd_detr.teacher.cache import StoreConfig
    from kd_detr.teacher.cache.build import build_cache

    try:
        store = StoreConfig.parse(attention, dtype=dtype, heads=heads, classes=classes)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    spec = resolve_teacher(teacher, teacher_checkpoint, allow_partial_weights)
    dataset = DataSpec(data, train_ann, train_images, image_size=image_size, label_map=label_map).train_set()
    config, t_label_map, t_image_size = describe_teacher(spec, dataset.label_map)  # the actors load the weights
    check_teacher_fits(spec, t_label_map, t_image_size, dataset.label_map, config.num_classes, image_size)
    plan = ViewPlan.for_dataset(dataset, num_views=views, seed=view_seed)
    summary = build_cache(spec, dataset, plan, out, store, actors=actors, images_per_shard=images_per_shard,
                          address=address, progress=not no_progress, image_size=image_size, pipeline=pipeline,
                          teacher_batch_size=teacher_batch_size)
    if summary["images"]:
        done = (f"pipeline {summary['pipeline']}, {summary['images_per_s']:.1f} img/s, teacher actors "
                f"{100 * summary['actor_busy']:.0f}% busy")
    else:
        done = "complete, nothing to compute"
    click.echo(f"cache {out}: {done}; {summary}")


@cache_group.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also check the teacher checkpoint's SHA-256 against the manifest's.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="The data folder: the manifest's annotation file is hashed when it lies inside it.")
@click.option("--train-ann", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also check this annotation file's SHA-256 against the manifest's.")
def cache_verify_cmd(cache: str, teacher_checkpoint: str | None, data: str | None, train_ann: str | None) -> None:
    """Check every shard of CACHE against its manifest (presence, size, SHA-256, header, entry keys) and report
    how many of the plan's image views are present. Files outside CACHE are read only when named here."""
    from kd_detr.teacher.cache import verify_report

    report = verify_report(cache, checkpoint=teacher_checkpoint, annotations=train_ann, data=data)
    for p in report.problems:
        click.echo(f"FAIL {p}")
    for u in report.unchecked:
        click.echo(f"not checked: {u}")
    if report.problems:
        raise click.ClickException(f"{cache}: {len(report.problems)} problem(s); {report.completeness()}")
    if not report.complete:
        raise click.ClickException(f"{cache}: {report.completeness()}")
    click.echo(f"{cache}: OK, {report.completeness()}")


@cache_group.command("info")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
def cache_info_cmd(cache: str) -> None:
    """Describe CACHE: teacher, data, views, storage mode, size."""
    from kd_detr.teacher.cache import cache_info

    click.echo(cache_info(cache))


@main.command("compare")
@click.option("--teacher", default=None, help="Teacher card name, or a model name with --teacher-checkpoint.")
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--teacher-cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="Distil every recipe from this cache (baseline runs on the same view plan).")
@click.option("--student", required=True, help="Student architecture.")
@click.option("--student-opt", multiple=True, metavar="KEY=VALUE", help="Student model config override (repeatable).")
@click.option("--recipes", required=True, help="Comma-separated recipe names or paths, e.g. baseline,d3etr.")
@click.option("--budget", type=int, required=True, help="Training iterations per run.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (one run per recipe and seed).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override applied to every recipe.")
@_data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default=None)
@click.option("--eval-points", type=int, default=4, show_default=True, help="Evaluations per run.")
@click.option("--views", type=int, default=None, help="Train every recipe on a K-view plan (in-process teacher).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-ray", is_flag=True, help="Run the recipes in this process, one after another.")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="CPU machines: runs at a time, each with cores / N threads [default: 1, all cores each]. "
                   "On GPUs every run takes one GPU.")
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--no-progress", is_flag=True)
@_partial_weights_option
def compare_cmd(teacher, teacher_checkpoint, teacher_cache, student, student_opt, recipes, budget, seeds, overrides,
                data, train_ann, train_images, val_ann, val_images, image_size, num_workers, label_map, eval_points,
                views, out, device, no_ray, parallel, address, no_progress, allow_partial_weights) -> None:
    """Run several recipes (and seeds) on one budget and write a comparison table and plots.

    Writes OUT/comparison.md and .csv (AP, AP50, AP75, APs, APm, APl, gain over baseline, time per step, peak
    memory, the teacher's AP), OUT/ap_curve.png and OUT/losses.png, and every run under OUT/runs/. Finished
    runs are not redone on a rerun; failed runs are reported in the table.
    """
    from kd_detr.data import DataSpec
    from kd_detr.runs.compare import CompareConfig, compare, format_table

    seed_list = _parse_seeds(seeds, "--seeds")
    cfg = CompareConfig(student=student, recipes=[r.strip() for r in recipes.split(",") if r.strip()], out=out,
                        budget=budget, teacher=teacher, teacher_checkpoint=teacher_checkpoint,
                        teacher_cache=teacher_cache, allow_partial_weights=allow_partial_weights,
                        student_overrides=_student_overrides(student, student_opt, "--student-opt",
                                                             allow_partial_weights, teacher),
                        seeds=seed_list, overrides=list(overrides),
                        data=DataSpec(data, train_ann, train_images, val_ann, val_images, image_size, label_map),
                        eval_points=eval_points, num_workers=num_workers, device=device,
                        views=views, use_ray=not no_ray, parallel=parallel, address=address, progress=not no_progress)
    rows, files = compare(cfg)
    click.echo(format_table(rows, len(seed_list)))
    click.echo(f"wrote {files['markdown']}, {files['csv']}, {files['ap_plot']}, {files['loss_plot']}")
    failed = [f"{r['recipe']} {f}" for r in rows for f in r["failed"]]
    if failed:  # the table is written, but the comparison is incomplete: say so in the exit status
        raise click.ClickException(f"{len(failed)} of {len(rows) * len(seed_list)} runs failed ({'; '.join(failed)[:300]}); "
                                   f"their errors are in {cfg.out}/runs/*/seed*/result.json; rerun to retry them")


@main.command("export")
@click.option("--run", "source", required=True, type=click.Path(exists=True),
              help="A training/distillation output folder, or a kd-detr .safetensors model file.")
@click.option("--out", required=True, type=click.Path(),
              help="Output prefix: PREFIX.safetensors, PREFIX.pth (official), the folder PREFIX/ (hf), PREFIX.onnx.")
@click.option("--format", "formats", multiple=True, metavar="FORMAT[,FORMAT]",
              help="safetensors, official, hf (transformers save_pretrained folder), onnx; repeatable or "
                   "comma-separated [default: safetensors,official].")
def export_cmd(source: str, out: str, formats: tuple[str, ...]) -> None:
    """Export the student alone (no teacher, no auxiliary queries) in the formats asked for.

    Each file is checked: the .pth loads strictly into the plain Conditional DETR (official code or kd-detr),
    the hf folder loads with transformers' from_pretrained and gives the same outputs (1e-5), the .onnx
    gives the same outputs in onnxruntime (1e-4).
    """
    from kd_detr.runs.export import export, parse_formats

    try:
        names = parse_formats(formats)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--format") from None
    try:
        paths = export(source, out, names)
    except ImportError as e:  # a missing optional package (transformers, onnx, onnxruntime); the group handles the rest
        raise click.ClickException(str(e)) from e
    shown = [str(p) + ("/" if f == "hf" else "") for f, p in paths.items()]
    click.echo(f"wrote {', '.join(shown[:-1])} and {shown[-1]}" if len(shown) > 1 else f"wrote {shown[0]}")


# --------------------------------------------------------------------------- eval / predict
@main.command("eval")
@click.option("--model", "model_name", default=None,
              help="Architecture (needed for official .pth checkpoints; checked against safetensors metadata).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="kd-detr .safetensors, official .pth, or a transformers save_pretrained folder.")
@click.option("--num-classes", type=int, default=None, help="For official .pth checkpoints (default 91).")
@_data_options
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--batch-size", type=int, default=2, show_default=True,
              help="Images per batch (padding changes DETR AP; the official repo uses 1-2).")
@click.option("--max-images", type=int, default=None, help="Evaluate on the first N images only.")
@click.option("--output-dir", default=None, help="Where results.json and metrics.json go (default: beside the checkpoint).")
@click.option("--device", default="auto", show_default=True)
@click.option("--per-class", is_flag=True, help="Also print the per-class AP table.")
def eval_cmd(model_name, checkpoint, num_classes, data, train_ann, train_images, val_ann, val_images, image_size,
             num_workers, split, batch_size, max_images, output_dir, device, per_class) -> None:
    """Evaluate a checkpoint with pycocotools COCOeval (bbox): 12-line summary, results and metrics JSON."""
    from kd_detr.runs.inference import evaluate_checkpoint

    result, out_dir = evaluate_checkpoint(
        checkpoint, model_name=model_name, num_classes=num_classes, data=data,
        ann=(train_ann if split == "train" else val_ann), images=(train_images if split == "train" else val_images),
        split=split, image_size=image_size, num_workers=num_workers,
        batch_size=batch_size, max_images=max_images, output_dir=output_dir, device=device)
    click.echo(result.summary_text)
    if per_class:
        from kd_detr.evaluation import format_per_class_table
        click.echo(format_per_class_table(result.per_class))
    click.echo(f"AP {100 * result.metrics['AP']:.1f}; wrote {out_dir}/results.json and {out_dir}/metrics.json")


@main.command("predict")
@click.option("--model", "model_name", default=None, help="Architecture (needed for official .pth checkpoints).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="kd-detr .safetensors, official .pth, or a transformers save_pretrained folder.")
@click.option("--num-classes", type=int, default=None, help="For official .pth checkpoints (default 91).")
@click.option("--image", "images", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image file (repeatable).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Output JSON file.")
@click.option("--no-resize", is_flag=True, help="Run at the image's own size (default: the eval resize).")
@click.option("--image-size", type=int, default=None, help="Eval resize preset used in training (e.g. 128).")
@click.option("--top-k", type=int, default=100, show_default=True, help="Detections per image.")
@click.option("--device", default="auto", show_default=True)
def predict_cmd(model_name, checkpoint, num_classes, images, output, no_resize, image_size, top_k, device) -> None:
    """Detect objects in images; writes one JSON entry per image with absolute xyxy boxes."""
    if top_k < 1:
        raise click.UsageError(f"--top-k must be >= 1, got {top_k}")
    from kd_detr.runs.inference import predict_images

    entries = predict_images(checkpoint, list(images), model_name=model_name, num_classes=num_classes,
                             resize=not no_resize, image_size=image_size, top_k=top_k, device=device)
    from kd_detr.atomic import write_json_atomic
    write_json_atomic(output, entries)
    click.echo(f"wrote {len(entries)} image(s) to {output}")


def _parse_seeds(text: str, option: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a one-line usage error naming ``option`` otherwise."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"expected distinct comma-separated integers, got {text!r}", param_hint=option)
    return seeds


# --------------------------------------------------------------------------- quickstart
@main.command("quickstart")
@click.option("--out", default="runs/quickstart", show_default=True, help="Output folder.")
@click.option("--iters", type=int, default=2000, show_default=True, help="Student training iterations per recipe.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the runs and the cache's views (the data is always the teacher's, seed 0).")
@click.option("--seeds", default=None,
              help="Comma-separated seeds, e.g. 0,1,2: every recipe once per seed from one cache (views of the "
                   "first seed); the table gives mean ± std and the paired gain per seed. Overrides --seed.")
@click.option("--train-teacher", is_flag=True,
              help="Train the teacher here (about 40 minutes) even if the shipped one exists; a rerun reuses it.")
@click.option("--teacher-iters", type=int, default=QUICKSTART_TEACHER_ITERS, show_default=True,
              help="Iterations when the teacher is trained here (the shipped teacher's count).")
@click.option("--views", type=int, default=2, show_default=True, help="Recorded views per image in the cache.")
@click.option("--actors", type=int, default=2, show_default=True, help="Ray actors building the cache.")
@click.option("--num-train", type=int, default=None, hidden=True)
@click.option("--num-val", type=int, default=None, hidden=True)
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Student runs at a time on a CPU machine, cores / N threads each [default: 2 where there are "
                   "2 or more cores: the published table; 0.64x the wall time of one after another on 2 cores]. "
                   "Another value gives slightly different figures (other thread count).")
@click.option("--no-progress", is_flag=True)
def quickstart_cmd(out, iters, seed, seeds, train_teacher, teacher_iters, views, actors, num_train, num_val,
                   parallel, no_progress) -> None:
    """The whole flow on generated data on the CPU: data, teacher, Ray-built teacher cache, baseline vs
    d3etr distillation of a smaller student, comparison table and plots."""
    from kd_detr.runs.quickstart import run_quickstart

    run_quickstart(Path(out), iters=iters, seed=seed, echo=click.echo, train_teacher=train_teacher,
                   teacher_iters=teacher_iters, views=views, actors=actors, num_train=num_train, num_val=num_val,
                   progress=not no_progress, parallel=parallel,
                   seeds=_parse_seeds(seeds, "--seeds") if seeds else None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
