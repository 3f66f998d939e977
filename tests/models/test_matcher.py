"""HungarianMatcher: cost values against an independent reference, optimality by brute force."""

import itertools
import math

import pytest
import torch

from kd_detr.matcher import HungarianMatcher, focal_class_cost, pairwise_match_cost, solve_assignments


# ----------------------------------------------------------------------------- references
def _ref_giou(a, b):
    """GIoU of two cxcywh boxes (python floats), written out from the definition."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    enclose = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (enclose - union) / enclose


def _ref_cost(logits, boxes, labels, tboxes, wc=2.0, wb=5.0, wg=2.0, alpha=0.25, gamma=2.0):
    """[Q, N] matching cost with python floats, one entry at a time."""
    q, n = logits.shape[0], labels.shape[0]
    out = [[0.0] * n for _ in range(q)]
    for i in range(q):
        for j in range(n):
            p = 1 / (1 + math.exp(-float(logits[i, labels[j]])))
            pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
            l1 = sum(abs(float(boxes[i, k]) - float(tboxes[j, k])) for k in range(4))
            giou = _ref_giou([float(x) for x in boxes[i]], [float(x) for x in tboxes[j]])
            out[i][j] = wc * (pos - neg) + wb * l1 + wg * (-giou)
    return out


def _brute_force_min(cost):
    """Minimum total cost over all one-to-one assignments of min(Q, N) pairs."""
    q, n = len(cost), len(cost[0])
    if q >= n:  # choose a distinct query for every target
        return min(sum(cost[qs[j]][j] for j in range(n)) for qs in itertools.permutations(range(q), n))
    return min(sum(cost[i][ts[i]] for i in range(q)) for ts in itertools.permutations(range(n), q))


def _random_case(gen, bs, q, c, sizes):
    logits = torch.randn(bs, q, c, generator=gen) * 2
    cxcy = torch.rand(bs, q, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(bs, q, 2, generator=gen) * 0.3 + 0.05
    outputs = {"pred_logits": logits, "pred_boxes": torch.cat([cxcy, wh], -1)}
    targets = []
    for n in sizes:
        t_cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        t_wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append(
            {"labels": torch.randint(0, c, (n,), generator=gen), "boxes": torch.cat([t_cxcy, t_wh], -1)}
        )
    return outputs, targets


# ----------------------------------------------------------------------------- tests
def test_focal_class_cost_hand_computed():
    # logit 0 -> p = 0.5; logit log(3) -> p = 0.75
    logits = torch.tensor([[0.0, math.log(3.0)]])
    prob = logits.sigmoid()
    cost = focal_class_cost(prob, torch.tensor([0, 1, 1]), alpha=0.25, gamma=2.0)
    # p = 0.5: pos = 0.25 * 0.5^2 * -log(0.5 + 1e-8), neg = 0.75 * 0.5^2 * -log(0.5 + 1e-8)
    c0 = 0.25 * 0.25 * -math.log(0.5 + 1e-8) - 0.75 * 0.25 * -math.log(0.5 + 1e-8)
    # p = 0.75: pos = 0.25 * 0.25^2 * -log(0.75 + 1e-8), neg = 0.75 * 0.75^2 * -log(0.25 + 1e-8)
    c1 = 0.25 * 0.0625 * -math.log(0.75 + 1e-8) - 0.75 * 0.5625 * -math.log(0.25 + 1e-8)
    assert cost.shape == (1, 3)
    assert cost[0].tolist() == pytest.approx([c0, c1, c1], abs=1e-6)
    assert c0 == pytest.approx(-0.125 * math.log(2.0), abs=1e-6)  # (0.0625 - 0.1875) * ln 2
    # A confident correct prediction must be cheaper than an unsure one (negative cost).
    assert c1 < c0 < 0


def test_pairwise_cost_matches_reference_values():
    gen = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(gen, 1, 4, 3, [3])
    cost = pairwise_match_cost(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"]
    )
    ref = _ref_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"])
    assert torch.allclose(cost, torch.tensor(ref), atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("q,sizes", [(5, [3, 2]), (3, [5, 1]), (4, [4, 0])])
def test_matcher_is_optimal_against_brute_force(seed, q, sizes):
    gen = torch.Generator().manual_seed(seed)
    outputs, targets = _random_case(gen, len(sizes), q, 4, sizes)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == len(sizes)
    for b, (src, tgt) in enumerate(indices):
        n = sizes[b]
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(q, n)
        assert torch.equal(src, src.sort().values)  # sorted by query as scipy returns
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
        if n == 0:
            continue
        ref = _ref_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"], targets[b]["boxes"])
        total = sum(ref[i][j] for i, j in zip(src.tolist(), tgt.tolist()))
        assert total == pytest.approx(_brute_force_min(ref), abs=1e-4)


def test_batched_cost_equals_per_image_cost():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(gen, 3, 6, 5, [2, 0, 4])
    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=3.0, cost_giou=1.0)
    costs = matcher.cost_matrices(outputs, targets)
    for b, c in enumerate(costs):
        assert c.shape == (6, len(targets[b]["labels"]))
        single = pairwise_match_cost(
            outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"], targets[b]["boxes"],
            1.5, 3.0, 1.0,
        )
        assert torch.allclose(c, single, atol=1e-6)


def test_zero_targets_everywhere_gives_empty_indices():
    gen = torch.Generator().manual_seed(1)
    outputs, targets = _random_case(gen, 2, 5, 3, [0, 0])
    for src, tgt in HungarianMatcher()(outputs, targets):
        assert src.numel() == 0 and tgt.numel() == 0
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64


def test_identity_when_predictions_equal_targets():
    # Each query predicts exactly one target (box and confident class): the optimum is obvious.
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.3], [0.5, 0.8, 0.3, 0.1]])
    labels = torch.tensor([2, 0, 1])
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, torch.arange(3), labels] = 5.0
    perm = torch.tensor([2, 0, 1])  # target j is predicted by query perm[j]
    outputs = {"pred_logits": logits[:, perm.argsort()], "pred_boxes": boxes[perm.argsort()][None]}
    src, tgt = HungarianMatcher()(outputs, [{"labels": labels, "boxes": boxes}])[0]
    assert {int(s): int(t) for s, t in zip(src, tgt)} == {int(perm[j]): j for j in range(3)}


def test_solve_assignments_rectangular_and_errors():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0]])  # 2 queries x 3 targets
    (rows, cols), (r2, c2) = solve_assignments([cost, cost.T])
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]  # 1 + 2 = 3 beats 0 + 3 or 4 + 0
    assert r2.tolist() == [0, 1] and c2.tolist() == [1, 0]
    with pytest.raises(ValueError, match="NaN/Inf"):
        solve_assignments([torch.tensor([[float("nan"), 1.0]])])
    with pytest.raises(ValueError, match="2-D"):
        solve_assignments([torch.zeros(3)])


def test_matcher_runs_without_grad_and_rejects_all_zero_weights():
    gen = torch.Generator().manual_seed(2)
    outputs, targets = _random_case(gen, 1, 4, 3, [2])
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    src, _ = HungarianMatcher()(outputs, targets)[0]
    assert not src.requires_grad
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
