"""Ray processes a ``kd-detr`` command leaves behind: run the command in a fresh process whose every child
carries :data:`MARK`, and find those processes in ``/proc`` afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Every process a command starts (its Ray: raylet, GCS, workers, agents) inherits this variable, so the
# test counts only the command's own Ray, not another Ray that happens to run on the machine.
MARK = f"KD_DETR_RAY_CLEANUP_TEST={os.getpid()}"


def ray_processes() -> dict[int, str]:
    """pid -> command line of every Ray process started by this test's commands."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if not (cmd.startswith("ray::") or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd):
                continue
            if MARK.encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        out[int(d.name)] = cmd
    return out


def run_kd_detr(args, tmp_path):
    """``python -m kd_detr ARGS`` in a fresh process (in ``tmp_path``) whose Ray processes carry :data:`MARK`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    key, value = MARK.split("=")
    env[key] = value
    return subprocess.run([sys.executable, "-m", "kd_detr", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_no_new_ray(before: dict[int, str], what: str) -> None:
    """Fail naming ``what`` if Ray processes not in ``before`` are still running 15 s on."""
    deadline = time.time() + 15  # processes exit asynchronously after ray.shutdown()
    while True:
        left = {p: c for p, c in ray_processes().items() if p not in before}
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"{what} left Ray processes running: {list(left.values())[:3]}"
