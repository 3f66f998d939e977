"""DDP on the CPU with two gloo processes (torchrun, env://)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import torch

from kd_detr.criterion import SetCriterion, weighted_total
from kd_detr.matcher import HungarianMatcher
from kd_detr.models import build_model
from tests.support import REPO_ROOT, SUPPORT_DIR


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_gradient_equals_single_process(tmp_path):
    torch.manual_seed(0)
    # GroupNorm and no dropout: per-sample computations, so the split batch is the same maths
    build = functools.partial(build_model, "cond_detr_r10_tiny", num_classes=4, backbone_norm="gn",
                              dropout=0.0, num_queries=6, dim_feedforward=64)
    model = build()
    images = torch.randn(4, 3, 64, 64)
    mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]])},
        {"labels": torch.tensor([3, 3, 1]), "boxes": torch.tensor([[0.2, 0.7, 0.1, 0.2], [0.6, 0.2, 0.4, 0.3],
                                                                  [0.5, 0.5, 0.6, 0.6]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    criterion = SetCriterion(4, HungarianMatcher())
    loss = weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)
    loss.backward()
    single = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    batch = tmp_path / "batch.pt"
    torch.save({"build": build, "state": model.state_dict(), "images": images, "mask": mask,
                "targets": targets, "weight_dict": criterion.weight_dict}, batch)
    torchrun(str(SUPPORT_DIR / "ddp_grad_worker.py"), str(batch), str(tmp_path / "grads.pt"))
    ddp = torch.load(tmp_path / "grads.pt")
    assert set(ddp) == set(single)
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_train_cli(synth_data, tmp_path):
    out = tmp_path / "run"
    torchrun("-m", "kd_detr", "train", "--model", "cond_detr_r10_tiny", "--model-opt", "num_queries=6",
             "--model-opt", "backbone_norm=gn", "--data", str(synth_data), "--image-size", "64",
             "--batch-size", "2", "--max-iters", "3", "--num-workers", "0", "--output-dir", str(out),
             "--log-every", "1", "--no-progress", "--eval-max-images", "4")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["config"]["world_size"] == 2
    assert (out / "model_final.safetensors").exists()
    assert (out / "metrics.json").exists()


def test_torchrun_distill_cli_with_projection(synth_data, tmp_path, ray_session):
    """Two-process D3ETR with a narrower teacher (the trainable query projection lives outside DDP), once with
    the teacher in each process and once from a teacher cache built without any batch size: both log the same
    numbers (one cache entry per image view serves any number of processes at any batch size)."""
    from click.testing import CliRunner

    from kd_detr.cli import main
    from kd_detr.data import CocoDetection
    from kd_detr.engine.checkpointing import find_resume_point, load_training_state
    from kd_detr.models import save_model

    ds = CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json")
    torch.manual_seed(0)
    teacher = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes, num_queries=8, d_model=64,
                          dim_feedforward=64)
    ckpt = tmp_path / "teacher.safetensors"
    save_model(teacher, ckpt, label_map=ds.label_map, extra_metadata={"image_size": 64})
    cache = tmp_path / "cache"
    res = CliRunner().invoke(main, ["cache", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(ckpt),
                                    "--data", str(synth_data), "--image-size", "64", "--out", str(cache), "--views",
                                    "2", "--actors", "1", "--attention", "full", "--classes", "dense", "--dtype",
                                    "float32", "--no-progress"])
    assert res.exit_code == 0, res.output
    common = ["-m", "kd_detr", "distill", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(ckpt),
              "--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=6", "--data", str(synth_data),
              "--image-size", "64", "--num-workers", "0", "--no-progress", "--set", "train.batch_size=2",
              "--set", "train.max_iters=2", "--set", "train.log_every=1", "--set", "train.eval_max_images=4",
              "--set", "train.eval_every_epochs=0", "--set", 'distill.fixed_group.query_projection="linear"']
    logs = {}
    for name, extra in (("inprocess", ["--views", "2"]), ("cache", ["--teacher-cache", str(cache)])):
        out = tmp_path / name
        torchrun(*common, "--output-dir", str(out), *extra)
        logs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        logs[name] = [r for r in logs[name] if "loss" in r]
    log = logs["cache"]
    assert [r["iteration"] for r in log] == [1, 2]
    assert "distill.fixed.pred_cls.l1" in log[0]
    for a, b in zip(logs["inprocess"], log):
        for key, value in a.items():
            if isinstance(value, float) and not key.endswith("_time") and key not in ("eta_s", "peak_mem_mb"):
                assert abs(b[key] - value) <= 1e-5 * max(1.0, abs(value)), (a["iteration"], key, value, b[key])
    state = load_training_state(find_resume_point("auto", tmp_path / "cache"))
    assert state["extra"]["distill_projection"]["weight"].shape == (128, 64)
