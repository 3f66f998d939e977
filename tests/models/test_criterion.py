"""SetCriterion: hand-computed focal / L1 / GIoU values, official normalisation, aux layers."""

import math

import pytest
import torch

from kd_detr.criterion import (
    SetCriterion,
    class_error,
    compute_num_boxes,
    default_weight_dict,
    weighted_total,
)
from kd_detr.matcher import HungarianMatcher


def _focal_elem(x, t, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss of one logit x with binary target t, from the definition."""
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return alpha_t * (1 - p_t) ** gamma * ce


def _tiny_case():
    # B = 1, Q = 2, C = 3, one ground truth of class 1.
    logits = torch.tensor([[[0.5, 2.0, -1.0], [-3.0, 0.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.4, 0.2]])}]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def test_layer_losses_hand_computed():
    outputs, targets = _tiny_case()
    crit = SetCriterion(3, HungarianMatcher())
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 <-> gt 0
    losses = crit.layer_losses(outputs, targets, indices, num_boxes=1.0)

    # Focal: query 0 has one-hot target [0, 1, 0], query 1 is all-negative [0, 0, 0].
    focal_sum = (
        _focal_elem(0.5, 0) + _focal_elem(2.0, 1) + _focal_elem(-1.0, 0)
        + _focal_elem(-3.0, 0) + _focal_elem(0.0, 0) + _focal_elem(1.0, 0)
    )
    # Official: mean over the Q = 2 queries, sum, / num_boxes (1), * Q (2) = plain sum.
    assert losses["loss_ce"].item() == pytest.approx(focal_sum, rel=1e-5)
    # e.g. the positive element: p = sigmoid(2) = 0.8808, 0.25 * 0.1192^2 * -ln 0.8808 = 0.000450
    assert _focal_elem(2.0, 1) == pytest.approx(0.25 * (1 - 1 / (1 + math.exp(-2))) ** 2 * math.log(1 + math.exp(-2)))

    # L1: |0.5-0.6| + |0.5-0.5| + |0.4-0.4| + |0.4-0.2| = 0.3
    assert losses["loss_bbox"].item() == pytest.approx(0.3, abs=1e-6)

    # GIoU: pred xyxy (0.3, 0.3, 0.7, 0.7), gt xyxy (0.4, 0.4, 0.8, 0.6)
    inter = (0.7 - 0.4) * (0.6 - 0.4)  # 0.06
    union = 0.4 * 0.4 + 0.4 * 0.2 - inter  # 0.18
    enclose = (0.8 - 0.3) * (0.7 - 0.3)  # 0.2
    giou = inter / union - (enclose - union) / enclose  # 1/3 - 0.1
    assert losses["loss_giou"].item() == pytest.approx(1 - giou, abs=1e-6)
    assert 1 - giou == pytest.approx(1 - (1 / 3 - 0.1))


def test_official_normalisation_num_boxes_and_queries():
    # B = 2 with 1 + 2 GT boxes -> num_boxes = 3; Q = 4, C = 2.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 2, generator=gen)
    boxes = torch.rand(2, 4, 2, generator=gen) * 0.4 + 0.3
    boxes = torch.cat([boxes, torch.full((2, 4, 2), 0.2)], -1)
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]])},
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.6, 0.1, 0.3]])},
    ]
    crit = SetCriterion(2, HungarianMatcher())
    assert crit.num_boxes(targets) == 3.0
    indices = [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([0, 3]), torch.tensor([1, 0]))]
    losses = crit.layer_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, indices, 3.0)

    onehot = {(0, 2, 1), (1, 0, 1), (1, 3, 0)}  # (image, query, class) positives
    total = sum(
        _focal_elem(float(logits[b, q, c]), 1.0 if (b, q, c) in onehot else 0.0)
        for b in range(2) for q in range(4) for c in range(2)
    )
    # mean over Q, sum, / num_boxes, * Q == sum over all B*Q*C elements / num_boxes
    assert losses["loss_ce"].item() == pytest.approx(total / 3.0, rel=1e-5)

    pairs = [(0, 2, 0), (1, 0, 1), (1, 3, 0)]  # (image, query, target)
    l1 = sum(
        abs(float(boxes[b, q, k]) - float(targets[b]["boxes"][j, k])) for b, q, j in pairs for k in range(4)
    )
    assert losses["loss_bbox"].item() == pytest.approx(l1 / 3.0, rel=1e-5)


def test_forward_keys_and_aux_layers_are_matched_separately():
    outputs, targets = _tiny_case()
    # Aux layer 0 = last layer with its two queries swapped: with its own matching its losses are
    # identical to the last layer's; with the last layer's assignment they would not be.
    swap = torch.tensor([1, 0])
    aux0 = {"pred_logits": outputs["pred_logits"][:, swap], "pred_boxes": outputs["pred_boxes"][:, swap]}
    aux1 = {"pred_logits": outputs["pred_logits"] * 0.5, "pred_boxes": outputs["pred_boxes"]}
    full = {**outputs, "aux_outputs": [aux0, aux1]}
    crit = SetCriterion(3, HungarianMatcher(), num_dec_layers=3)
    losses, indices = crit(full, targets, return_indices=True)

    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    assert set(losses) == expected
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[f"{k}_0"].item() == pytest.approx(losses[k].item(), rel=1e-6)
    assert [i[0].tolist() for i in indices[-1]] == [[0]]  # last layer: query 0
    assert [i[0].tolist() for i in indices[0]] == [[1]]  # aux layer 0: query 1 (swapped)
    with_last_assignment = crit.layer_losses(aux0, targets, indices[-1], 1.0)
    assert with_last_assignment["loss_bbox"].item() != pytest.approx(losses["loss_bbox_0"].item())
    assert set(crit.weight_dict) == expected
    assert crit(full, targets).keys() == losses.keys()


def test_gradient_flows_through_weighted_total():
    outputs, targets = _tiny_case()
    last = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    aux = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    crit = SetCriterion(3, HungarianMatcher(), num_dec_layers=2)
    losses = crit({**last, "aux_outputs": [aux]}, targets)
    total = crit.total(losses)
    total.backward()
    for t in (last["pred_logits"], last["pred_boxes"], aux["pred_logits"], aux["pred_boxes"]):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    manual = sum(losses[k] * w for k, w in crit.weight_dict.items())
    assert total.item() == pytest.approx(manual.item(), rel=1e-6)


def test_no_targets_clamps_num_boxes_and_only_negatives_remain():
    outputs, _ = _tiny_case()
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    assert compute_num_boxes(targets, "cpu") == 1.0
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    losses = SetCriterion(3, HungarianMatcher())(outputs, targets)
    logits = outputs["pred_logits"].detach()
    negatives = sum(_focal_elem(float(x), 0.0) for x in logits.flatten())
    assert losses["loss_ce"].item() == pytest.approx(negatives, rel=1e-5)  # / num_boxes = 1
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    weighted_total(losses, default_weight_dict(1)).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_label_out_of_range_names_image_and_label():
    outputs, targets = _tiny_case()
    logits = outputs["pred_logits"].repeat(2, 1, 1)
    boxes = outputs["pred_boxes"].repeat(2, 1, 1)
    bad = [targets[0], {"labels": torch.tensor([0, 5]), "boxes": torch.full((2, 4), 0.3)}]
    with pytest.raises(ValueError, match=r"image 1.*label 5"):
        SetCriterion(3, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, bad)
    with pytest.raises(ValueError, match="label -1"):
        SetCriterion(3)({"pred_logits": logits[:1], "pred_boxes": boxes[:1]},
                        [{"labels": torch.tensor([-1]), "boxes": torch.full((1, 4), 0.3)}])
    with pytest.raises(ValueError, match="classes"):
        SetCriterion(4)(outputs, targets)
    with pytest.raises(ValueError, match="integer"):
        SetCriterion(3)(outputs, [{"labels": torch.tensor([1.0]), "boxes": torch.full((1, 4), 0.3)}])


def test_weight_helpers():
    w = default_weight_dict(6)
    assert len(w) == 18 and w["loss_ce"] == 2 and w["loss_bbox_4"] == 5 and w["loss_giou_0"] == 2
    assert "loss_ce_5" not in w
    losses = {"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0), "extra": torch.tensor(7.0)}
    with pytest.raises(KeyError, match="extra"):
        weighted_total(losses, w)
    assert weighted_total(losses, w, strict=False).item() == pytest.approx(2 * 1.0 + 5 * 2.0)


def test_class_error_metric():
    outputs, targets = _tiny_case()
    # Query 0's argmax is class 1 = its target -> 0 % error; query 1's argmax is class 2 -> 100 %.
    assert class_error(outputs["pred_logits"], targets, [(torch.tensor([0]), torch.tensor([0]))]).item() == 0.0
    assert class_error(outputs["pred_logits"], targets, [(torch.tensor([1]), torch.tensor([0]))]).item() == 100.0
