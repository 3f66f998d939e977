"""The detector contract (kd_detr.models.detector) is the only thing methods rely on.

A second, minimal implementation of the protocol (not a ConditionalDETR, and passing on only the documented
output keys) runs the D3ETR, MS-DETR and Co-DETR objectives and gives the same losses as kd-detr's own
model: the seam the Hugging Face families plug into.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_detr.criterion import SetCriterion
from kd_detr.engine.recipe import load_recipe
from kd_detr.engine.step import batch_losses
from kd_detr.methods import build_methods
from kd_detr.models import ConditionalDETR, Detector, DetectorOutput, DetectorRequest
from kd_detr.teacher import InProcessTeacher
from tests.support.tiny import tiny_batch, tiny_detector

# The documented keys of a forward's output (models/detector.py); nothing else is passed on.
DOCUMENTED = ("pred_logits", "pred_boxes", "aux_outputs", "hs", "reference_points", "query_embed", "feature_size",
              "memory_mask", "self_attn", "cross_attn", "candidates", "encoded", "groups")


def _repack(out: dict) -> DetectorOutput:
    """Only the documented keys, per-layer predictions rebuilt from the typed [L,B,Q,*] views."""
    typed = DetectorOutput(out)
    logits, boxes = typed.logits, typed.boxes
    new = DetectorOutput({"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                          "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]})
    for key in DOCUMENTED[3:]:
        if key in out:
            new[key] = [_repack(g) for g in out[key]] if key == "groups" else out[key]
    return new


class WrappedDetector(nn.Module):
    """A second implementation of the contract: another class holding its own network, members by delegation."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.net = inner
        self.config = inner.config

    def forward(self, images, mask=None, request=None):
        return _repack(self.net(images, mask, request=request))

    def heads(self, hs, reference):
        return self.net.heads(hs, reference)

    def output_norm(self, x):
        return self.net.output_norm(x)

    def learned_queries(self):
        return self.net.learned_queries()

    def decode(self, encoded, groups, request=None):
        return [_repack(o) for o in self.net.decode(encoded, groups, request=request)]


def test_wrapper_is_a_detector_and_not_a_conditional_detr():
    w = WrappedDetector(tiny_detector(0))
    assert isinstance(w, Detector) and isinstance(tiny_detector(0), Detector)
    assert not isinstance(w, ConditionalDETR)


@pytest.mark.parametrize("recipe", ["d3etr", "ms_detr", "co_detr"])
def test_methods_run_through_a_second_implementation_with_the_same_losses(recipe):
    overrides = ["co_detr.roi_batch_size_per_image=32", "co_detr.rpn_batch_size_per_image=32"] if recipe == "co_detr" else []
    r = load_recipe(recipe, overrides)
    teacher = InProcessTeacher(tiny_detector(1).eval(), attn="mean")
    images, mask, targets = tiny_batch()
    results = []
    for wrap in (False, True):
        student = tiny_detector(2).train()
        model = WrappedDetector(student) if wrap else student
        criterion = SetCriterion(5, num_dec_layers=student.config.dec_layers)
        torch.manual_seed(3)  # method modules (FFNs, heads) initialise alike
        methods = build_methods(r.sections, model.config, criterion, teacher=lambda: teacher.config)
        t_out = teacher(images, mask) if r.distils else None
        torch.manual_seed(4)  # dropout and the methods' random draws alike
        total, gt, terms, _ = batch_losses(model, criterion, images, mask, targets, methods, t_out)
        results.append((total, gt, terms))
    (total_a, gt_a, terms_a), (total_b, gt_b, terms_b) = results
    assert terms_a and sorted(terms_a) == sorted(terms_b)
    for k in terms_a:
        torch.testing.assert_close(terms_b[k], terms_a[k], rtol=1e-6, atol=1e-6, msg=k)
    for k in gt_a:
        torch.testing.assert_close(gt_b[k], gt_a[k], rtol=1e-6, atol=1e-6, msg=k)
    torch.testing.assert_close(total_b, total_a)


def test_request_merge_and_refusals():
    a = DetectorRequest(attention=True)
    b = DetectorRequest(candidates=True, query_groups=[{"query_pos": torch.zeros(2, 4)}])
    m = a.merge(b)
    assert m.attention and m.candidates and not m.memory and len(m.query_groups) == 1
    assert m.asked() == {"attention", "candidates", "query_groups"}
    with pytest.raises(ValueError, match="query groups"):
        b.merge(b)


class LimitedConfig:
    """A detector config that supports fewer request fields than kd-detr's own model."""

    def __init__(self, inner, supports):
        self._inner, self.supports = inner, frozenset(supports)

    def __getattr__(self, key):
        return getattr(self._inner, key)


def test_a_detector_without_a_requested_output_is_refused_by_name():
    student = tiny_detector(2)
    model = WrappedDetector(student)
    limited = LimitedConfig(student.config, {"query_groups"})  # e.g. a deformable decoder: no dense maps
    r = load_recipe("d3etr")
    criterion = SetCriterion(5, num_dec_layers=student.config.dec_layers)
    teacher = InProcessTeacher(tiny_detector(1).eval(), attn="mean")
    # refused when the recipe is built, before any training, naming the switch
    with pytest.raises(ValueError, match=r"distill.self_attn .*does not return.*distill.self_attn.enabled = false"):
        build_methods(r.sections, limited, criterion, teacher=lambda: teacher.config)
    # and by the training step, should a detector's config change under built methods
    methods = build_methods(r.sections, model.config, criterion, teacher=lambda: teacher.config)
    model.config = limited
    images, mask, targets = tiny_batch()
    with pytest.raises(ValueError, match=r"cannot return \['attention'\].*distill"):
        batch_losses(model, criterion, images, mask, targets, methods, teacher(images, mask))


def test_methods_never_name_a_concrete_detector():
    """Methods depend on the protocol only: no import of ConditionalDETR or the models' internals."""
    root = Path(__file__).resolve().parents[2] / "kd_detr" / "methods"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                if "ConditionalDETR" in names or node.module.startswith(("kd_detr.models.conditional_detr",
                                                                         "kd_detr.models.transformer")):
                    offenders.append(f"{path.relative_to(root.parents[1])}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("transformer", "class_embed", "bbox_embed"):
                offenders.append(f"{path.relative_to(root.parents[1])}:{node.lineno} (.{node.attr})")
    assert not offenders, offenders
