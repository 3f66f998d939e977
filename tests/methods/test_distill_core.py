"""Adaptive Matching and D3ETR distillation losses: hand-checked values, invariances, edge cases."""

import itertools
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from kd_detr.methods.d3etr.adaptive_match import (
    adaptive_match,
    identity_matching,
    match_cost,
    solve_matchings,
)
from kd_detr.methods.d3etr.losses import attention_distill, prediction_distill

L3 = math.log(3.0)  # sigmoid(+-log 3) = 0.75 / 0.25: probabilities with short closed forms


# ----------------------------------------------------------------------------- helpers
def _preds(gen, lead, n, c):
    """Random logits [*lead, n, c] and valid cxcywh boxes [*lead, n, 4]."""
    logits = torch.randn(*lead, n, c, generator=gen) * 2
    cxcy = torch.rand(*lead, n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(*lead, n, 2, generator=gen) * 0.3 + 0.05
    return logits, torch.cat([cxcy, wh], -1)


def _attn(gen, b, h, n, keys):
    """Row-stochastic attention maps [b, h, n, keys]."""
    return torch.softmax(torch.randn(b, h, n, keys, generator=gen) * 2, -1)


def _all_losses(s_logits, s_boxes, t_logits, t_boxes, s_sa, t_sa, s_ca, t_ca, t_idx, s_idx):
    """Every loss variant of one layer, as a flat dict of floats."""
    out = {k: float(v) for k, v in prediction_distill(s_logits, s_boxes, t_logits, t_boxes, t_idx, s_idx).items()}
    for kind, s_map, t_map in (("self", s_sa, t_sa), ("cross", s_ca, t_ca)):
        for loss in ("kl", "mse"):
            for per_head in (False, True):
                out[f"{kind}/{loss}/{per_head}"] = float(
                    attention_distill(s_map, t_map, t_idx, s_idx, kind=kind, loss=loss, per_head=per_head)
                )
    return out


def _bernoulli_kl(q, p):
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


# ----------------------------------------------------------------------------- hand-checked 3x3
def test_hand_checked_3x3_cost_and_assignment():
    # One class; every box is 0.2 x 0.2 at cy = 0.5, only cx differs. For two such boxes with
    # |dcx| = d: L1 = d, and inter = (w-d)h, union = enclose = (w+d)h (also for d >= w, where
    # inter = 0, union = 2wh), so GIoU = (w - d) / (w + d).
    t_logits = torch.tensor([[[0.0], [-L3], [L3]]])  # q = 0.5, 0.25, 0.75
    s_logits = torch.tensor([[[-L3], [0.0], [0.0]]])  # p = 0.25, 0.5, 0.5
    t_cx = [0.5, 0.6, 0.7]
    s_cx = [0.2, 0.5, 0.4]
    t_boxes = torch.tensor([[[x, 0.5, 0.2, 0.2] for x in t_cx]])
    s_boxes = torch.tensor([[[x, 0.5, 0.2, 0.2] for x in s_cx]])

    # Weights (class, bbox, giou) = (2, 5, 2). Worked entries:
    # [0,0]: KL(0.5||0.25) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) = 0.1438410;
    #        d = 0.3 -> L1 0.3, GIoU = -0.1/0.5 = -0.2 -> 2*0.1438410 + 5*0.3 + 2*0.2 = 2.1876821
    # [0,1]: identical predictions -> KL 0, L1 0, GIoU 1 -> -2
    # [1,0]: q = p = 0.25 -> KL 0; d = 0.4 -> L1 0.4, GIoU = -0.2/0.6 = -1/3 -> 2 + 2/3 = 2.6666667
    # [2,1]: KL(0.75||0.5) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308121; d = 0.2 -> GIoU 0
    #        -> 0.2616241 + 1 = 1.2616241
    expected = torch.tensor(
        [
            [2.1876821, -2.0000000, -0.1666667],
            [2.6666667, 0.0949572, 1.2616241],
            [4.4557546, 1.2616241, 2.1616241],
        ]
    )
    # Independent per-entry reference from the closed forms above.
    qs = [0.5, 0.25, 0.75]
    ps = [0.25, 0.5, 0.5]
    for i in range(3):
        for j in range(3):
            d = abs(t_cx[i] - s_cx[j])
            ref = 2 * _bernoulli_kl(qs[i], ps[j]) + 5 * d - 2 * (0.2 - d) / (0.2 + d)
            assert expected[i, j].item() == pytest.approx(ref, abs=1e-6)

    cost = match_cost(t_logits, t_boxes, s_logits, s_boxes, 2.0, 5.0, 2.0)
    assert cost.shape == (1, 3, 3)
    torch.testing.assert_close(cost[0], expected, atol=1e-5, rtol=0)

    # Optimum: T0-S1, T1-S0, T2-S2 (total 2.8283; next best 3.7174). Not the identity, and not
    # greedy either: taking the cheapest cell first (T0-S1 = -2), then the cheapest remaining
    # (T1-S2 = 1.2616) forces T2-S0 = 4.4558 (total 3.7174).
    t_idx, s_idx = solve_matchings(cost)
    assert t_idx.tolist() == [[0, 1, 2]]
    assert s_idx.tolist() == [[1, 0, 2]]
    greedy = [1, 2, 0]
    total = lambda perm: sum(float(expected[i, perm[i]]) for i in range(3))  # noqa: E731
    assert total([1, 0, 2]) < total(greedy) - 0.5
    assert total([1, 0, 2]) < total([0, 1, 2]) - 0.5


def test_match_cost_equals_per_entry_reference():
    from torchvision.ops import box_convert, generalized_box_iou

    gen = torch.Generator().manual_seed(11)
    t_logits, t_boxes = _preds(gen, (2,), 4, 3)
    s_logits, s_boxes = _preds(gen, (2,), 5, 3)
    cost = match_cost(t_logits, t_boxes, s_logits, s_boxes, 1.5, 4.0, 3.0)
    for m in range(2):
        giou = generalized_box_iou(box_convert(t_boxes[m], "cxcywh", "xyxy"), box_convert(s_boxes[m], "cxcywh", "xyxy"))
        for i in range(4):
            for j in range(5):
                q = torch.sigmoid(t_logits[m, i].double()).tolist()
                p = torch.sigmoid(s_logits[m, j].double()).tolist()
                kl = sum(_bernoulli_kl(qc, pc) for qc, pc in zip(q, p))
                l1 = float((t_boxes[m, i] - s_boxes[m, j]).abs().sum())
                ref = 1.5 * kl + 4.0 * l1 - 3.0 * float(giou[i, j])
                assert float(cost[m, i, j]) == pytest.approx(ref, abs=1e-5), (m, i, j)


# ----------------------------------------------------------------------------- identical predictions
def test_identical_teacher_and_student_identity_matching_and_zero_losses():
    gen = torch.Generator().manual_seed(0)
    n_layers, bs, n, c, h, s_tokens = 3, 2, 7, 5, 4, 11
    logits, boxes = _preds(gen, (n_layers, bs), n, c)
    t_idx, s_idx = adaptive_match(logits, boxes, logits.clone(), boxes.clone(), (2.0, 5.0, 2.0))
    ar = torch.arange(n).expand(n_layers, bs, n)
    assert t_idx.dtype == s_idx.dtype == torch.int64
    assert torch.equal(t_idx, ar) and torch.equal(s_idx, ar)

    flat_l, flat_b = logits.flatten(0, 1), boxes.flatten(0, 1)
    # The class term alone is a KL: exactly 0 on the diagonal, >= 0 elsewhere.
    cls_only = match_cost(flat_l, flat_b, flat_l, flat_b, 1.0, 0.0, 0.0)
    assert cls_only.diagonal(dim1=1, dim2=2).abs().max() < 1e-6
    assert cls_only.min() >= 0
    # The full cost uses -GIoU (as the ground-truth matcher): identical boxes cost -giou_weight.
    full = match_cost(flat_l, flat_b, flat_l, flat_b, 2.0, 5.0, 2.0)
    torch.testing.assert_close(full.diagonal(dim1=1, dim2=2), torch.full((n_layers * bs, n), -2.0), atol=1e-6, rtol=0)

    sa = _attn(gen, bs, h, n, n)
    ca = _attn(gen, bs, h, n, s_tokens)
    for layer in range(n_layers):
        losses = _all_losses(
            logits[layer], boxes[layer], logits[layer].clone(), boxes[layer].clone(),
            sa, sa.clone(), ca, ca.clone(), t_idx[layer], s_idx[layer],
        )
        assert len(losses) == 11
        for name, value in losses.items():
            assert abs(value) < 1e-6, (layer, name, value)


# ----------------------------------------------------------------------------- permutation invariance
def test_permuting_student_queries_permutes_matching_and_keeps_losses():
    gen = torch.Generator().manual_seed(1)
    bs, n, c, h, s_tokens = 3, 8, 5, 4, 10
    t_logits, t_boxes = _preds(gen, (bs,), n, c)
    s_logits, s_boxes = _preds(gen, (bs,), n, c)
    t_sa, s_sa = _attn(gen, bs, h, n, n), _attn(gen, bs, h, n, n)
    t_ca, s_ca = _attn(gen, bs, h, n, s_tokens), _attn(gen, bs, h, n, s_tokens)

    t_idx, s_idx = adaptive_match(t_logits[None], t_boxes[None], s_logits[None], s_boxes[None])
    t_idx, s_idx = t_idx[0], s_idx[0]
    assert not torch.equal(s_idx, torch.arange(n).expand(bs, n))  # a non-trivial matching
    base = _all_losses(s_logits, s_boxes, t_logits, t_boxes, s_sa, t_sa, s_ca, t_ca, t_idx, s_idx)
    assert all(v > 1e-3 for v in base.values()), base

    # New student query j is old query perm[b, j]; maps permute rows (and self-attention columns).
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(bs)])
    inv = perm.argsort(-1)
    p_logits = torch.stack([s_logits[b, perm[b]] for b in range(bs)])
    p_boxes = torch.stack([s_boxes[b, perm[b]] for b in range(bs)])
    p_sa = torch.stack([s_sa[b][:, perm[b]][:, :, perm[b]] for b in range(bs)])
    p_ca = torch.stack([s_ca[b][:, perm[b]] for b in range(bs)])

    t_idx2, s_idx2 = adaptive_match(t_logits[None], t_boxes[None], p_logits[None], p_boxes[None])
    t_idx2, s_idx2 = t_idx2[0], s_idx2[0]
    assert torch.equal(t_idx2, t_idx)
    assert torch.equal(s_idx2, torch.gather(inv, 1, s_idx))  # old student j is now inv[j]
    permuted = _all_losses(p_logits, p_boxes, t_logits, t_boxes, p_sa, t_sa, p_ca, t_ca, t_idx2, s_idx2)
    for name in base:
        assert permuted[name] == pytest.approx(base[name], abs=1e-6), name


