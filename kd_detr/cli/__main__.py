"""``python -m kd_detr.cli``: the ``kd-detr`` command."""

import sys

from kd_detr.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
