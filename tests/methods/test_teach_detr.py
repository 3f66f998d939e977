"""Teach-DETR's teacher-box targets: the targets on hand-built teacher outputs, the loss equal to the ground-truth
criterion when the teacher's confident boxes are the ground truth, invariance to the teacher's query order,
an empty target set, and refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kd_detr.criterion import SetCriterion
from kd_detr.engine.recipe import load_recipe
from kd_detr.matcher import HungarianMatcher
from kd_detr.methods.teach_detr import TeachDetrConfig, TeacherBoxTargets, teacher_box_targets
from kd_detr.teacher import TeacherOutputs
from tests.support.tiny import NUM_CLASSES, tiny_batch, tiny_detector

STUDENT = dict(num_queries=6, d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64)


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def teacher_outputs(logits: torch.Tensor, boxes: torch.Tensor, layers: int = 2) -> TeacherOutputs:
    """``logits [B,Nt,C]`` / ``boxes [B,Nt,4]`` as the last of ``layers`` decoder layers (the others: noise)."""
    b, n, _ = logits.shape
    return TeacherOutputs(logits=torch.stack([torch.randn_like(logits)] * (layers - 1) + [logits]),
                          boxes=torch.stack([torch.rand_like(boxes)] * (layers - 1) + [boxes]), self_attn=None,
                          cross_attn=None, query_embed=torch.zeros(n, 8), reference_points=torch.zeros(b, n, 2),
                          feature_size=(2, 2))


def test_targets_are_the_confident_predictions_most_confident_first():
    logits = torch.full((2, 4, 3), logit(0.1))
    logits[0, 0, 2] = logit(0.7)   # kept, class 2
    logits[0, 1, 1] = logit(0.9)   # kept, class 1, first
    logits[0, 2, 0] = logit(0.5)   # not above 0.5: dropped
    logits[0, 3, 0] = logit(0.6)   # kept, but cut by max_targets=2
    boxes = torch.rand(2, 4, 4)
    t = teacher_box_targets(logits, boxes, score_threshold=0.5, max_targets=2)
    assert t[0]["labels"].tolist() == [1, 2]
    assert torch.equal(t[0]["boxes"], boxes[0, [1, 0]])
    assert t[0]["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert t[1]["labels"].numel() == 0 and t[1]["boxes"].shape == (0, 4)  # nothing confident in image 1
    assert teacher_box_targets(logits, boxes, 0.5, max_targets=0)[0]["labels"].tolist() == [1, 2, 0]


def _method(**cfg):
    student = tiny_detector(0, **STUDENT)
    return student, TeacherBoxTargets(TeachDetrConfig(enabled=True, **cfg), student.config, None)


def test_with_the_ground_truth_as_confident_teacher_boxes_it_is_the_ground_truth_loss():
    """Teacher queries that say exactly the GT (probability 0.99 for the GT class) plus unconfident ones: every
    layer's terms equal the ground-truth set criterion's (same matcher costs and weights), times ``weight``."""
    student, method = _method(weight=0.5)
    images, mask, targets = tiny_batch()
    outputs = student(images, mask)
    logits = torch.full((2, 5, NUM_CLASSES), logit(0.2))
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    for b, t in enumerate(targets):
        for i, (label, box) in enumerate(zip(t["labels"], t["boxes"])):
            logits[b, 2 + i, label] = logit(0.99)  # the GT among other queries, not at the front
            boxes[b, 2 + i] = box
    terms = method(student, outputs, targets, 3.0, teacher_outputs(logits, boxes))
    gt = SetCriterion(NUM_CLASSES, HungarianMatcher(), weight_dict={})(outputs, targets)
    assert len(terms) == 3 * STUDENT["dec_layers"]
    for key, value in gt.items():
        term, layer = (key.rsplit("_", 1) if key[-1].isdigit() else (key, "1"))
        assert terms[f"teach_detr.{term}.l{layer}"].item() == pytest.approx(value.item(), rel=1e-6), key
    assert all(w == pytest.approx(0.5 * {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}[k.split(".")[1]])
               for k, w in method.weight_dict.items())


def test_the_teachers_query_order_does_not_matter():
    student, method = _method(score_threshold=0.3)
    images, mask, targets = tiny_batch()
    outputs = student(images, mask)
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 7, NUM_CLASSES, generator=g), torch.rand(2, 7, 4, generator=g) * 0.5 + 0.2
    perm = torch.randperm(7, generator=g)
    a = method(student, outputs, targets, 3.0, teacher_outputs(logits, boxes))
    b = method(student, outputs, targets, 3.0, teacher_outputs(logits[:, perm], boxes[:, perm]))
    assert a.keys() == b.keys() and all(a[k].item() == pytest.approx(b[k].item(), rel=1e-6) for k in a)


def test_no_confident_teacher_box_leaves_only_the_negatives_class_term():
    student, method = _method(score_threshold=0.9)
    images, mask, targets = tiny_batch()
    outputs = student(images, mask)
    terms = method(student, outputs, targets, 3.0,
                   teacher_outputs(torch.full((2, 4, NUM_CLASSES), logit(0.5)), torch.rand(2, 4, 4)))
    assert all(v.item() == 0.0 for k, v in terms.items() if ".loss_bbox." in k or ".loss_giou." in k)
    assert all(torch.isfinite(v) and v.item() > 0 for k, v in terms.items() if ".loss_ce." in k)
    sum(terms.values()).backward()  # and it trains the student


def test_refusals_name_the_problem():
    student, method = _method()
    images, mask, targets = tiny_batch()
    outputs = student(images, mask)
    with pytest.raises(ValueError, match=r"\[teach_detr\] needs the teacher"):
        method(student, outputs, targets, 3.0, None)
    with pytest.raises(ValueError, match="teacher's logits have 3 classes, the student's 5"):
        method(student, outputs, targets, 3.0, teacher_outputs(torch.zeros(2, 4, 3), torch.rand(2, 4, 4)))
    teacher = dataclasses.replace(student.config, num_classes=3)
    with pytest.raises(ValueError, match="the teacher has 3 classes, the student 5"):
        TeacherBoxTargets.build(TeachDetrConfig(enabled=True), student.config, None, teacher)
    with pytest.raises(Exception, match="score_threshold"):
        load_recipe("teach_detr", ["teach_detr.score_threshold=1.5"])
