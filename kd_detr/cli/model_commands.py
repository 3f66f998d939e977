"""Commands on models and checkpoints: ``models``, ``convert``, ``eval``, ``predict`` and ``export``."""

from __future__ import annotations

import click

from .group import main
from .options import data_options, parse_overrides


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


@main.command("eval")
@click.option("--model", "model_name", default=None,
              help="Architecture (needed for official .pth checkpoints; checked against safetensors metadata).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="kd-detr .safetensors, official .pth, or a transformers save_pretrained folder.")
@click.option("--num-classes", type=int, default=None, help="For official .pth checkpoints (default 91).")
@data_options
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--batch-size", type=int, default=2, show_default=True,
              help="Images per batch (padding changes DETR AP; the official repo uses 1-2).")
@click.option("--max-images", type=int, default=None, help="Evaluate on the first N images only.")
@click.option("--output-dir", default=None, help="Where results.json and metrics.json go (default: beside the checkpoint).")
@click.option("--device", default="auto", show_default=True)
@click.option("--per-class", is_flag=True, help="Also print the per-class AP table.")
def eval_cmd(model_name, checkpoint, num_classes, data, train_ann, train_images, val_ann, val_images, image_size,
             num_workers, skip_bad_labels, split, batch_size, max_images, output_dir, device, per_class) -> None:
    """Evaluate a checkpoint with pycocotools COCOeval (bbox): 12-line summary, results and metrics JSON."""
    from kd_detr.runs.inference import evaluate_checkpoint

    result, out_dir = evaluate_checkpoint(
        checkpoint, model_name=model_name, num_classes=num_classes, data=data,
        ann=(train_ann if split == "train" else val_ann), images=(train_images if split == "train" else val_images),
        split=split, image_size=image_size, num_workers=num_workers, skip_bad_labels=skip_bad_labels,
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
@click.option("--draw", "draw_dir", type=click.Path(file_okay=False), default=None,
              help="Also write each image with its boxes, class names and scores to this folder (<stem>.png).")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="With --draw: draw the detections scoring at least this.")
@click.option("--device", default="auto", show_default=True)
def predict_cmd(model_name, checkpoint, num_classes, images, output, no_resize, image_size, top_k, draw_dir,
                score_threshold, device) -> None:
    """Detect objects in images; writes one JSON entry per image with absolute xyxy boxes (and, with --draw,
    pictures of the detections)."""
    if top_k < 1:
        raise click.UsageError(f"--top-k must be >= 1, got {top_k}")
    from kd_detr.runs.inference import predict_images

    entries = predict_images(checkpoint, list(images), model_name=model_name, num_classes=num_classes,
                             resize=not no_resize, image_size=image_size, top_k=top_k, device=device)
    from kd_detr.atomic import write_json_atomic
    write_json_atomic(output, entries)
    click.echo(f"wrote {len(entries)} image(s) to {output}")
    if draw_dir:
        from kd_detr.runs.pictures import write_drawn
        pictures = write_drawn(entries, draw_dir, score_threshold)
        click.echo(f"drew {len(pictures)} image(s) with detections scoring >= {score_threshold} into {draw_dir}")


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
