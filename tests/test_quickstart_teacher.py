"""The quickstart teacher shipped in teachers/: it loads, it is small, and it reaches its recorded AP."""

from __future__ import annotations

import pytest

from kd_detr import quickstart
from kd_detr.data import generate_synthetic
from kd_detr.distill.teacher_card import load_card
from kd_detr.inference import evaluate_checkpoint


def test_card_records_how_the_teacher_was_trained():
    card = load_card("quickstart_teacher")
    t = card.training
    assert card.model == quickstart.TEACHER and card.image_size == quickstart.QUICKSTART_DATA["image_size"]
    assert card.label_map == "contiguous" and card.num_classes == 6
    # the data it was trained on is the quickstart's generator with 4x the images
    data = dict(t["data"])
    assert data.pop("num_train") == quickstart.TEACHER_DATA_FACTOR * quickstart.QUICKSTART_DATA["num_train"]
    expected = {k: (list(v) if isinstance(v, tuple) else v) for k, v in quickstart.QUICKSTART_DATA.items()}
    expected.pop("num_train")
    assert data == expected
    # the recorded commands are the ones the code documents (and --train-teacher runs)
    assert t["commands"] == quickstart.teacher_commands(t["iterations"], t["seed"], t["data"]["num_train"])
    assert t["iterations"] == quickstart.TEACHER_ITERS and t["minutes"] > 0


def test_shipped_teacher_loads_and_reaches_its_recorded_ap(tmp_path):
    card = load_card("quickstart_teacher")
    path = card.require_checkpoint()
    assert path.stat().st_size <= 20 * 2**20
    # regenerate the validation images only: image i of a split depends on (seed, split, i) alone
    params = dict(card.training["data"], num_train=0)
    params["objects_per_image"] = tuple(params["objects_per_image"])
    data = generate_synthetic(tmp_path / "data", progress=False, **params)
    result, _ = evaluate_checkpoint(path, data=str(data), image_size=card.image_size, num_workers=0, batch_size=8,
                                    output_dir=str(tmp_path / "eval"), device="cpu")
    assert 100 * result.metrics["AP"] == pytest.approx(card.known_ap, abs=0.15)
    assert card.known_ap >= 15.0  # a teacher worth distilling from on this data
