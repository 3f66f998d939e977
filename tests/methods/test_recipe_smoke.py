"""Every shipped recipe, one loss step: its methods are built against a tiny student (and a tiny teacher where
it distils), and one forward and backward on a tiny batch gives finite losses, every term the recipe switches
on, and gradients for the student and the methods' own modules.

The recipes come from the registry (``list_recipes()``), so a recipe added to ``recipes/`` is covered without
editing this file."""

from __future__ import annotations

import pytest
import torch

from kd_detr.criterion import SetCriterion
from kd_detr.engine.recipe import list_recipes, load_recipe
from kd_detr.engine.step import batch_losses
from kd_detr.methods import list_methods
from kd_detr.methods.registry import build_methods
from kd_detr.teacher import InProcessTeacher
from kd_detr.zoo import builtin_dir
from tests.support.tiny import NUM_CLASSES, tiny_batch, tiny_detector

STUDENT = dict(num_queries=6, d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64)
TEACHER = dict(STUDENT, num_queries=8)  # another query count: the matchings are rectangular
# sizes only, as in the golden runs: Co-DETR's 512 sampled RoIs per image (and up to 300 positive queries per
# head) would make its step the slowest here by far; the recipe's switches stay as shipped
SMALL = ["co_detr.roi_batch_size_per_image=64"]


def _teacher_attention(methods) -> str:
    """The attention maps the teacher must return for ``methods`` (as the trainer asks for them)."""
    wanted = [m.teacher_attention() for m in methods if m.uses_teacher]
    return "per_head" if "per_head" in wanted else ("mean" if "mean" in wanted else "none")


def test_every_shipped_recipe_is_smoke_tested():
    """The registry the parametrisation below reads lists every recipe file shipped with kd-detr."""
    shipped = {p.stem for p in builtin_dir("recipes").glob("*.toml")}
    assert "baseline" in shipped and shipped <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_recipe_runs_one_loss_step(name):
    recipe = load_recipe(name, SMALL)
    student = tiny_detector(0, **STUDENT).train()
    student.backbone.requires_grad_(False)  # the methods' terms and their gradients, without the CNN's backward
    criterion = SetCriterion(NUM_CLASSES, num_dec_layers=STUDENT["dec_layers"])
    teacher = tiny_detector(1, **TEACHER) if recipe.distils else None
    methods = build_methods(recipe.sections, student.config, criterion,
                            teacher=(lambda: teacher.config) if teacher is not None else None)

    enabled = [section for section, cls in list_methods().items()
               if recipe.sections.get(section) is not None and cls.enabled(recipe.sections[section])]
    assert [m.section for m in methods] == enabled
    assert recipe.distils == any(m.uses_teacher for m in methods)

    images, mask, targets = tiny_batch()
    features = any(m.teacher_features() for m in methods if m.uses_teacher)  # as the trainer asks (feature_kd)
    teacher_out = (InProcessTeacher(teacher, attn=_teacher_attention(methods), features=features)(images, mask)
                   if teacher else None)
    total, gt, terms, weights = batch_losses(student, criterion, images, mask, targets, methods, teacher_out)

    assert torch.isfinite(total), float(total)
    for key, value in {**gt, **terms}.items():
        assert torch.isfinite(value).all(), (key, value)
    assert set(criterion.weight_dict) <= set(gt)
    for m in methods:  # every term the recipe's section switches on (its weights) is in the loss dict
        assert m.weight_dict, f"[{m.section}] is enabled but has no loss term"
        missing = sorted(set(m.weight_dict) - set(terms))
        assert not missing, f"[{m.section}] terms missing from the losses: {missing}"
    if not methods:
        assert terms == {} and weights == {}

    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for m in methods:  # the modules a method trains beside the student (projections, FFNs, heads) learn too
        params = [p for p in m.parameters() if p.requires_grad]
        if params:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), m.section
            assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None), m.section
