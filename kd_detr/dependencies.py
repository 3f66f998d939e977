"""The dependency versions kd-detr was tested with, and a one-line warning for an installed one outside them.

``pyproject.toml`` pins the same ranges for a fresh install; this module covers an environment that got its
packages another way (an image with its own transformers, ``pip install --no-deps``): kd-detr still runs,
but says once per command that the version was not tested. The ranges are what the family matrix
(``tests/models/test_family_matrix.py``) and the rest of the suite ran on; the README's "Tested versions" lists them.
Standard library only (layer 0): imported by the CLI before torch.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from typing import Optional

__all__ = ["TESTED", "parse_version", "untested", "untested_warnings"]

# distribution -> (lowest tested, first untested): a half-open range [low, high)
TESTED: dict[str, tuple[str, str]] = {
    # 5.17.0: the GPU machine's image; 5.25.0: what a fresh install brought (2026-12-07)
    "transformers": ("5.17.0", "5.26"),
    # 0.6.2: the checkpoint and cache tests without transformers (transformers 5.17+ itself needs >=0.8);
    # 0.8.0: the whole suite
    "safetensors": ("0.6.2", "0.9"),
    # 2.60.0; 2.64 drops map_batches' max_restarts / max_task_retries (see pyproject.toml)
    "ray": ("2.60.0", "2.64"),
}


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"5.25.0.dev0"`` -> ``(5, 25, 0)``."""
    m = re.match(r"\d+(?:\.\d+)*", text.strip())
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in m.group(0).split("."))


def untested(name: str, version: str) -> Optional[str]:
    """Why ``version`` of ``name`` is outside its tested range, or ``None`` when it is inside (or not listed)."""
    if name not in TESTED:
        return None
    low, high = TESTED[name]
    v = parse_version(version)
    if v < parse_version(low) or v >= parse_version(high):
        return (f"{name} {version} is installed; kd-detr was tested with {name} >={low},<{high} "
                f"(pip install \"{name}>={low},<{high}\")")
    return None


def installed_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, or ``None``."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def untested_warnings() -> list[str]:
    """One line for each installed dependency outside its tested range (packages not installed are skipped:
    transformers is an extra)."""
    out = []
    for name in TESTED:
        version = installed_version(name)
        if version is None:
            continue
        why = untested(name, version)
        if why:
            out.append(why)
    return out
