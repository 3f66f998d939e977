"""``kd-detr data``: the synthetic COCO-format data set generator; conversion of a YOLO data set to a COCO tree."""

from __future__ import annotations

import click

from .group import main


@main.group("data")
def data_group() -> None:
    """Data sets: the synthetic COCO-format generator, YOLO -> COCO conversion."""


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


@data_group.command("convert")
@click.option("--from", "src_format", type=click.Choice(["yolo"]), required=True, help="Format of --data.")
@click.option("--to", "dst_format", type=click.Choice(["coco"]), required=True, help="Format written to --out.")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="The YOLO data set: its data.yaml or the folder holding it.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New folder for the COCO tree (annotations/instances_{train,val}2017.json, train2017/, val2017/).")
@click.option("--copy", is_flag=True, help="Copy the images (default: hard links where possible, else copies).")
@click.option("--skip-bad-labels", is_flag=True, help="Skip (and count) bad label lines instead of stopping.")
def convert_cmd(src_format: str, dst_format: str, data: str, out: str, copy: bool, skip_bad_labels: bool) -> None:
    """Convert a YOLO data set (Ultralytics layout) into a COCO tree. kd-detr also reads the YOLO data set
    directly (--data PATH/data.yaml) with the same annotations, so the conversion is for other tools."""
    from kd_detr.data.yolo import convert_to_coco

    counts = convert_to_coco(data, out, skip_bad_labels=skip_bad_labels, copy=copy)
    click.echo(f"wrote {', '.join(f'{n} {s}' for s, n in counts.items())} images as a COCO tree to {out}")
