"""Log groups are declared by the methods (``Method.term_groups``), not parsed from the terms' names: for every
registered method, ``<group>.total`` is its whole weighted objective (D3ETR: with its fixed-matching GT terms),
and every method is called the same way (``Method.forward``)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from kd_detr.criterion import SetCriterion
from kd_detr.engine.loss_logs import loss_logs
from kd_detr.engine.recipe import list_recipes, load_recipe
from kd_detr.engine.step import batch_losses
from kd_detr.methods import Method, TermGroup, TermWeights, build_methods, list_methods
from kd_detr.teacher import InProcessTeacher

from tests.support.tiny import tiny_batch as _batch, tiny_detector as _tiny

# small enough for a CPU step (the shipped Co-DETR recipe samples 512 RoIs per image)
OVERRIDES = {"co_detr": ["co_detr.roi_batch_size_per_image=32", "co_detr.rpn_batch_size_per_image=32"]}


def _recipe_for(section: str) -> str:
    """A shipped recipe that switches on ``section``: one with no other method if there is one."""
    enabling = {}
    for name in sorted(list_recipes()):
        r = load_recipe(name)
        on = [s for s, cls in list_methods().items() if cls.enabled(r.sections[s])]
        if section in on:
            enabling[name] = on
    assert enabling, f"no shipped recipe switches on [{section}]"
    return min(enabling, key=lambda n: len(enabling[n]))


def _step(recipe: str):
    """One training forward of the recipe on tiny models: ``(methods, total, logs, terms)``."""
    overrides = [o for section, extra in OVERRIDES.items() for o in extra if section in recipe]
    r = load_recipe(recipe, overrides)
    images, mask, targets = _batch()
    student = _tiny(2).train()
    criterion = SetCriterion(5, num_dec_layers=student.config.dec_layers)
    teacher_model = _tiny(1).eval()
    torch.manual_seed(3)
    methods = build_methods(r.sections, student.config, criterion, teacher=lambda: teacher_model.config)
    attn = next((m.teacher_attention() for m in methods if m.uses_teacher), "none")
    features = any(m.teacher_features() for m in methods if m.uses_teacher)
    t_out = InProcessTeacher(teacher_model, attn=attn, features=features)(images, mask) if r.distils else None
    torch.manual_seed(4)
    total, gt, terms, weights = batch_losses(student, criterion, images, mask, targets, methods, t_out)
    assert isinstance(weights, TermWeights)
    return methods, total, loss_logs(gt, criterion.weight_dict, terms, weights), terms


@pytest.mark.parametrize("section", list(list_methods()))
def test_a_methods_group_total_is_the_sum_of_all_its_weighted_terms(section):
    recipe = _recipe_for(section)
    methods, total, logs, terms = _step(recipe)
    (method,) = [m for m in methods if m.section == section]
    groups = method.term_groups()
    assert set(groups) == set(method.weight_dict)
    mine = [k for k in terms if k in method.weight_dict]
    assert mine, f"{section} returned no term"
    assert all(groups[k].group == method.group() for k in mine)
    want = math.fsum(logs[k] for k in mine)
    assert logs[f"{method.group()}.total"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # and the groups partition the step's objective: student.total plus every method's total is the loss
    totals = logs["student.total"] + sum(logs[f"{m.group()}.total"] for m in methods)
    assert float(total.detach()) == pytest.approx(totals, rel=1e-5)


def test_method_groups_are_distinct():
    names = [cls.group() for cls in list_methods().values()]
    assert len(set(names)) == len(names), names


def test_d3etr_total_includes_its_fixed_matching_gt_terms():
    methods, _, logs, terms = _step("d3etr")
    fixed_gt = [k for k in terms if k.startswith("fixed_gt.")]
    distill = [k for k in terms if k.startswith("distill.")]
    assert fixed_gt and distill
    assert logs["fixed_gt.total"] == pytest.approx(math.fsum(logs[k] for k in fixed_gt), rel=1e-9)
    assert logs["distill.total"] == pytest.approx(math.fsum(logs[k] for k in distill + fixed_gt), rel=1e-9)
    # the sums over layers stay under their old keys
    assert logs["fixed_gt.loss_ce"] == pytest.approx(math.fsum(logs[k] for k in fixed_gt if ".loss_ce." in k))
    assert logs["distill.adaptive.self_attn"] == pytest.approx(
        math.fsum(logs[k] for k in distill if k.startswith("distill.adaptive.self_attn.")))
    assert "distill.adaptive.total" not in logs and "fixed_gt.total_unscaled" not in logs


def test_loss_logs_refuses_a_term_without_a_group():
    terms = {"x.loss.l0": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="'x.loss.l0' has no declared log group"):
        loss_logs({}, {}, terms, TermWeights({"x.loss.l0": 2.0}))
    with pytest.raises(ValueError, match="term groups"):
        loss_logs({}, {}, terms, {"x.loss.l0": 2.0})
    logs = loss_logs({}, {}, terms, {"x.loss.l0": 2.0}, groups={"x.loss.l0": TermGroup("x", "x.loss")})
    assert logs == {"x.loss.l0": 2.0, "x.loss.l0_unscaled": 1.0, "x.loss": 2.0, "x.total": 2.0}


def test_a_weight_without_a_declared_group_counts_in_the_methods_group():
    class Plain(Method):
        section = "plain"

        def __init__(self):
            super().__init__()
            self.weight_dict = {"plain.a.l0": 1.0}
            self.add_term("plain.b.l0", 2.0, subgroup="plain.b")

        def forward(self, model, outputs, targets, num_boxes, teacher=None):
            return {}

    assert Plain().term_groups() == {"plain.a.l0": TermGroup("plain", "plain.a.l0"),
                                     "plain.b.l0": TermGroup("plain", "plain.b")}


@pytest.mark.parametrize("section", list(list_methods()))
def test_every_method_has_the_one_forward_signature(section):
    want = list(inspect.signature(Method.forward).parameters)
    assert want == ["self", "model", "outputs", "targets", "num_boxes", "teacher"]
    cls = list_methods()[section]
    assert list(inspect.signature(cls.forward).parameters) == want
    assert inspect.signature(cls.forward).parameters["teacher"].default is None
    assert not hasattr(cls, "loss"), f"{cls.__name__}.loss: call the method itself (Method.forward)"
