"""Training engine: a tiny model learns, and resume continues exactly."""

from __future__ import annotations

import json

import pytest
import torch

from kd_detr.engine.trainer import TrainConfig, Trainer, lr_lambda


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_config(data, out, **kw):
    base = dict(model="cond_detr_r10_tiny", model_overrides={"num_queries": 10, "dim_feedforward": 128},
                data=str(data), image_size=64, batch_size=4, num_workers=0, lr=1e-4, lr_backbone=1e-4,
                lr_drop=1000, output_dir=str(out), log_every=1, progress=False, eval_every_epochs=0)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_and_drop():
    f = lr_lambda(warmup_iters=10, drop_iter=20)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert f(10) == 1.0 and f(19) == 1.0
    assert f(20) == pytest.approx(0.1)


def test_resume_gives_identical_losses(synth_data, tmp_path):
    """6 iterations straight == 3 iterations, stop, resume, 3 more (dropout on, augmentation on)."""
    full = tiny_config(synth_data, tmp_path / "full", max_iters=6, checkpoint_every=100)
    Trainer(full).fit()
    part = tiny_config(synth_data, tmp_path / "part", max_iters=3, checkpoint_every=100)
    Trainer(part).fit()
    resumed = tiny_config(synth_data, tmp_path / "part", max_iters=6, checkpoint_every=100, resume="auto")
    Trainer(resumed).fit()

    a = [r for r in read_log(tmp_path / "full" / "log.jsonl") if "loss" in r]
    b = [r for r in read_log(tmp_path / "part" / "log.jsonl") if "loss" in r]
    assert [r["iteration"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_ce_unscaled", "loss_bbox_unscaled", "loss_giou_unscaled", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["iteration"], key)
    # the run record is written
    record = json.loads((tmp_path / "full" / "config.json").read_text())
    assert record["config"]["train"]["max_iters"] == 6 and "torch" in record["versions"]


def test_resume_rejects_missing_checkpoint(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path / "x", max_iters=1, resume=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        Trainer(cfg).fit()


def test_log_has_every_loss_term(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path / "r", max_iters=2)
    Trainer(cfg).fit()
    rec = [r for r in read_log(tmp_path / "r" / "log.jsonl") if "loss" in r][-1]
    layers = 2  # cond_detr_r10_tiny has 2 decoder layers: last + one aux
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        assert term in rec and term + "_unscaled" in rec and f"{term}_0" in rec
        assert f"{term}_{layers - 1}" not in rec
    for key in ("lr", "lr_backbone", "grad_norm", "iter_time", "data_time", "peak_mem_mb", "eta_s"):
        assert key in rec


def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    """4 synthetic images, evaluated on themselves: AP climbs from ~0 to well above it in 100 steps."""
    from kd_detr.data import generate_synthetic

    root = tmp_path / "data"
    generate_synthetic(root, num_train=4, num_val=1, image_size=64, seed=5, objects_per_image=(1, 3))
    ann, img = str(root / "annotations" / "instances_train2017.json"), str(root / "train2017")
    cfg = TrainConfig(model="cond_detr_r10_tiny", model_overrides={"num_queries": 10, "dropout": 0.0},
                      train_ann=ann, train_images=img, val_ann=ann, val_images=img, image_size=64, augment=False,
                      batch_size=4, num_workers=0, lr=1e-3, lr_backbone=1e-3, lr_drop=1000, max_iters=100,
                      warmup_iters=20, eval_every_epochs=0, output_dir=str(tmp_path / "run"), log_every=10,
                      progress=False)
    start = Trainer(cfg)
    start.setup()
    before, _ = start.evaluate()
    trainer = Trainer(cfg)
    after = trainer.fit()
    assert before.metrics["AP"] < 0.05
    assert after["AP"] > 0.5 and after["AP50"] > 0.8, after
    losses = [r["loss"] for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    # it learned to look at the images: boxes differ between images (a model that memorised one
    # fixed box per query, the from-scratch plateau, has a spread of ~0.001 here)
    from torch.utils.data import DataLoader

    from kd_detr.data import collate_fn

    images, mask, _ = next(iter(DataLoader(trainer.train_set, batch_size=4, collate_fn=collate_fn)))
    with torch.no_grad():
        boxes = trainer.raw_model.eval()(images, mask)["pred_boxes"]
    assert boxes.std(0).mean() > 0.03


def test_rerun_of_finished_run_reports_metrics(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path / "r", max_iters=2, eval_max_images=4)
    first = Trainer(cfg).fit()
    again = Trainer(tiny_config(synth_data, tmp_path / "r", max_iters=2, eval_max_images=4, resume="auto")).fit()
    assert first["iteration"] == again["iteration"] == 2
    assert again["AP"] == pytest.approx(first["AP"])
    losses = [r["iteration"] for r in read_log(tmp_path / "r" / "log.jsonl") if "loss" in r]
    assert losses == [1, 2]  # nothing retrained


def test_fresh_run_refuses_to_overwrite_a_run(synth_data, tmp_path):
    Trainer(tiny_config(synth_data, tmp_path / "r", max_iters=1)).fit()
    with pytest.raises(ValueError, match="--resume auto"):
        Trainer(tiny_config(synth_data, tmp_path / "r", max_iters=1)).fit()
