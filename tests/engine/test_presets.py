"""Training presets (train.preset): every preset complete and cited, every family's rules reach its
transformers model, ``auto`` picks the family's, explicit values win, the flat-cosine schedule by hand, the
no-augmentation tail, and a real run that starts with its family's groups."""

from __future__ import annotations

import json
import logging
import math
import types

import pytest
import torch

from kd_detr.data import AugmentationPolicy
from kd_detr.engine.hooks import AugmentationTail
from kd_detr.engine.optim import build_scheduler, flat_cosine_lambda
from kd_detr.engine.presets import (FAMILY_PRESETS, PRESET_FIELDS, PRESETS, GroupRule, TrainingPreset, get_preset,
                                    grouped_parameters, register_preset, resolve_preset)
from kd_detr.engine.train_config import TrainConfig
from kd_detr.engine.trainer import Trainer
from kd_detr.models import build_model, get_config, list_models

HF_MODELS = [n for n in list_models() if n.startswith("hf_")]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_complete_and_cited(name):
    preset = PRESETS[name]
    assert set(preset.values) == set(PRESET_FIELDS)
    assert preset.sources and preset.description
    # a student that starts from trained weights gets every value as the preset writes it
    cfg, got = resolve_preset(TrainConfig(preset=name, init_checkpoint="trained.safetensors"))
    assert got is preset and cfg.preset == name
    assert all(getattr(cfg, k) == v for k, v in preset.values.items())


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "official"])
def test_a_random_backbone_trains_at_the_base_rate_under_a_family_preset(name, caplog):
    """The families' reduced backbone rates are for ImageNet-initialised backbones: a student that starts from
    random weights trains its backbone at lr (logged); an explicit lr_backbone, or official, is kept."""
    preset = PRESETS[name]
    with caplog.at_level(logging.INFO, logger="kd_detr.train"):
        cfg, _ = resolve_preset(TrainConfig(model="hf_rt_detr_tiny", preset=name))
    lr, lr_backbone = preset.values["lr"], preset.values["lr_backbone"]
    assert (cfg.lr, cfg.lr_backbone) == (lr, max(lr, lr_backbone))
    assert any("starts from random weights" in r.getMessage() for r in caplog.records) == (lr_backbone < lr)
    assert resolve_preset(TrainConfig(model="hf_rt_detr_tiny", preset=name, lr_backbone=1e-6))[0].lr_backbone == 1e-6
    assert resolve_preset(TrainConfig(model="hf_rt_detr_tiny", preset=name, lr=1e-3))[0].lr_backbone == \
        max(1e-3, lr_backbone)
    assert resolve_preset(TrainConfig(model="hf_rt_detr_tiny", preset=name,
                                      backbone_weights="r18.pth"))[0].lr_backbone == lr_backbone
    assert resolve_preset(TrainConfig(model="cond_detr_r10_tiny", preset="official"))[0].lr_backbone == 1e-5


@pytest.mark.parametrize("model", HF_MODELS)
def test_each_family_gets_its_preset_and_its_rules_reach_the_model(model, caplog):
    family = get_config(model).family
    cfg, preset = resolve_preset(TrainConfig(model=model))
    assert preset.name == FAMILY_PRESETS.get(family, "official")
    net = build_model(model, num_classes=3)
    with caplog.at_level(logging.INFO, logger="kd_detr.train"):
        groups = grouped_parameters(net, preset, cfg)
    trainable = [p for p in net.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    if preset.groups and preset.name != "official":  # a family preset that matched nothing would be a no-op
        assert len(groups) >= 2, [g["name"] for g in groups]
        assert any(g["weight_decay"] == 0.0 for g in groups)
    assert groups[0]["name"] == "rest" and groups[0]["lr"] == cfg.lr  # the log's "lr" is the base rate
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("parameter group")]
    assert len(logged) == len(groups) and all(f"preset {preset.name}" in m for m in logged)


