"""A recipe whose methods need a student capability (``config.supports``: request fields, ``heads``,
``output_norm``, ``decode``) the student lacks is refused when the run is built, naming the recipe section,
the family and the capability, for every shipped recipe and every registered model."""

from __future__ import annotations

import pytest
import torch

from kd_detr.engine.recipe import list_recipes, load_recipe
from kd_detr.methods import list_methods
from kd_detr.methods.registry import build_methods, check_capabilities
from kd_detr.models import build_model, get_config, list_models
from kd_detr.models.detector import CAPABILITIES
from kd_detr.models.hf import HFModelConfig


def _student_names() -> list[str]:
    return ["cond_detr_r10_tiny"] + sorted(n for n in list_models() if n.startswith("hf_"))


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
@pytest.mark.parametrize("student", _student_names())
def test_every_recipe_is_built_or_refused_by_capability(recipe, student):
    r = load_recipe(recipe)
    config = get_config(student)
    lacking = {name: sorted(cls.requires(r.sections[name]) - config.supports)
               for name, cls in list_methods().items() if cls.enabled(r.sections[name])}
    lacking = {k: v for k, v in lacking.items() if v}
    if lacking:
        section, caps = next(iter(lacking.items()))
        with pytest.raises(ValueError) as err:
            build_methods(r.sections, config, torch.nn.Identity(), teacher=lambda: config)
        msg = str(err.value)
        assert msg.startswith(f"recipe section [{section}] needs the student's {', '.join(caps)}, which the student "
                              f"{config.name} (transformers {config.family}) does not have")
        assert f"{section}.enabled = false" in msg and "\n" not in msg
    else:  # nothing lacking: the check lets every enabled section through
        for name, cls in list_methods().items():
            if cls.enabled(r.sections[name]):
                check_capabilities(name, cls.requires(r.sections[name]), config)


def test_kd_detr_students_have_every_capability_and_dynamic_families_none_of_the_methods():
    assert get_config("cond_detr_r10_tiny").supports == frozenset(CAPABILITIES)
    for name in (n for n in list_models() if n.startswith("hf_")):
        supports = get_config(name).supports
        assert not supports & {"heads", "output_norm", "decode", "query_groups", "candidates", "memory"}, name


def test_ms_detr_on_a_transformers_student_is_refused_before_step_one(synth_data, tmp_path):
    """Before: the build passed and the first step failed inside the method (HFDetector.heads)."""
    names = [n for n in list_models() if n.startswith("hf_")]
    if not names:
        pytest.skip("transformers not installed")
    from kd_detr.data import DataSpec
    from kd_detr.runs.assemble import TeacherSourceSpec, assemble_run

    run = assemble_run(names[0], "ms_detr", DataSpec(str(synth_data), image_size=64), TeacherSourceSpec(),
                       str(tmp_path / "run"), overrides=["train.max_iters=1", "train.num_workers=0"])
    with pytest.raises(ValueError, match=r"recipe section \[ms_detr\] needs the student's candidates, heads, output_norm"):
        run.run()
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_check_capabilities_passes_what_the_student_supports():
    cfg = HFModelConfig(name="x", family="detr")
    check_capabilities("distill", frozenset({"attention"}), cfg)
    with pytest.raises(ValueError, match=r"\[co_detr\] needs the student's decode, memory"):
        check_capabilities("co_detr", frozenset({"memory", "decode"}), cfg)
