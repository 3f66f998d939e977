"""Tiny distillation runs through the command line on the session's synthetic data (``conftest.synth_data``):
a seeded random teacher checkpoint, the ``kd-detr distill`` arguments of a tiny student, and the run's log."""

from __future__ import annotations

import json

import torch

from kd_detr.models import build_model


def save_teacher(tmp_path, synth_data, image_size=64):
    """A tiny teacher checkpoint with the data's label map (weights: a seeded random init)."""
    from kd_detr.data import CocoDetection
    from kd_detr.models import save_model

    ds = CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json")
    torch.manual_seed(7)
    teacher = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes,
                          num_queries=10, dim_feedforward=128)
    path = tmp_path / "teacher.safetensors"
    save_model(teacher, path, label_map=ds.label_map, extra_metadata={"image_size": image_size})
    return path


def distill_args(synth_data, out, teacher, *extra):
    """``kd-detr distill`` of a tiny student (10 queries) from ``teacher`` (a :func:`save_teacher` file) into
    ``out``: batch 4, a log record per step, no evaluation; ``extra`` options are appended."""
    return ["distill", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher),
            "--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=10", "--student-opt",
            "dim_feedforward=128", "--data", str(synth_data), "--image-size", "64", "--num-workers", "0",
            "--output-dir", str(out), "--no-progress", "--set", "train.batch_size=4", "--set", "train.log_every=1",
            "--set", "train.eval_every_epochs=0", "--set", "train.lr_drop=1000", *extra]


def read_log(path):
    """The records of ``path/log.jsonl``."""
    return [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
