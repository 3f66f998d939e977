"""The ``kd-detr`` command group: logging set-up, and expected user errors (bad files, bad options) shown as
one line instead of a traceback."""

from __future__ import annotations

import logging
from typing import Any

import click


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


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
@click.option("--offline", is_flag=True,
              help="Download nothing (as KD_DETR_OFFLINE=1): teacher checkpoints, ImageNet backbones and Hub "
                   "models come from their caches, or the command names the file to fetch.")
@click.version_option(package_name="kd-detr")
@click.pass_context
def main(ctx: click.Context, verbose: bool, offline: bool) -> None:
    """kd-detr: knowledge distillation for DETR-style object detectors."""
    if offline:  # read by kd_detr.download and kd_detr.models.hf.hub, in this process and the Ray workers it starts
        import os

        os.environ["KD_DETR_OFFLINE"] = "1"
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose)
    from kd_detr.dependencies import untested_warnings

    for line in untested_warnings():
        logging.getLogger("kd_detr").warning(line)