def test_official_keeps_conditional_detrs_groups():
    """--set train.preset=official: the backbone at lr_backbone, the rest at lr, as before presets existed."""
    net = build_model("cond_detr_r10_tiny", num_classes=3)
    cfg, preset = resolve_preset(TrainConfig(model="cond_detr_r10_tiny"))
    assert preset.name == "official"
    assert (cfg.lr, cfg.lr_backbone, cfg.weight_decay, cfg.clip_max_norm, cfg.lr_drop, cfg.warmup_iters, cfg.ema,
            cfg.schedule) == (1e-4, 1e-5, 1e-4, 0.1, 40, 0, False, "step")
    groups = grouped_parameters(net, preset, cfg)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("rest", 1e-4, 1e-4),
                                                                          ("backbone", 1e-5, 1e-4)]
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in groups[1]["params"])
    assert not any(names[id(p)].startswith("backbone.") for p in groups[0]["params"])
    # a transformers student asked for official trains as before: everything at lr
    cfg, preset = resolve_preset(TrainConfig(model="hf_rt_detr_tiny", preset="official"))
    assert [g["name"] for g in grouped_parameters(build_model("hf_rt_detr_tiny", num_classes=3), preset, cfg)] == ["rest"]


def test_explicit_values_win_over_the_preset_and_a_bad_name_is_refused(caplog):
    with caplog.at_level(logging.INFO, logger="kd_detr.train"):
        cfg, _ = resolve_preset(TrainConfig(model="hf_d_fine_tiny", lr=3e-4, ema=False, warmup_iters=5))
    assert (cfg.preset, cfg.lr, cfg.ema, cfg.warmup_iters, cfg.lr_backbone) == ("d_fine", 3e-4, False, 5, 4e-4)
    assert "preset d_fine: the run sets lr=0.0003, warmup_iters=5, ema=False (the preset's: lr=0.0008, " \
           "warmup_iters=500, ema=True)" in [r.getMessage() for r in caplog.records]
    with pytest.raises(ValueError, match="train.preset must be auto or one of official, rt_detr"):
        resolve_preset(TrainConfig(preset="yolo"))
    with pytest.raises(ValueError, match="leaves .*'ema'.* unset"):
        register_preset(TrainingPreset("half", "x", values={k: None for k in PRESET_FIELDS if k != "ema"}))
    with pytest.raises(ValueError, match="lr must name lr or lr_backbone"):
        GroupRule("g", "x", lr="lr_head")


def test_flat_cosine_by_hand():
    """DEIM's schedule: (it/w)^2 warm-up, flat, half cosine to min, min for the no-aug tail."""
    f = flat_cosine_lambda(total_iters=100, warmup_iters=10, flat_iters=40, no_aug_iters=20, min_factor=0.5)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.25) and f(10) == 1.0
    assert f(25) == 1.0 and f(40) == 1.0
    assert f(60) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))  # = 0.75, the cosine's middle
    assert f(79) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 39 / 40)))
    assert f(80) == 0.5 and f(99) == 0.5


def test_build_scheduler_follows_the_preset(caplog):
    cfg, _ = resolve_preset(TrainConfig(model="hf_rt_detr_tiny", preset="deim"))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    with caplog.at_level(logging.WARNING, logger="kd_detr.train"):
        sched = build_scheduler(cfg, opt, iters_per_epoch=10, total_iters=10000)
    assert not caplog.records  # a 2000-iteration warm-up fits a quarter of 10000
    f = sched.lr_lambdas[0]
    flat, tail = round(64 / 132 * 10000), 10000 - round(12 / 132 * 10000)  # DEIM-S's epochs as fractions
    assert f(1000) == pytest.approx(0.25) and f(2000) == 1.0 and f(flat) == 1.0
    assert 0.5 < f(flat + 1) < 1.0 and f(tail) == 0.5 and f(9999) == 0.5
    with caplog.at_level(logging.WARNING, logger="kd_detr.train"):
        build_scheduler(cfg, opt, iters_per_epoch=10, total_iters=1000)
    assert any("train.warmup_iters = 2000" in r.getMessage() for r in caplog.records)


