"""No Ray process outlives a command: `kd-detr cache`, `kd-detr compare` and a distillation with
`--teacher-serve ray` each start a local Ray in a fresh process and must shut all of it down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.runs import save_teacher

pytestmark = pytest.mark.slow


# Every process a command starts (its Ray: raylet, GCS, workers, agents) inherits this variable, so the
# test counts only the command's own Ray, not another Ray that happens to run on the machine.
MARK = f"KD_DETR_RAY_CLEANUP_TEST={os.getpid()}"


def _ray_processes() -> dict[int, str]:
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


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    key, value = MARK.split("=")
    env[key] = value
    return subprocess.run([sys.executable, "-m", "kd_detr", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def _assert_no_new_ray(before: dict[int, str], what: str) -> None:
    deadline = time.time() + 15  # processes exit asynchronously after ray.shutdown()
    while True:
        left = {p: c for p, c in _ray_processes().items() if p not in before}
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"{what} left Ray processes running: {list(left.values())[:3]}"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_no_ray_process_outlives_cache_compare_and_ray_served_distillation(synth_data, tmp_path):
    teacher = save_teacher(tmp_path, synth_data)
    common = ["--data", str(synth_data), "--image-size", "64", "--no-progress"]
    teacher_args = ["--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher)]
    student = ["--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=10", "--student-opt",
               "dim_feedforward=128", "--num-workers", "0"]
    commands = {
        "kd-detr cache": ["cache", *teacher_args, *common, "--out", str(tmp_path / "cache"), "--views", "1",
                          "--actors", "1"],
        "kd-detr compare": ["compare", *teacher_args, *student, *common, "--recipes", "baseline", "--budget", "1",
                            "--eval-points", "1", "--out", str(tmp_path / "cmp"), "--set", "train.batch_size=4"],
        "kd-detr distill --teacher-serve ray": [
            "distill", *teacher_args, *student, *common, "--teacher-serve", "ray", "--output-dir", str(tmp_path / "d"),
            "--set", "train.max_iters=1", "--set", "train.batch_size=4", "--set", "train.eval_every_epochs=0"],
    }
    for what, args in commands.items():
        before = _ray_processes()
        res = _run(args, tmp_path)
        assert res.returncode == 0, f"{what}: {res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        _assert_no_new_ray(before, what)
        assert "Token authentication is enabled" not in res.stderr  # Ray's notice asks nothing of the user
    # the compare run ran in a Ray worker, yet its record holds the user's command, not Ray's worker's
    record = json.loads((tmp_path / "cmp" / "runs" / "baseline" / "seed0" / "config.json").read_text())
    assert record["command"][1:3] == ["compare", "--teacher"], record["command"]
