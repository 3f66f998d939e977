"""TensorBoard event files beside log.jsonl hold every logged term, lr and AP with the same values."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kd_detr.cli import main
from kd_detr.engine.logger import RunLogger

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_distill_writes_every_logged_scalar_to_tensorboard(synth_data, tmp_path):
    from tests.support.runs import distill_args, save_teacher

    teacher = save_teacher(tmp_path, synth_data)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, distill_args(synth_data, out, teacher, "--set", "train.max_iters=2",
                                                "--set", "train.eval_every_iters=2",
                                                "--set", "train.eval_max_images=4"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    tb = _scalars(out)
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    checked = 0
    for rec in records:
        for key, value in rec.items():
            if key in ("iteration", "epoch") or not isinstance(value, (int, float)):
                continue
            assert tb[key][rec["iteration"]] == pytest.approx(value, rel=1e-6, abs=1e-7), key
            checked += 1
    assert {"loss", "lr", "student.total", "distill.total", "distill.adaptive.pred_cls.l0", "eval/AP"} <= set(tb)
    assert checked > 100


def test_resumed_logger_purges_the_steps_after_the_log(tmp_path):
    log = RunLogger(tmp_path)
    for it in (1, 2, 3):
        log.log({"iteration": it, "loss": float(it)})
    log.close()
    # a resume at iteration 1: the trainer truncates log.jsonl, then reopens the logger
    (tmp_path / "log.jsonl").write_text(json.dumps({"iteration": 1, "loss": 1.0}) + "\n")
    log = RunLogger(tmp_path)
    log.log({"iteration": 2, "loss": 20.0})
    log.close()
    assert _scalars(tmp_path)["loss"] == {1: 1.0, 2: 20.0}
