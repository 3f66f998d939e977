"""What every run writes about itself: resolved config, command line, git SHA, library versions."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_sha() -> str | None:
    """The git commit of the kd_detr source tree, with ``-dirty`` when it has local changes."""
    src = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("kd-detr", "torch", "torchvision", "numpy", "scipy", "pycocotools", "safetensors", "ray",
                 "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


# A run started for someone else's command (a `kd-detr compare` run in a Ray worker, whose own argv is Ray's
# worker command line) records that command, given as a JSON list in this variable.
COMMAND_ENV = "KD_DETR_COMMAND"


def hub_models(config: dict[str, Any]) -> dict[str, Any]:
    """For each Hub id among the run's models (the student ``train.model``, the teacher spec's ``model``:
    ``hf:org/name[@revision]``), the commit it resolved to and its weight files' SHA-256, so the record names
    exactly which weights were used."""
    from kd_detr.models.hf.config import HF_PREFIX
    from kd_detr.models.hf.hub import is_hub_id, resolve_hub_id

    names = [(config.get("train") or {}).get("model"), (config.get("teacher") or {}).get("model")]
    out = {}
    for name in names:
        if isinstance(name, str) and name.startswith(HF_PREFIX) and is_hub_id(name[len(HF_PREFIX):]):
            snapshot = resolve_hub_id(name[len(HF_PREFIX):])  # resolved once per process: no second download
            out[f"{HF_PREFIX}{snapshot.repo_id}"] = snapshot.record()
    return out


def run_record(config: dict[str, Any]) -> dict[str, Any]:
    command = os.environ.get(COMMAND_ENV)
    record = {
        "config": config,
        "command": json.loads(command) if command else sys.argv,
        "git_sha": git_sha(),
        "versions": library_versions(),
    }
    hub = hub_models(config)
    if hub:
        record["hub"] = hub
    return record
