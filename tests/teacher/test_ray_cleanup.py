"""No Ray process outlives a command: `kd-detr cache`, `kd-detr compare` and a distillation with
`--teacher-serve ray` each start a local Ray in a fresh process and must shut all of it down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.ray_processes import assert_no_new_ray, ray_processes, run_kd_detr
from tests.support.runs import save_teacher

pytestmark = pytest.mark.slow


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
        before = ray_processes()
        res = run_kd_detr(args, tmp_path)
        assert res.returncode == 0, f"{what}: {res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert_no_new_ray(before, what)
        assert "Token authentication is enabled" not in res.stderr  # Ray's notice asks nothing of the user
    # the compare run ran in a Ray worker, yet its record holds the user's command, not Ray's worker's
    record = json.loads((tmp_path / "cmp" / "runs" / "baseline" / "seed0" / "config.json").read_text())
    assert record["command"][1:3] == ["compare", "--teacher"], record["command"]