# ----------------------------------------------------------------------------- attention re-indexing by loops
def _loop_kl(t_rows, s_rows):
    """Mean over rows of sum_m t log(t / max(s, 1e-8)) for nested lists of floats."""
    vals = []
    for t_row, s_row in zip(t_rows, s_rows):
        vals.append(sum(t * (math.log(t) - math.log(max(s, 1e-8))) for t, s in zip(t_row, s_row) if t > 0))
    return sum(vals) / len(vals)


def test_self_attention_reindexing_element_by_element():
    gen = torch.Generator().manual_seed(2)
    h, n = 2, 3
    s_attn = _attn(gen, 1, h, n, n)
    t_attn = _attn(gen, 1, h, n, n)
    t_idx = torch.tensor([[0, 1, 2]])
    s_idx = torch.tensor([[2, 0, 1]])

    # Ã[b,h,k,m] = A[b,h,s_idx[b,k],s_idx[b,m]], written out.
    expected = [[[float(s_attn[0, hh, s_idx[0, k], s_idx[0, m]]) for m in range(n)] for k in range(n)] for hh in range(h)]
    # The per-head MSE against a zero teacher is the mean of Ã^2: checks every re-indexed element.
    zeros = torch.zeros_like(t_attn)
    mse = attention_distill(s_attn, zeros, t_idx, s_idx, kind="self", loss="mse", per_head=True)
    ref_mse = sum(v * v for hh in expected for row in hh for v in row) / (h * n * n)
    assert float(mse) == pytest.approx(ref_mse, abs=1e-7)
    # Against a one-hot teacher map at (k, m), the per-head MSE isolates Ã[.,k,m] too.
    for hh, k, m in itertools.product(range(h), range(n), range(n)):
        onehot = torch.zeros_like(t_attn)
        onehot[0, hh, k, m] = 1.0
        got = float(attention_distill(s_attn, onehot, t_idx, s_idx, kind="self", loss="mse", per_head=True))
        want = (ref_mse * h * n * n - expected[hh][k][m] ** 2 + (1 - expected[hh][k][m]) ** 2) / (h * n * n)
        assert got == pytest.approx(want, abs=1e-6)

    # KL per head, and head-averaged (average the maps first, then KL).
    t_rows = [[float(t_attn[0, hh, k, m]) for m in range(n)] for hh in range(h) for k in range(n)]
    s_rows = [row for hh in expected for row in hh]
    kl = attention_distill(s_attn, t_attn, t_idx, s_idx, kind="self", loss="kl", per_head=True)
    assert float(kl) == pytest.approx(_loop_kl(t_rows, s_rows), abs=1e-6)
    t_avg = [[sum(float(t_attn[0, hh, k, m]) for hh in range(h)) / h for m in range(n)] for k in range(n)]
    s_avg = [[sum(expected[hh][k][m] for hh in range(h)) / h for m in range(n)] for k in range(n)]
    kl_avg = attention_distill(s_attn, t_attn, t_idx, s_idx, kind="self", loss="kl", per_head=False)
    assert float(kl_avg) == pytest.approx(_loop_kl(t_avg, s_avg), abs=1e-6)

    # Cross-attention: rows only.
    s_ca = _attn(gen, 1, h, n, 5)
    t_ca = _attn(gen, 1, h, n, 5)
    t_rows = [[float(t_ca[0, hh, k, m]) for m in range(5)] for hh in range(h) for k in range(n)]
    s_rows = [[float(s_ca[0, hh, s_idx[0, k], m]) for m in range(5)] for hh in range(h) for k in range(n)]
    kl_ca = attention_distill(s_ca, t_ca, t_idx, s_idx, kind="cross", loss="kl", per_head=True)
    assert float(kl_ca) == pytest.approx(_loop_kl(t_rows, s_rows), abs=1e-6)


