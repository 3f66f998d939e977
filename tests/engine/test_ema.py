"""EMA of the student's weights (``train.ema``): the RT-DETR formula by hand, tied tensors, exact resume, the
EMA as the run's evaluated / saved model, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kd_detr.engine.ema import ModelEMA
from kd_detr.engine.trainer import TrainConfig, Trainer


def tiny_config(data, out, **kw):
    base = dict(model="cond_detr_r10_tiny", model_overrides={"num_queries": 10, "dim_feedforward": 128},
                data=str(data), image_size=64, batch_size=4, num_workers=0, lr=1e-3, lr_backbone=1e-3,
                lr_drop=1000, output_dir=str(out), log_every=1, progress=False, eval_every_epochs=0,
                eval_max_images=4, ema=True, ema_decay=0.9, ema_warmup=3)
    base.update(kw)
    return TrainConfig(**base)


def test_ema_by_hand():
    """Three updates of a 2-weight model with decay 0.5 and warm-up 2, against the formula written out."""
    model = nn.Linear(1, 1, bias=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-2.0)
    ema = ModelEMA(model, decay=0.5, warmup=2)
    w, b = 1.0, -2.0  # the copy starts at the weights
    for step, (nw, nb) in enumerate([(3.0, 0.0), (5.0, 4.0), (-1.0, 1.0)], start=1):
        with torch.no_grad():
            model.weight.fill_(nw)
            model.bias.fill_(nb)
        ema.update(model)
        d = 0.5 * (1 - math.exp(-step / 2))
        w, b = d * w + (1 - d) * nw, d * b + (1 - d) * nb
        assert ema.module.weight.item() == pytest.approx(w, abs=1e-6)
        assert ema.module.bias.item() == pytest.approx(b, abs=1e-6)
    assert ema.updates == 3 and not ema.module.weight.requires_grad
    # warmup 0: the plain decay from the first update
    assert ModelEMA(model, decay=0.9, warmup=0).decay_at(1) == 0.9


def test_tied_tensors_are_averaged_once():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight  # tied
    ema = ModelEMA(model, decay=0.5, warmup=0)
    before = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update(model)
    assert ema.module[0].weight is ema.module[1].weight
    assert torch.allclose(ema.module[0].weight, before + 1.0)  # 0.5 * w + 0.5 * (w + 2), not applied twice


@pytest.mark.parametrize("bad, message", [(dict(ema_decay=1.0), "--ema-decay must be in"),
                                          (dict(ema_warmup=-1), "--ema-warmup must be")])
def test_bad_ema_options_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_resume_with_ema_is_exact(synth_data, tmp_path):
    """4 iterations straight == 2, stop, resume, 2 more: the same losses, and the same EMA (model_final)."""
    Trainer(tiny_config(synth_data, tmp_path / "full", max_iters=4)).fit()
    Trainer(tiny_config(synth_data, tmp_path / "part", max_iters=2)).fit()
    Trainer(tiny_config(synth_data, tmp_path / "part", max_iters=4, resume="auto")).fit()

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    full, meta = _tensors(tmp_path / "full" / "model_final.safetensors")
    part, _ = _tensors(tmp_path / "part" / "model_final.safetensors")
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    assert json.loads(meta["extra_metadata"])["ema"] is True
    # the EMA is not the raw weights of the last checkpoint
    raw, _ = _tensors(tmp_path / "full" / "checkpoints" / "iter_0000004.safetensors")
    assert any(not torch.equal(full[k], raw[k]) for k in full if full[k].is_floating_point())


def test_the_ema_is_the_runs_model_and_the_raw_weights_are_evaluated_beside_it(synth_data, tmp_path):
    """With decay 0 the EMA is the weights after each step: model_final equals the raw checkpoint, and the EMA's
    AP equals the raw AP; both are logged."""
    out = tmp_path / "run"
    metrics = Trainer(tiny_config(synth_data, out, max_iters=2, ema_decay=0.0)).fit()
    final, _ = _tensors(out / "model_final.safetensors")
    raw, _ = _tensors(out / "checkpoints" / "iter_0000002.safetensors")
    assert all(torch.equal(final[k], raw[k]) for k in raw)
    assert metrics["AP"] == metrics["raw"]["AP"]
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval/AP" in r]
    assert evals and "eval_raw/AP" in evals[-1] and evals[-1]["eval/AP"] == evals[-1]["eval_raw/AP"]


def test_resume_with_another_ema_setting_is_refused(synth_data, tmp_path):
    Trainer(tiny_config(synth_data, tmp_path / "r", max_iters=1)).fit()
    with pytest.raises(ValueError, match="written with train.ema = True, this run has train.ema = False"):
        Trainer(tiny_config(synth_data, tmp_path / "r", max_iters=2, resume="auto", ema=False)).fit()
