"""The methods' deviations from the official code are recipe switches, checked on hand-built cases:
MS-DETR's positive cap and duplicate pairs, its o2o class weight, Co-DETR's head embedding and content term."""

from __future__ import annotations

import math

import pytest
import torch

from kd_detr.criterion import SetCriterion
from kd_detr.engine.recipe import load_recipe
from kd_detr.methods.co_detr.queries import PositiveQueryEncoder, QuerySelection
from kd_detr.methods.ms_detr import MixedSupervision, MsDetrConfig, one_to_many_assignment

A = [0.3, 0.5, 0.2, 0.2]  # GT 0, normalised cxcywh
B = [0.5, 0.5, 0.2, 0.2]  # GT 1, touching A


def _shifted(box, dx):
    return [box[0] + dx, *box[1:]]


def _assign(preds, **kw):
    """alpha = 0: the assignment score is the plain IoU, so the cases below are worked out by hand."""
    boxes = torch.tensor(preds)
    prob = torch.full((len(preds), 3), 0.5)
    return one_to_many_assignment(prob, boxes, torch.tensor([1, 2]), torch.tensor([A, B]), alpha=0.0, **kw)


def test_duplicate_pairs_best_keeps_one_pair_official_keeps_both_for_the_boxes():
    # q0 sits between A and B: IoU 0.338 with A (its best GT) and 0.329 with B; q4 is B shifted by 0.103
    # (IoU 0.320). Each GT gets 2 positives (A: q1, q0; B: q2, q4), and B's top-2 queries by IoU are q2 and
    # q0, so q0 is selected by both GTs.
    preds = [_shifted(A, 0.099), A, B, [0.9, 0.9, 0.05, 0.05], _shifted(B, 0.103)]
    q, g = _assign(preds, threshold=0.3, max_positive_fraction=1.0)
    assert q.tolist() == [0, 1, 2] and g.tolist() == [0, 0, 1]  # q0 keeps its best pair, q4 is not selected
    (bq, bg), (aq, ag) = _assign(preds, threshold=0.3, max_positive_fraction=1.0, duplicate_pairs="official")
    assert bq.tolist() == [0, 1, 2] and bg.tolist() == [0, 0, 1]  # the class target: the best pair
    assert list(zip(aq.tolist(), ag.tolist())) == [(0, 0), (0, 1), (1, 0), (2, 1)]  # box terms: every pair


def test_cap_rule_best_first_keeps_every_gts_best_query_official_draws_uniformly():
    # q0 = A and q1 = B are the GTs' best queries; q2..q5 are further candidates; the cap is 2 of 8.
    preds = [A, B, _shifted(A, 0.02), _shifted(A, 0.04), _shifted(B, 0.02), _shifted(B, -0.03),
             [0.9, 0.9, 0.05, 0.05], [0.1, 0.9, 0.05, 0.05]]
    lost_a_gt = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        q, g = _assign(preds, threshold=0.3, max_positive_fraction=0.25, generator=gen)
        assert list(zip(q.tolist(), g.tolist())) == [(0, 0), (1, 1)], seed
        gen = torch.Generator().manual_seed(seed)
        q, g = _assign(preds, threshold=0.3, max_positive_fraction=0.25, generator=gen, cap_rule="official")
        assert len(q) <= 2
        lost_a_gt += len(set(g.tolist())) < 2
    # uniformly 2 of 6 positives: P(both from one GT's 3) = 2 * C(3,2) / C(6,2) = 0.4; 40 draws see it
    assert 5 <= lost_a_gt <= 30


def test_ms_detr_official_duplicate_pairs_put_every_pair_in_the_box_terms():
    torch.manual_seed(0)
    criterion = SetCriterion(3, num_dec_layers=1)
    preds = torch.tensor([[_shifted(A, 0.099), A, B, [0.9, 0.9, 0.05, 0.05], _shifted(B, 0.103)]])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([A, B])}]
    out = {"hs": torch.zeros(1, 1, 5, 8), "reference_points": torch.zeros(1, 5, 2)}

    class Heads:  # a detector whose heads return these boxes and a flat class score
        def heads(self, hs, reference):
            return torch.zeros(*hs.shape[:-1], 3), preds.expand(*hs.shape[:-2], 5, 4)

        def output_norm(self, x):
            return x

    terms = {}
    for rule in ("best", "official"):
        cfg = MsDetrConfig(enabled=True, alpha=0.0, threshold=0.3, max_positive_fraction=1.0, tap="layer_output",
                           use_aux_ffn=False, duplicate_pairs=rule)
        obj = MixedSupervision(cfg, type("C", (), {"dec_layers": 1, "d_model": 8, "num_classes": 3})(), criterion)
        terms[rule] = obj(Heads(), out, targets, num_boxes=2.0)
    # the class term is the same (best pairs); the box terms add the pair (q0, B): L1 |q0 - B| = 0.101
    assert terms["official"]["ms_detr.loss_ce.l0"] == pytest.approx(float(terms["best"]["ms_detr.loss_ce.l0"]))
    extra_l1 = 0.101 / 2.0
    assert float(terms["official"]["ms_detr.loss_bbox.l0"]) == pytest.approx(
        float(terms["best"]["ms_detr.loss_bbox.l0"]) + extra_l1, abs=1e-6)


def test_o2o_class_weight_baseline_by_default_official_recipe_uses_one():
    assert "cls_loss_coef" not in load_recipe("ms_detr").train  # the baseline's 2 (TrainConfig default)
    assert "cls_loss_coef" not in load_recipe("d3etr_ms").train
    official = load_recipe("ms_detr_official")
    assert official.train["cls_loss_coef"] == 1.0
    assert (official.ms_detr.cap_rule, official.ms_detr.duplicate_pairs) == ("official", "official")


def test_co_detr_head_embedding_forms_and_official_recipe():
    sel = QuerySelection(boxes=torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]), gt_index=torch.tensor([[0]]),
                         source_index=torch.tensor([[0]]), num_positive=torch.tensor([1]))
    torch.manual_seed(0)
    plain = PositiveQueryEncoder(16, head_embedding=False)
    torch.manual_seed(0)
    vector = PositiveQueryEncoder(16, head_embedding=True)
    torch.manual_seed(0)
    scalar = PositiveQueryEncoder(16, head_embedding=True, head_embedding_form="official", num_heads=2)
    assert vector.head_embed.shape == (16,) and scalar.head_embed.shape == (1,)
    assert abs(scalar.head_embed.detach().item()) <= math.sqrt(6 / 3)  # Xavier bound of a [2, 1] table
    base = plain(sel)["query_pos"]
    torch.testing.assert_close(vector(sel)["query_pos"] - base, vector.head_embed.expand_as(base))
    diff = scalar(sel)["query_pos"] - base
    torch.testing.assert_close(diff, torch.full_like(diff, scalar.head_embed.detach().item()))  # one value, every channel
    r = load_recipe("co_detr_official")
    assert r.co_detr.content_from_features and r.co_detr.head_embedding_form == "official"
    assert not load_recipe("co_detr").co_detr.content_from_features
