"""``python -m kd_detr`` (and ``torchrun ... -m kd_detr train ...``) runs the CLI."""

from kd_detr.cli import main

main(prog_name="kd-detr")
