"""`kd-detr train` goes through kd_detr.runs like distill: its options become TrainConfig fields by name
(renames and --no-X negations in one table) and runs/assemble.py builds the run."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from kd_detr.cli import main
from kd_detr.cli.train_command import NEGATED, RENAMED
from kd_detr.engine.train_config import TrainConfig


@pytest.fixture
def captured(monkeypatch):
    """What runs/assemble.py's Run.run hands to the engine's train(): (cfg, recipe, teacher, views, view_seed)."""
    calls = []

    def fake_train(cfg, recipe=None, teacher=None, views=None, view_seed=0):
        calls.append((cfg, recipe, teacher, views, view_seed))
        return {"AP": 0.25, "best_ap": 0.5}

    monkeypatch.setattr("kd_detr.runs.assemble.train", fake_train)
    return calls


def test_every_train_option_is_a_train_config_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    names = {p.name for p in main.commands["train"].params} - {"allow_partial_weights"}
    mapped = {NEGATED.get(n, RENAMED.get(n, n)) for n in names}
    assert mapped <= fields, mapped - fields
    assert set(RENAMED) | set(NEGATED) <= names  # no stale entry in the tables


def test_train_defaults_build_the_config_they_always_built(tmp_path, captured):
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (cfg, recipe, teacher, views, view_seed), = captured
    assert (recipe, teacher, views, view_seed) == (None, None, None, 0)
    # the click defaults, as train_cmd passed them to TrainConfig one by one; the optimisation fields come
    # from the training preset (auto: official for a kd-detr model) and resolve to the same values
    from kd_detr.engine.presets import PRESET_FIELDS, resolve_preset

    assert all(getattr(cfg, k) is None for k in PRESET_FIELDS) and cfg.preset == "auto"
    expected = TrainConfig(preset="official", schedule="step", flat_fraction=0.0, no_aug_fraction=0.0,
        lr_min_factor=0.1, ema=False, ema_decay=0.9999, ema_warmup=2000,
        model="cond_detr_r18_tiny", model_overrides={}, backbone_weights=None, init_checkpoint=None,
        data=str(tmp_path), train_ann=None, train_images=None, val_ann=None, val_images=None, image_size=None,
        label_map="contiguous", num_workers=2, augment=True, batch_size=2, lr=1e-4, lr_backbone=1e-5,
        weight_decay=1e-4, clip_max_norm=0.1, epochs=50, max_iters=None, lr_drop=40, lr_drop_iter=None,
        warmup_iters=0, amp=False, output_dir="runs/train", seed=42, device="auto", log_every=10,
        checkpoint_every=500, keep_checkpoints=2, eval_every_epochs=1, eval_every_iters=None, eval_batch_size=2,
        eval_max_images=None, resume=None, aux_loss=True, deterministic=False, progress=True)
    assert resolve_preset(cfg)[0].to_dict() == expected.to_dict()
    assert res.output.strip().endswith("final AP 25.0 (best 50.0); outputs in runs/train")


def test_every_train_option_reaches_its_field(tmp_path, captured):
    weights, init = tmp_path / "backbone.pth", tmp_path / "init.safetensors"
    ann = tmp_path / "train.json"
    for f in (weights, init, ann):
        f.write_text("")
    args = ["train", "--model", "hf:/no/such/folder", "--model-opt", "num_queries=8", "--model-opt", "name=x",
            "--backbone-weights", weights, "--init-checkpoint", init, "--data", tmp_path, "--train-ann", ann,
            "--train-images", tmp_path, "--val-ann", ann, "--val-images", tmp_path, "--image-size", "96",
            "--num-workers", "0", "--label-map", "coco91", "--no-augment", "--batch-size", "3", "--lr", "2e-4",
            "--lr-backbone", "3e-5", "--weight-decay", "0.5", "--clip-max-norm", "0", "--epochs", "7",
            "--max-iters", "11", "--lr-drop", "5", "--lr-drop-iter", "9", "--warmup-iters", "4", "--amp",
            "--preset", "d_fine", "--schedule", "flat_cosine", "--no-ema", "--ema-decay", "0.5", "--ema-warmup", "7",
            "--output-dir", tmp_path / "out", "--seed", "3", "--device", "cpu", "--log-every", "2",
            "--checkpoint-every", "6", "--keep-checkpoints", "0", "--eval-every-epochs", "0",
            "--eval-every-iters", "5", "--eval-batch-size", "4", "--eval-max-images", "8", "--resume", "auto",
            "--no-aux-loss", "--deterministic", "--no-progress", "--allow-partial-weights"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    (cfg, recipe, teacher, _, _), = captured
    assert recipe is None and teacher is None
    expected = TrainConfig(
        model="hf:/no/such/folder", model_overrides={"num_queries": 8, "name": "x", "allow_partial_weights": True},
        backbone_weights=str(weights), init_checkpoint=str(init), data=str(tmp_path), train_ann=str(ann),
        train_images=str(tmp_path), val_ann=str(ann), val_images=str(tmp_path), image_size=96, label_map="coco91",
        num_workers=0, augment=False, batch_size=3, lr=2e-4, lr_backbone=3e-5, weight_decay=0.5, clip_max_norm=0.0,
        epochs=7, max_iters=11, lr_drop=5, lr_drop_iter=9, warmup_iters=4, amp=True, output_dir=str(tmp_path / "out"),
        preset="d_fine", schedule="flat_cosine", ema=False, ema_decay=0.5, ema_warmup=7,
        seed=3, device="cpu", log_every=2, checkpoint_every=6, keep_checkpoints=0, eval_every_epochs=0,
        eval_every_iters=5, eval_batch_size=4, eval_max_images=8, resume="auto", aux_loss=False, deterministic=True,
        progress=False)
    assert cfg.to_dict() == expected.to_dict()
    assert f"outputs in {tmp_path / 'out'}" in res.output


def test_train_refuses_partial_weights_for_a_kd_detr_model(tmp_path, captured):
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--allow-partial-weights"])
    assert res.exit_code == 2 and "load strictly as kd-detr models" in res.output and not captured


def test_train_goes_through_runs_assemble(tmp_path, monkeypatch, captured):
    """The command asks runs/assemble.py for the run; it does not call the engine itself."""
    import kd_detr.runs.assemble as assemble

    seen = []
    real = assemble.assemble_train_run

    def spy(*args, **kwargs):
        run = real(*args, **kwargs)
        seen.append(run)
        return run

    monkeypatch.setattr(assemble, "assemble_train_run", spy)
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--max-iters", "3"])
    assert res.exit_code == 0, res.output
    (run,) = seen
    assert isinstance(run, assemble.Run) and run.recipe is None and run.cfg is captured[0][0]
    assert run.cfg.max_iters == 3
