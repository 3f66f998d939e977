"""Hardening of ``kd-detr train``: every bad input or broken file gets a one-line error naming the file /
option and what to do, and nothing is lost or half-written (training state loaded with weights_only, an
output-dir lock, --init-checkpoint / --resume architecture checks, full disks, count options, unreadable
checkpoints, stale temporary files)."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kd_detr.cli import main
from kd_detr.engine import checkpointing
from kd_detr.engine.checkpointing import (
    CheckpointRefused,
    CheckpointUnreadable,
    OutputDirInUse,
    OutputDirLock,
    find_resume_point,
    load_resume_checkpoint,
    load_training_state,
)
from kd_detr.engine.trainer import TrainConfig, Trainer, load_init_checkpoint
from kd_detr.models import build_model, save_model

TINY_OPTS = {"num_queries": 10, "dim_feedforward": 128}


def tiny_config(data, out, **kw):
    base = dict(model="cond_detr_r10_tiny", model_overrides=dict(TINY_OPTS), data=str(data), image_size=64,
                batch_size=4, num_workers=0, lr=1e-4, lr_backbone=1e-4, lr_drop=1000, output_dir=str(out),
                log_every=1, progress=False, eval_every_epochs=0, eval_max_images=2)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(synth_data, tmp_path_factory):
    """A finished 2-iteration run that kept both checkpoints (iter 1 and iter 2)."""
    out = tmp_path_factory.mktemp("hardening") / "run"
    Trainer(tiny_config(synth_data, out, max_iters=2, checkpoint_every=1, keep_checkpoints=0)).fit()
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def ckpt(out: Path, iteration: int, kind: str) -> Path:
    return out / "checkpoints" / f"iter_{iteration:07d}.{kind}"


# ------------------------------------------------------------------ 1. training state: weights_only


class _WritesMarker:
    """Unpickling this would create ``marker`` (what a crafted state.pth could do with any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_file_with_code_is_refused_and_never_run(synth_data, run_copy, tmp_path):
    marker = tmp_path / "pwned"
    state = ckpt(run_copy, 2, "state.pth")
    torch.save({"format": checkpointing.STATE_FORMAT, "payload": _WritesMarker(marker)}, state)
    before = snapshot(run_copy)
    for resume in (str(state), "auto"):  # a refused file is an error, never skipped by the auto fallback
        cfg = tiny_config(synth_data, run_copy, max_iters=3, resume=resume)
        with pytest.raises(CheckpointRefused, match=re.escape(str(state))) as e:
            Trainer(cfg).fit()
        assert "refused, nothing of it was run" in str(e.value) and "\n" not in str(e.value)
        assert not marker.exists()
        assert snapshot(run_copy) == before  # log, metrics, checkpoints untouched


def test_state_is_plain_tensors_and_values(base_run):
    state_path = ckpt(base_run, 2, "state.pth")
    state = torch.load(state_path, map_location="cpu", weights_only=True)  # no exception: loads safely
    assert state["format"] == checkpointing.STATE_FORMAT == 2
    assert state["iteration"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state_path) == []


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    torch.save(checkpointing.rng_state(), tmp_path / "rng.pth")

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(3).tolist())

    first = draws()
    checkpointing.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert draws() == first


def test_old_format_state_is_refused_with_a_hint(run_copy):
    state = ckpt(run_copy, 2, "state.pth")
    torch.save({"format": 1, "rng": {"numpy": np.random.get_state(), "python": random.getstate()}}, state)
    with pytest.raises(CheckpointRefused, match=re.escape(str(state))) as e:
        load_training_state(find_resume_point(str(state), run_copy))
    assert "written by an older kd-detr" in str(e.value) and "start anew" in str(e.value)


# ------------------------------------------------------------------ 2. output-dir lock


def _hold_lock(out: Path):
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def test_second_run_on_a_busy_output_dir_fails_at_once(synth_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"iteration": 1, "loss": 1.0}\n')
    before = snapshot(out)
    holder = _hold_lock(out)
    try:
        with pytest.raises(OutputDirInUse) as e:
            Trainer(tiny_config(synth_data, out, max_iters=1)).fit()
        assert str(e.value) == (f"another kd-detr run is using --output-dir {out} (pid {os.getpid()}); wait for it "
                                "or choose another --output-dir")
        result = CliRunner().invoke(main, ["train", "--model", "cond_detr_r10_tiny", "--data", str(synth_data),
                                           "--max-iters", "1", "--output-dir", str(out), "--no-progress"])
        assert result.exit_code == 1
        assert result.output.strip() == f"Error: {e.value}"
        assert snapshot(out) == {**before, ".lock": f"{os.getpid()}\n".encode()}  # the first run's log is kept
    finally:
        holder.close()
    OutputDirLock(out).acquire().release()  # free again once the holder ends