def test_self_attention_rectangular_matching_renormalises_rows():
    gen = torch.Generator().manual_seed(3)
    # Teacher 2 queries, student 3: K = 2, the student's gathered 2x2 block loses the mass of the
    # unmatched column and is renormalised; the teacher side (K = Nt) is used as is.
    s_attn = _attn(gen, 1, 1, 3, 3)
    t_attn = _attn(gen, 1, 1, 2, 2)
    t_idx = torch.tensor([[0, 1]])
    s_idx = torch.tensor([[2, 0]])
    s_rows = []
    for k in range(2):
        row = [float(s_attn[0, 0, s_idx[0, k], s_idx[0, m]]) for m in range(2)]
        s_rows.append([v / sum(row) for v in row])
    t_rows = [[float(t_attn[0, 0, k, m]) for m in range(2)] for k in range(2)]
    got = attention_distill(s_attn, t_attn, t_idx, s_idx, kind="self", loss="kl")
    assert float(got) == pytest.approx(_loop_kl(t_rows, s_rows), abs=1e-6)


# ----------------------------------------------------------------------------- solver
def _brute_force(cost):
    """Minimum total cost over all injections of the smaller side into the larger."""
    nt, ns = cost.shape
    if nt <= ns:
        return min(sum(float(cost[i, p[i]]) for i in range(nt)) for p in itertools.permutations(range(ns), nt))
    return min(sum(float(cost[p[j], j]) for j in range(ns)) for p in itertools.permutations(range(nt), ns))


