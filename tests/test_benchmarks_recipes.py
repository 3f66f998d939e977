"""The per-recipe step benchmarks pick their recipes and pairs as documented, without running a step:
``benchmarks/hf_distill_step.py`` measures every teacher recipe (the three real-time ones first) and skips the
others with a reason; ``benchmarks/gpu_official.py --pair realtime`` builds RT-DETR R50 -> R18 configs."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.support import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


def _load(stem: str):
    if str(BENCH) not in sys.path:  # the scripts import their siblings (train_step, distill_step) by name
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"benchmark_{stem}", BENCH / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_recipes_are_the_teacher_ones_realtime_first():
    hfd = _load("hf_distill_step")
    recipes, skipped = hfd.teacher_recipes(None, [])
    names = list(recipes)
    assert names[:3] == ["d3etr_cross_family", "teach_detr", "d3etr_cross_family_teach"]
    assert all(r.distils for r in recipes.values())
    assert skipped.get("baseline") == "no teacher"
    # Teach-DETR is timed with as many teacher boxes as ground-truth objects (a random teacher passes no threshold)
    cfg = recipes["teach_detr"].sections["teach_detr"]
    assert cfg.score_threshold == 0.0 and cfg.max_targets == hfd.TEACH_TARGETS


def test_named_recipes_that_cannot_load_or_use_no_teacher_are_skipped_with_a_reason():
    hfd = _load("hf_distill_step")
    recipes, skipped = hfd.teacher_recipes(["teach_detr", "baseline", "no_such_recipe"], [], teach_targets=0)
    assert list(recipes) == ["teach_detr"]
    assert recipes["teach_detr"].sections["teach_detr"].score_threshold == 0.5  # the recipe's own
    assert "teacher" in skipped["baseline"]
    assert skipped["no_such_recipe"].startswith("does not load")


def test_rt_detr_pair_uses_the_shipped_teacher_architecture():
    hfd = _load("hf_distill_step")
    (teacher, overrides), student = hfd.default_pairs()["rt_detr -> rt_detr"]
    assert teacher == "hf_rt_detr_tiny" and overrides["d_model"] == 128 and "num_classes" not in overrides
    assert student == hfd.STUDENT


def test_realtime_pair_configs_are_r50_and_r18_sized():
    pytest.importorskip("transformers")
    gpu = _load("gpu_official")
    teacher, student = gpu.realtime_configs()
    t, s = teacher.hf_config, student.hf_config
    assert t["backbone_config"]["depths"] == [3, 4, 6, 3] and t["decoder_layers"] == 6
    assert s["backbone_config"]["depths"] == [2, 2, 2, 2] and s["backbone_config"]["layer_type"] == "basic"
    assert s["backbone_config"]["hidden_sizes"] == [64, 128, 256, 512] and s["decoder_layers"] == 3
    assert teacher.input_size == student.input_size == 640