def test_finished_run_released_its_lock(base_run):
    lock = OutputDirLock(base_run).acquire()
    try:
        assert (base_run / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert (base_run / ".lock").read_text() == ""


# ------------------------------------------------------------------ 3. --init-checkpoint of another model


def test_init_checkpoint_of_another_architecture_is_refused(synth_data, tmp_path):
    from kd_detr.data import CocoDetection

    n = CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json") \
        .label_map.num_classes
    path = tmp_path / "r18.safetensors"
    save_model(build_model("cond_detr_r18_tiny", num_classes=n, num_queries=10), path)
    with pytest.raises(ValueError) as e:
        load_init_checkpoint(str(path), "cond_detr_r10_tiny", n, {"num_queries": 10})
    assert str(e.value) == (f"--init-checkpoint {path} holds a cond_detr_r18_tiny (backbone=resnet18, enc_layers=3, "
                            "dec_layers=3), but --model cond_detr_r10_tiny --model-opt num_queries=10 builds a "
                            "cond_detr_r10_tiny (backbone=resnet10, enc_layers=2, dec_layers=2): pass --model "
                            "cond_detr_r18_tiny or another checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"--init-checkpoint {path} holds a cond_detr_r18_tiny with "
                                                   "num_queries=10, but --model-opt num_queries=30 was given")):
        load_init_checkpoint(str(path), "cond_detr_r18_tiny", n, {"num_queries": 30})
    assert load_init_checkpoint(str(path), "cond_detr_r18_tiny", n, {"num_queries": 10}).config.num_queries == 10
    # through a run: refused before anything is written
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="pass --model cond_detr_r18_tiny"):
        Trainer(tiny_config(synth_data, out, max_iters=1, init_checkpoint=str(path))).fit()
    assert not out.exists()


# ------------------------------------------------------------------ 4. full disk while checkpointing


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                  "1216 vs 1104")])
def test_disk_full_during_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, failure):
    torch.manual_seed(0)
    model = build_model("cond_detr_r10_tiny", num_classes=3, num_queries=4, dim_feedforward=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    ckpt_dir = tmp_path / "checkpoints"

    def save(iteration):
        return checkpointing.save_checkpoint(ckpt_dir, model, optimizer=opt, scheduler=sched, scaler=None, epoch=0,
                                             batch_in_epoch=iteration, iteration=iteration, metadata={})

    save(1)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:  # as if the disk filled up half-way
            fh.truncate(100)
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        save(2)
    monkeypatch.undo()
    state = ckpt_dir / "iter_0000002.state.pth"
    assert str(e.value).startswith(f"could not write {state}: no space left on device? (")
    assert "\n" not in str(e.value) and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["iter_0000001.safetensors", "iter_0000001.state.pth",
                                                          "latest.json"]  # no .tmp, no half pair
    assert json.loads((ckpt_dir / "latest.json").read_text())["iteration"] == 1
    assert load_resume_checkpoint("auto", tmp_path).state["iteration"] == 1  # still valid


def test_atomic_write_failure_names_the_file(tmp_path):
    from kd_detr.atomic import atomic_write

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match=re.escape(f"could not write {target}: Input/output error")):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


# ------------------------------------------------------------------ 5. zero / negative counts


@pytest.mark.parametrize("field,value,message", [
    ("log_every", 0, "--log-every must be >= 1, got 0"),
    ("checkpoint_every", 0, "--checkpoint-every must be >= 1, got 0"),
    ("max_iters", 0, "--max-iters must be >= 1, got 0"),
    ("max_iters", -5, "--max-iters must be >= 1, got -5"),
    ("warmup_iters", -3, "--warmup-iters must be >= 0, got -3"),
    ("epochs", 0, "--epochs must be >= 1, got 0"),
    ("batch_size", 0, "--batch-size must be >= 1, got 0"),
    ("eval_every_iters", 0, "--eval-every-iters must be >= 1, got 0"),
    ("keep_checkpoints", -1, "--keep-checkpoints must be >= 0 (0 keeps every checkpoint), got -1"),
])
def test_bad_counts_are_refused_naming_the_option(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        TrainConfig(**{field: value})
    assert f"train.{field}" in str(e.value)  # the recipe key too


def test_bad_counts_on_the_command_line_write_nothing(synth_data, tmp_path):
    out = tmp_path / "run"
    for option, value in (("--log-every", "0"), ("--checkpoint-every", "0"), ("--max-iters", "0"),
                          ("--keep-checkpoints", "-1")):
        result = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--output-dir", str(out), option,
                                           value])
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: {option} must be >= ")
        assert not out.exists()


def test_recipe_train_values_are_checked_the_same_way(synth_data, tmp_path):
    from kd_detr.data import DataSpec
    from kd_detr.runs.assemble import TeacherSourceSpec, assemble_run

    with pytest.raises(ValueError, match=re.escape("--checkpoint-every must be >= 1, got 0 (in a recipe: "
                                                   "train.checkpoint_every)")):
        assemble_run("cond_detr_r10_tiny", "baseline", DataSpec(str(synth_data)), TeacherSourceSpec(),
                     str(tmp_path / "run"), overrides=["train.checkpoint_every=0"])
    assert not (tmp_path / "run").exists()