@pytest.mark.parametrize("nt,ns", [(4, 6), (6, 4), (2, 3), (3, 2), (5, 5)])
def test_rectangular_matchings_valid_sorted_and_optimal(nt, ns):
    gen = torch.Generator().manual_seed(10 * nt + ns)
    m = 6
    t_logits, t_boxes = _preds(gen, (m,), nt, 4)
    s_logits, s_boxes = _preds(gen, (m,), ns, 4)
    cost = match_cost(t_logits, t_boxes, s_logits, s_boxes)
    assert cost.shape == (m, nt, ns)
    t_idx, s_idx = solve_matchings(cost)
    k = min(nt, ns)
    assert t_idx.shape == s_idx.shape == (m, k)
    for i in range(m):
        t_row, s_row = t_idx[i].tolist(), s_idx[i].tolist()
        assert t_row == sorted(t_row) and len(set(t_row)) == k and all(0 <= v < nt for v in t_row)
        assert len(set(s_row)) == k and all(0 <= v < ns for v in s_row)
        total = sum(float(cost[i, a, b]) for a, b in zip(t_row, s_row))
        if nt * ns <= 36:
            assert total == pytest.approx(_brute_force(cost[i]), abs=1e-5)


def test_batched_solve_equals_scipy_per_matrix():
    gen = torch.Generator().manual_seed(4)
    for shape in ((9, 6, 6), (9, 5, 7), (9, 7, 5)):
        costs = torch.rand(*shape, generator=gen, dtype=torch.float64)
        t_idx, s_idx = solve_matchings(costs)
        for i in range(shape[0]):
            rows, cols = linear_sum_assignment(costs[i].numpy())
            assert t_idx[i].tolist() == rows.tolist()
            assert s_idx[i].tolist() == cols.tolist()


