"""``kd-detr data``: the synthetic COCO-format data set generator."""

from __future__ import annotations

import click

from .group import main


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
