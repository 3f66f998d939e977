"""``kd-detr cache``: build a teacher cache, ``verify`` it, describe it (``info``)."""

from __future__ import annotations

import click

from .group import main
from .options import partial_weights_option, skip_bad_labels_option, teacher_precision_option

# `kd-detr cache`'s storage defaults: kd_detr.teacher.cache.attention_codec.DEFAULT_ATTENTION_SPEC /
# DEFAULT_CLASSES_SPEC, spelled out here so that `--help` does not import torch (a test asserts they agree)
DEFAULT_ATTENTION_SPEC = "topk:14"
DEFAULT_CLASSES_SPEC = "topk:4"


@main.group("cache", invoke_without_command=True)
@click.option("--teacher", default=None, help="Teacher card name, or a model name with --teacher-checkpoint.")
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--data", type=click.Path(exists=True), default=None,
              help="COCO tree or YOLO data set (data.yaml or its folder) whose training split is cached.")
@click.option("--train-ann", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--train-images", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--image-size", type=int, default=None, help="Small-image preset (as in distill); default official sizes.")
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default="contiguous", show_default=True)
@skip_bad_labels_option
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
@click.option("--features", is_flag=True,
              help="Also store the teacher's encoder output feature maps (for [feature_kd]; large: ~0.44 MB per "
                   "view for Conditional DETR at 800x1066, ~4.3 MB for RT-DETR at 640x640, float16).")
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
@partial_weights_option
@teacher_precision_option
@click.pass_context
def cache_group(ctx, teacher, teacher_checkpoint, data, train_ann, train_images, image_size, label_map, skip_bad_labels,
                out, views,
                view_seed, actors, attention, dtype, heads, classes, features, images_per_shard, address, pipeline,
                teacher_batch_size, no_progress, allow_partial_weights, teacher_precision):
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
        store = StoreConfig.parse(attention, dtype=dtype, heads=heads, classes=classes, features=features)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    spec = resolve_teacher(teacher, teacher_checkpoint, allow_partial_weights, teacher_precision)
    dataset = DataSpec(data, train_ann, train_images, image_size=image_size, label_map=label_map,
                       skip_bad_labels=skip_bad_labels).train_set()
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