def test_solve_empty_and_bad_inputs():
    for shape, k in (((0, 4, 4), 4), ((3, 0, 4), 0), ((3, 4, 0), 0)):
        t_idx, s_idx = solve_matchings(torch.zeros(shape))
        assert t_idx.shape == s_idx.shape == (shape[0], k) and t_idx.dtype == torch.int64
    costs = torch.rand(4, 3, 3)
    costs[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"matrix 2 .*diverged"):
        solve_matchings(costs)
    costs[2, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        solve_matchings(costs)
    with pytest.raises(ValueError, match="Nt, Ns"):
        solve_matchings(torch.rand(3, 3))


def test_identity_matching_and_fp16_inputs():
    t_idx, s_idx = identity_matching(3, 5, "cpu")
    assert t_idx.shape == s_idx.shape == (3, 5) and t_idx.dtype == torch.int64
    assert torch.equal(t_idx, torch.arange(5).expand(3, 5)) and torch.equal(s_idx, t_idx)
    gen = torch.Generator().manual_seed(5)
    t_logits, t_boxes = _preds(gen, (2, 2), 6, 3)
    s_logits, s_boxes = _preds(gen, (2, 2), 6, 3)
    cost32 = match_cost(t_logits.flatten(0, 1), t_boxes.flatten(0, 1), s_logits.flatten(0, 1), s_boxes.flatten(0, 1))
    cost16 = match_cost(
        t_logits.flatten(0, 1).half(), t_boxes.flatten(0, 1).half(), s_logits.flatten(0, 1).half(), s_boxes.flatten(0, 1).half()
    )
    assert cost16.dtype == torch.float32
    torch.testing.assert_close(cost16, cost32, atol=2e-2, rtol=0)
    # Weights given as a recipe-like mapping or object give the same matching as the triple.
    a = adaptive_match(t_logits, t_boxes, s_logits, s_boxes, (1.0, 5.0, 2.0))
    b = adaptive_match(t_logits, t_boxes, s_logits, s_boxes, {"class_weight": 1.0, "bbox_weight": 5.0, "giou_weight": 2.0})
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- prediction loss formulas
def _direct_prediction_terms(s_logits, s_boxes, t_logits, t_boxes, t_idx, s_idx, temperature):
    """Per-pair [B, K] cls / l1 / giou and teacher confidence, from probabilities in float64."""
    from torchvision.ops import box_convert, generalized_box_iou

    bs, k = t_idx.shape
    cls = torch.zeros(bs, k, dtype=torch.float64)
    l1 = torch.zeros(bs, k, dtype=torch.float64)
    giou = torch.zeros(bs, k, dtype=torch.float64)
    conf = torch.zeros(bs, k, dtype=torch.float64)
    for b in range(bs):
        for j in range(k):
            t, s = t_logits[b, t_idx[b, j]].double(), s_logits[b, s_idx[b, j]].double()
            q, p = torch.sigmoid(t / temperature), torch.sigmoid(s / temperature)
            cls[b, j] = temperature**2 * (q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))).sum()
            tb, sb = t_boxes[b, t_idx[b, j]].double(), s_boxes[b, s_idx[b, j]].double()
            l1[b, j] = (tb - sb).abs().sum()
            g = generalized_box_iou(box_convert(sb[None], "cxcywh", "xyxy"), box_convert(tb[None], "cxcywh", "xyxy"))
            giou[b, j] = 1 - g[0, 0]
            conf[b, j] = torch.sigmoid(t).max()
    return cls, l1, giou, conf


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weighting", [False, True])
def test_prediction_distill_matches_direct_formula(temperature, weighting):
    gen = torch.Generator().manual_seed(6)
    bs, nt, ns, c = 2, 5, 6, 4
    t_logits, t_boxes = _preds(gen, (bs,), nt, c)
    s_logits, s_boxes = _preds(gen, (bs,), ns, c)
    t_idx = torch.stack([torch.randperm(nt, generator=gen)[:4].sort().values for _ in range(bs)])
    s_idx = torch.stack([torch.randperm(ns, generator=gen)[:4] for _ in range(bs)])
    got = prediction_distill(s_logits, s_boxes, t_logits, t_boxes, t_idx, s_idx, temperature, weighting)
    cls, l1, giou, conf = _direct_prediction_terms(s_logits, s_boxes, t_logits, t_boxes, t_idx, s_idx, temperature)
    w = conf if weighting else torch.ones_like(conf)
    for name, ref in (("cls", cls), ("l1", l1), ("giou", giou)):
        # sum w * loss / K per image, averaged over images
        want = ((w * ref).sum(1) / t_idx.shape[1]).mean()
        assert float(got[name]) == pytest.approx(float(want), rel=1e-5, abs=1e-6), name
    if temperature == 2.0 and not weighting:
        # T^2 scaling: not the same as the untempered KL.
        base = prediction_distill(s_logits, s_boxes, t_logits, t_boxes, t_idx, s_idx, 1.0)
        assert abs(float(base["cls"]) - float(got["cls"])) > 1e-3