def test_predict_top_k_must_be_positive(tmp_path):
    ckpt_file, image, output = tmp_path / "m.safetensors", tmp_path / "a.jpg", tmp_path / "out.json"
    ckpt_file.write_bytes(b"x")
    image.write_bytes(b"x")
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt_file), "--image", str(image),
                                       "--output", str(output), "--top-k", "0"])
    assert result.exit_code == 2 and "--top-k must be >= 1, got 0" in result.output
    assert not output.exists()


# ------------------------------------------------------------------ 6. unreadable checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_auto_falls_back_past_a_truncated_state(synth_data, run_copy, caplog):
    broken = ckpt(run_copy, 2, "state.pth")
    _truncate(broken)
    with caplog.at_level(logging.WARNING, logger="kd_detr.train"):
        trainer = Trainer(tiny_config(synth_data, run_copy, max_iters=2, checkpoint_every=1, keep_checkpoints=0,
                                      resume="auto"))
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(broken) in w and "falling back to the previous checkpoint" in w for w in warnings), warnings
    log = [json.loads(line) for line in (run_copy / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "loss" in r] == [1, 2]  # iteration 2 was redone from iteration 1
    assert load_training_state(find_resume_point("auto", run_copy))["iteration"] == 2  # rewritten, readable


def test_resume_auto_falls_back_past_a_truncated_weights_file(run_copy):
    _truncate(ckpt(run_copy, 2, "safetensors"))
    loaded = load_resume_checkpoint("auto", run_copy)
    assert loaded.point.iteration == 1 and str(ckpt(run_copy, 2, "safetensors")) in loaded.skipped[0]


def test_resume_auto_with_no_readable_checkpoint_names_the_files(synth_data, run_copy):
    for i in (1, 2):
        _truncate(ckpt(run_copy, i, "state.pth"))
    before = snapshot(run_copy)
    with pytest.raises(CheckpointUnreadable) as e:
        Trainer(tiny_config(synth_data, run_copy, max_iters=3, resume="auto")).fit()
    msg = str(e.value)
    assert msg.startswith(f"--resume auto: no readable checkpoint in {run_copy / 'checkpoints'} (")
    assert str(ckpt(run_copy, 2, "state.pth")) in msg and str(ckpt(run_copy, 1, "state.pth")) in msg
    assert "\n" not in msg and snapshot(run_copy) == before


def test_explicit_resume_of_a_broken_file_names_it(synth_data, run_copy):
    broken = ckpt(run_copy, 2, "state.pth")
    _truncate(broken)
    with pytest.raises(CheckpointUnreadable) as e:
        load_resume_checkpoint(str(broken), run_copy)
    assert str(e.value).startswith(f"--resume {broken}: {broken} is unreadable, truncated or corrupt (")
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(main, ["train", "--model", "cond_detr_r10_tiny", "--model-opt", "num_queries=10",
                                       "--model-opt", "dim_feedforward=128", "--data", str(synth_data),
                                       "--image-size", "64", "--num-workers", "0", "--output-dir", str(run_copy),
                                       "--resume", str(broken), "--no-progress"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: --resume {broken}: {broken} is unreadable")


# ------------------------------------------------------------------ 7. resume with another model


def test_resume_with_another_model_is_refused(synth_data, run_copy):
    before = snapshot(run_copy)
    cfg = tiny_config(synth_data, run_copy, max_iters=3, resume="auto",
                      model_overrides={"num_queries": 12, "dim_feedforward": 128})
    with pytest.raises(ValueError) as e:
        Trainer(cfg).fit()
    assert str(e.value) == (f"the checkpoint {ckpt(run_copy, 2, 'safetensors')} holds a cond_detr_r10_tiny "
                            "(num_queries=10) but this run builds a cond_detr_r10_tiny (num_queries=12): resume "
                            "with the same --model/--model-opt or start a new --output-dir")
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------ 8. stale temporary files


def test_run_start_removes_stale_temp_files(synth_data, run_copy, caplog):
    stale = [run_copy / "checkpoints" / ".iter_0000003.state.pth.k2j_9xq1.tmp", run_copy / ".metrics.json.ab12cd34.tmp"]
    kept = [run_copy / "notes.tmp", run_copy / ".cache.tmp", run_copy / "checkpoints" / "iter_0000009.tmp"]
    for p in stale + kept:
        p.write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="kd_detr.train"):
        Trainer(tiny_config(synth_data, run_copy, max_iters=2, resume="auto")).fit()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert any("removed 2 stale temporary file(s)" in r.getMessage() for r in caplog.records)
