"""Golden training logs: short fixed-seed runs of every recipe and teacher source through the CLI.

Recorded once on the code before a refactor (``python tests/support/golden_runs.py --write``) and asserted by
``tests/engine/test_golden_logs.py`` after it: every logged loss term, lr and grad norm must match to 1e-6, so
moving code cannot change what the toolkit computes. The runs use the session's synthetic data
(``conftest.synth_data``: 24 train / 8 val images at 64 px, seed 3) and a seeded random tiny teacher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_logs.json"

# Keys of a log record that measure the machine, not the computation.
TIMING_KEYS = ("iter_time", "data_time", "peak_mem_mb", "eta_s")

ITERS = 3

# name -> (recipe, extra distill args); "{cache}" is replaced by the cache folder.
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("baseline", ()),
    "d3etr_inprocess": ("d3etr", ("--views", "2")),
    "d3etr_cache": ("d3etr", ("--teacher-cache", "{cache}")),
    "d3etr_ray": ("d3etr", ("--views", "2", "--teacher-serve", "ray", "--teacher-actors", "1")),
    "ms_detr": ("ms_detr", ()),
    "co_detr": ("co_detr", ("--set", "co_detr.roi_batch_size_per_image=64")),
    "d3etr_ms": ("d3etr_ms", ()),
    "d3etr_co": ("d3etr_co", ("--set", "co_detr.roi_batch_size_per_image=64")),
}


def _save_teacher(tmp: Path, data: Path) -> Path:
    """A tiny teacher checkpoint with the data's label map (a seeded random init)."""
    import torch

    from kd_detr.data import CocoDetection
    from kd_detr.models import build_model, save_model

    ds = CocoDetection(data / "train2017", data / "annotations" / "instances_train2017.json")
    torch.manual_seed(7)
    teacher = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes,
                          num_queries=10, dim_feedforward=128)
    path = tmp / "teacher.safetensors"
    save_model(teacher, path, label_map=ds.label_map, extra_metadata={"image_size": 64})
    return path


def _invoke(args: list[str]) -> None:
    from click.testing import CliRunner

    from kd_detr.cli import main

    res = CliRunner().invoke(main, args)
    if res.exit_code != 0:
        raise RuntimeError(f"kd-detr {' '.join(args)} failed:\n{res.output}\n{res.exception!r}")


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append({k: v for k, v in rec.items() if k not in TIMING_KEYS})
    return out


def run_all(tmp: Path, data: Path, names=None) -> dict[str, list[dict]]:
    """Run the golden runs (all, or ``names``) in ``tmp``; returns ``{name: [log records]}``."""
    tmp.mkdir(parents=True, exist_ok=True)
    teacher = _save_teacher(tmp, data)
    names = list(RUNS) if names is None else list(names)
    cache = tmp / "cache"
    if "d3etr_cache" in names and not (cache / "manifest.json").exists():
        _invoke(["cache", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher), "--data", str(data),
                 "--image-size", "64", "--out", str(cache), "--views", "2", "--actors", "1",
                 "--images-per-shard", "8", "--attention", "full", "--dtype", "float32", "--classes", "dense", "--no-progress"])
    logs = {}
    for name in names:
        recipe, extra = RUNS[name]
        out = tmp / name
        _invoke(["distill", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher),
                 "--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=10", "--student-opt",
                 "dim_feedforward=128", "--data", str(data), "--image-size", "64", "--num-workers", "0",
                 "--output-dir", str(out), "--no-progress", "--recipe", recipe,
                 "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", f"train.max_iters={ITERS}",
                 "--set", "train.eval_every_epochs=0", "--set", "train.lr_drop=1000",
                 "--set", "distill.self_attn.per_head=false",
                 *[a.replace("{cache}", str(cache)) for a in extra]])
        logs[name] = _records(out)
    return logs


def main() -> None:
    import logging
    import os
    import tempfile

    import ray
    import torch

    from kd_detr.data import generate_synthetic

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"write {GOLDEN}")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # as conftest: the same reductions
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "synth" / "data"
        generate_synthetic(data, num_train=24, num_val=8, image_size=64, seed=3)  # conftest.synth_data
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            logs = run_all(Path(d) / "runs", data)
        finally:
            ray.shutdown()
    text = json.dumps(logs, indent=1, sort_keys=True)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text + "\n")
        print(f"wrote {GOLDEN}: {sum(len(v) for v in logs.values())} records of {len(logs)} runs")
    else:
        print(text)


if __name__ == "__main__":
    main()