def test_gradients_reach_student_only():
    gen = torch.Generator().manual_seed(7)
    bs, n, c, h = 2, 5, 3, 2
    t_logits, t_boxes = _preds(gen, (bs,), n, c)
    s_logits, s_boxes = _preds(gen, (bs,), n, c)
    s_logits.requires_grad_(True)
    s_boxes.requires_grad_(True)
    t_sa, t_ca = _attn(gen, bs, h, n, n), _attn(gen, bs, h, n, 6)
    s_sa = _attn(gen, bs, h, n, n).requires_grad_(True)
    s_ca = _attn(gen, bs, h, n, 6).requires_grad_(True)
    t_idx, s_idx = adaptive_match(t_logits[None], t_boxes[None], s_logits[None], s_boxes[None])
    t_idx, s_idx = t_idx[0], s_idx[0]
    losses = prediction_distill(s_logits, s_boxes, t_logits, t_boxes, t_idx, s_idx)
    total = sum(losses.values())
    total = total + attention_distill(s_sa, t_sa, t_idx, s_idx, kind="self")
    total = total + attention_distill(s_ca, t_ca, t_idx, s_idx, kind="cross", loss="mse")
    total.backward()
    for x in (s_logits, s_boxes, s_sa, s_ca):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in (t_logits, t_boxes, t_sa, t_ca):
        assert x.grad is None and not x.requires_grad

    # An empty matching gives 0 losses that still backpropagate (zero gradients).
    empty = torch.zeros(bs, 0, dtype=torch.int64)
    zero = prediction_distill(s_logits, s_boxes, t_logits, t_boxes, empty, empty)
    assert all(float(v.detach()) == 0 for v in zero.values())
    zero["cls"].backward()


# ----------------------------------------------------------------------------- attention errors
def test_attention_shape_errors():
    gen = torch.Generator().manual_seed(8)
    idx = torch.arange(4).expand(2, 4)
    s_sa, t_sa = _attn(gen, 2, 8, 4, 4), _attn(gen, 2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"8 \(student\) and 4 \(teacher\)"):
        attention_distill(s_sa, t_sa, idx, idx, kind="self", per_head=True)
    # Head-averaged comparison accepts different head counts (and a stored H = 1 teacher).
    assert float(attention_distill(s_sa, t_sa, idx, idx, kind="self")) > 0
    assert float(attention_distill(s_sa, t_sa.mean(1, keepdim=True), idx, idx, kind="self")) > 0
    with pytest.raises(ValueError, match="C5 feature maps differ"):
        attention_distill(_attn(gen, 2, 8, 4, 12), _attn(gen, 2, 8, 4, 15), idx, idx, kind="cross")
    with pytest.raises(ValueError, match="kind"):
        attention_distill(s_sa, s_sa, idx, idx, kind="both")
    with pytest.raises(ValueError, match="loss"):
        attention_distill(s_sa, s_sa, idx, idx, loss="l2")
