"""The quickstart teachers shipped in teachers/ (one per quickstart, kd_detr.runs.quickstart.QUICKSTARTS): each
loads, is small, reaches its recorded AP, and its card's commands are the settings --train-teacher uses."""

from __future__ import annotations

import pytest

from kd_detr.runs import quickstart
from kd_detr.data import generate_synthetic
from kd_detr.teacher.card import load_card
from kd_detr.runs.inference import evaluate_checkpoint


SETUPS = sorted(quickstart.QUICKSTARTS)


@pytest.mark.parametrize("setup", SETUPS)
def test_card_records_how_the_teacher_was_trained(setup):
    q = quickstart.QUICKSTARTS[setup]
    card = load_card(q.card)
    t = card.training
    assert card.model == q.teacher and card.image_size == quickstart.QUICKSTART_DATA["image_size"]
    assert card.label_map == "contiguous" and card.num_classes == 6
    # the data it was trained on is the quickstart's generator with 4x the images
    data = dict(t["data"])
    assert data.pop("num_train") == quickstart.TEACHER_DATA_FACTOR * quickstart.QUICKSTART_DATA["num_train"]
    expected = {k: (list(v) if isinstance(v, tuple) else v) for k, v in quickstart.QUICKSTART_DATA.items()}
    expected.pop("num_train")
    assert data == expected
    # the recorded commands are the ones the code documents (and --train-teacher runs)
    assert t["commands"] == quickstart.teacher_commands(t["iterations"], t["seed"], t["data"]["num_train"], setup=q)
    assert t["iterations"] == q.teacher_iters and t["minutes"] > 0
    assert {k: v for k, v in card.model_overrides.items() if k != "num_classes"} == dict(q.teacher_opts) or \
        setup == "cond_detr"  # the Conditional DETR card records only the fields that differ from its default


@pytest.mark.parametrize("setup", SETUPS)
def test_shipped_teacher_loads_and_reaches_its_recorded_ap(setup, tmp_path):
    card = load_card(quickstart.QUICKSTARTS[setup].card)
    path = card.require_checkpoint()
    assert path.stat().st_size <= (20 if setup == "cond_detr" else 15) * 2**20  # the RT-DETR one: 15 MB in float16
    # regenerate the validation images only: image i of a split depends on (seed, split, i) alone
    params = dict(card.training["data"], num_train=0)
    params["objects_per_image"] = tuple(params["objects_per_image"])
    data = generate_synthetic(tmp_path / "data", progress=False, **params)
    result, _ = evaluate_checkpoint(path, data=str(data), image_size=card.image_size, num_workers=0, batch_size=8,
                                    output_dir=str(tmp_path / "eval"), device="cpu")
    assert 100 * result.metrics["AP"] == pytest.approx(card.known_ap, abs=0.15)
    assert card.known_ap >= 15.0  # a teacher worth distilling from on this data


@pytest.mark.parametrize("setup", SETUPS)
def test_recorded_commands_are_the_settings_train_teacher_uses(setup, tmp_path, monkeypatch):
    """The card's shell commands and ``kd-detr quickstart --train-teacher`` (teacher_train_config and
    QUICKSTART_DATA) must not drift apart: run the commands and compare what they produce."""
    import dataclasses
    import json
    import shlex
    from pathlib import Path

    from click.testing import CliRunner

    from kd_detr.cli import main
    from kd_detr.runs import assemble

    monkeypatch.chdir(tmp_path)
    synth_cmd, train_cmd = quickstart.teacher_commands(iters=40, seed=3, num_train=8, setup=setup)
    res = CliRunner().invoke(main, shlex.split(synth_cmd)[1:], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ref = generate_synthetic(tmp_path / "ref", progress=False, **dict(quickstart.QUICKSTART_DATA, num_train=8))
    info = [json.loads((root / "annotations" / "instances_train2017.json").read_text())["info"]
            for root in (Path("teacher_data"), ref)]
    assert info[0]["generator_params"] == info[1]["generator_params"] and info[0]["num_images"] == 8

    seen = {}
    monkeypatch.setattr(assemble, "train", lambda cfg, *run: seen.setdefault("cfg", cfg) and {})
    res = CliRunner().invoke(main, shlex.split(train_cmd)[1:], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = dataclasses.asdict(seen["cfg"])
    want = dataclasses.asdict(quickstart.teacher_train_config(Path("teacher_data"), Path("teacher"), 40, 3,
                                                              setup=setup))
    # --lr-drop-iter wins over the epoch-based lr_drop (the preset fills it: not a setting of the teacher)
    for d in (got, want):
        d.pop("lr_drop")
        d.pop("progress")
    assert got == want