def test_the_tail_drops_crop_and_multi_scale_from_its_epoch_on():
    policy = AugmentationPolicy(scales=(96, 112, 128), max_size=200, crop_resize_sizes=(64,), crop_min=32,
                                crop_max=64, eval_size=128)
    tail = policy.without_strong_augmentation()
    assert tail.scales == (128,) and tail.crop_prob == 0.0 and tail.flip_prob == policy.flip_prob
    assert tail.test_size == policy.test_size
    hook = AugmentationTail(start=6)
    hook.trainer = t = types.SimpleNamespace(iteration=4, total_iters=10, train_set=types.SimpleNamespace(
        transforms=policy))
    hook.before_epoch()
    assert t.train_set.transforms is policy  # epoch starting at iteration 4 < 6: still augmented
    t.iteration = 8  # the next epoch starts at 8 >= 6
    hook.before_epoch()
    assert t.train_set.transforms == tail


def test_a_run_trains_by_its_family_preset(synth_data, tmp_path, caplog):
    """hf_rt_detr_tiny with preset auto: rt_detr's groups logged at start, EMA on, recorded in config.json."""
    cfg = TrainConfig(model="hf_rt_detr_tiny", data=str(synth_data), image_size=64, batch_size=2, num_workers=0,
                      max_iters=2, output_dir=str(tmp_path / "run"), log_every=1, progress=False,
                      eval_every_epochs=0, eval_max_images=2)
    with caplog.at_level(logging.INFO, logger="kd_detr.train"):
        Trainer(cfg).fit()
    record = json.loads((tmp_path / "run" / "config.json").read_text())["config"]["train"]
    # a random-init backbone: at the base rate, not RT-DETR's 0.1x for an ImageNet one
    assert (record["preset"], record["ema"], record["lr_backbone"]) == ("rt_detr", True, 1e-4)
    assert any(r.getMessage().startswith("parameter group backbone (preset rt_detr") for r in caplog.records)
    assert (tmp_path / "run" / "model_final.safetensors").exists()


def test_a_run_resumed_inside_the_tail_trains_as_the_uninterrupted_one(synth_data, tmp_path, caplog, monkeypatch):
    """12 iterations (two epochs of 6) with the last half without strong augmentation: interrupted after
    iteration 8 (a checkpoint) and resumed, the run switches to the tail policy on resuming and logs the same
    losses as the run without a stop."""
    from kd_detr.engine.hooks import HookBase

    class Interrupt(HookBase):
        def __init__(self, trainer):
            self.trainer = trainer

        def after_step(self):
            if self.trainer.iteration == 8:
                raise KeyboardInterrupt

    def config(out, resume=None):
        return TrainConfig(model="cond_detr_r10_tiny", model_overrides={"num_queries": 10, "dim_feedforward": 128},
                           data=str(synth_data), image_size=64, batch_size=4, num_workers=0, lr=1e-3,
                           lr_backbone=1e-3, lr_drop=1000, output_dir=str(out), log_every=1, progress=False,
                           eval_every_epochs=0, no_aug_fraction=0.5, ema=False, max_iters=12,
                           checkpoint_every=4, resume=resume)

    def messages():
        found = [r.getMessage() for r in caplog.records if "without crop and multi-scale" in r.getMessage()]
        caplog.clear()
        return found

    build_hooks = Trainer.build_hooks
    with caplog.at_level(logging.INFO, logger="kd_detr.train"):
        Trainer(config(tmp_path / "full")).fit()
        assert messages() == ["iteration 6: the last 6 iterations train without crop and multi-scale "
                              "(train.no_aug_fraction)"]
        monkeypatch.setattr(Trainer, "build_hooks", lambda self: build_hooks(self) + [Interrupt(self)])
        with pytest.raises(KeyboardInterrupt):
            Trainer(config(tmp_path / "part")).fit()
        assert len(messages()) == 1
        monkeypatch.setattr(Trainer, "build_hooks", build_hooks)
        Trainer(config(tmp_path / "part", resume="auto")).fit()
        assert messages() == ["iteration 8: the last 4 iterations train without crop and multi-scale "
                              "(train.no_aug_fraction)"]

    def losses(run):
        return {r["iteration"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "loss" in r}

    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == list(range(1, 13)) and all(part[i] == full[i] for i in range(1, 13))
