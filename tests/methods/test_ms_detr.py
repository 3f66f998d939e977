"""MS-DETR mixed supervision: the one-to-many assignment on hand-built cases, the objective on tiny
models (no change to the student, gradients, taps, heads) and a short CLI run."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from kd_detr.models import DetectorRequest
from kd_detr.criterion import SetCriterion, weighted_total
from kd_detr.engine.recipe import load_recipe
from kd_detr.methods.ms_detr import MsDetrConfig
from kd_detr.models import build_model
from kd_detr.methods.ms_detr import MixedSupervision, one_to_many_assignment

TINY = dict(num_queries=8, d_model=32, nheads=4, dec_layers=2, dim_feedforward=64)
C = 5


# --------------------------------------------------------------------------- assignment helpers
def nested(gt, iou):
    """A box with the GT's centre and aspect, scaled so that its IoU with ``gt`` is exactly ``iou``."""
    s = math.sqrt(iou)
    return [gt[0], gt[1], gt[2] * s, gt[3] * s]


FAR = [0.9, 0.9, 0.05, 0.05]  # overlaps none of the GTs below
GT_A = [0.3, 0.3, 0.4, 0.4]


def case(boxes, prob=None, num_classes=C):
    """``(prob [Q,C], boxes [Q,4])``; probabilities 0 unless given as ``{query: {class: p}}``."""
    q = len(boxes)
    p = torch.zeros(q, num_classes)
    for i, row in (prob or {}).items():
        for c, v in row.items():
            p[i, c] = v
    return p, torch.tensor(boxes, dtype=torch.float)


def assign(prob, boxes, labels, gt_boxes, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    q, j = one_to_many_assignment(prob, boxes, torch.tensor(labels), torch.tensor(gt_boxes, dtype=torch.float),
                                  generator=g, **kw)
    return sorted(zip(q.tolist(), j.tolist()))


def score(iou, p=0.0):
    return 0.3 * p + 0.7 * iou


# --------------------------------------------------------------------------- assignment
def test_threshold_uses_the_gt_class_probability_and_plain_iou():
    # one GT of class 2; no cap and no top-K limit so only the threshold decides
    boxes = [nested(GT_A, 0.9),                    # q0: 0.63, the best (positive either way)
             nested(GT_A, 0.401 / 0.7),            # q1: 0.401 >= 0.4 -> positive
             nested(GT_A, 0.399 / 0.7),            # q2: 0.399 < 0.4 -> negative
             nested(GT_A, 0.5),                    # q3: 0.35 + 0.3 * 0.2 (its p of class 2) = 0.41 -> positive
             nested(GT_A, 0.5),                    # q4: 0.35 + 0.3 * 0.1 = 0.38 (p of class 4 = 0.9 ignored)
             FAR, FAR, FAR]
    prob, boxes = case(boxes, {3: {2: 0.2}, 4: {2: 0.1, 4: 0.9}})
    got = assign(prob, boxes, [2], [GT_A], topk=8, max_positive_fraction=1.0)
    assert got == [(0, 0), (1, 0), (3, 0)]


def test_topk_keeps_the_best_six_of_eight_candidates():
    ious = [0.60, 0.95, 0.70, 0.85, 0.65, 0.90, 0.75, 0.80]  # all above 0.4 / 0.7
    boxes = [nested(GT_A, v) for v in ious] + [FAR] * 8
    prob, boxes = case(boxes)
    got = assign(prob, boxes, [1], [GT_A], max_positive_fraction=1.0)  # default topk = 6
    best6 = sorted(range(8), key=lambda i: -ious[i])[:6]
    assert got == sorted((i, 0) for i in best6)
    assert {0, 4}.isdisjoint(q for q, _ in got)  # the two lowest-scoring candidates are dropped


def test_a_gt_below_threshold_still_gets_its_best_query():
    gt_b = [0.7, 0.7, 0.3, 0.3]
    boxes = [nested(GT_A, 0.9), nested(GT_A, 0.8), FAR,
             nested(gt_b, 0.3), nested(gt_b, 0.2), FAR, FAR, FAR]  # gt_b's best score 0.21 < 0.4
    prob, boxes = case(boxes)
    got = assign(prob, boxes, [0, 1], [GT_A, gt_b], max_positive_fraction=1.0)
    assert got == [(0, 0), (1, 0), (3, 1)]
    # alone, too
    assert assign(prob, boxes, [1], [gt_b], max_positive_fraction=1.0) == [(3, 0)]


def test_cap_at_a_quarter_of_the_queries_keeps_the_forced_queries():
    gt_b = [0.7, 0.7, 0.3, 0.3]
    # Q = 8 -> at most 2 positives; 6 candidates above threshold, each GT's best query is forced
    boxes = [nested(GT_A, 0.8), nested(GT_A, 0.95), nested(GT_A, 0.7), nested(GT_A, 0.75),
             nested(gt_b, 0.7), nested(gt_b, 0.9), nested(gt_b, 0.65), FAR]
    prob, boxes = case(boxes)
    for seed in range(10):
        got = assign(prob, boxes, [0, 1], [GT_A, gt_b], seed=seed)
        assert got == [(1, 0), (5, 1)], seed  # the two forced queries fill the cap
    # one GT: the forced query plus one random candidate -> the GT's top-2 queries by score
    for seed in range(10):
        got = assign(prob, boxes, [0], [GT_A], seed=seed)
        assert len(got) == 2 and (1, 0) in got
        assert got == [(0, 0), (1, 0)]
    # the default cap holds for larger Q too, with random picks that depend only on the seed
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(40, C, generator=g)
    boxes = torch.cat([torch.rand(40, 2, generator=g) * 0.4 + 0.3, torch.rand(40, 2, generator=g) * 0.3 + 0.2], 1)
    gts = [[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.3, 0.4], [0.55, 0.45, 0.35, 0.3]]
    a = assign(prob, boxes, [0, 1, 2], gts, seed=1)
    assert 3 <= len(a) <= 10 and len({q for q, _ in a}) == len(a)
    assert a == assign(prob, boxes, [0, 1, 2], gts, seed=1)


def test_a_query_candidate_for_two_gts_is_assigned_once_to_its_best():
    gt_b = [GT_A[0], GT_A[1], 0.4, 0.3]  # inside GT_A: IoU(GT_A box, gt_b) = 0.75
    q1 = nested(gt_b, 0.5 / 0.7)        # score 0.5 for gt_b, 0.375 for GT_A: a candidate of gt_b
    boxes = [list(GT_A), q1] + [FAR] * 6
    prob, boxes = case(boxes)
    # q0 scores 0.7 for GT_A and 0.525 for gt_b: the top-1 of both GTs (gt_b has one positive, q1),
    # so it is selected twice and keeps its best pair; q1 is not among gt_b's top-1
    got = assign(prob, boxes, [0, 3], [GT_A, gt_b], max_positive_fraction=1.0)
    assert got == [(0, 0)]


def test_no_gt_or_no_query_gives_an_empty_assignment():
    prob, boxes = case([GT_A, FAR])
    q, j = one_to_many_assignment(prob, boxes, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    assert q.numel() == 0 and j.numel() == 0 and q.dtype == torch.long


# --------------------------------------------------------------------------- the objective on tiny models
def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("cond_detr_r10_tiny", num_classes=C, **{**TINY, **kw})


def batch(seed=0, b=2, size=64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    mask = torch.zeros(b, size, size, dtype=torch.bool)
    mask[1, :, size - 16:] = True
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ][:b]
    return images, mask, targets


def objective(model, **cfg):
    crit = SetCriterion(C, num_dec_layers=model.config.dec_layers)
    return MixedSupervision(MsDetrConfig(enabled=True, **cfg), model.config, crit,
                            generator=torch.Generator().manual_seed(0))


def o2m_loss(obj, model, images, mask, targets):
    out = model(images, mask, request=obj.request())
    terms = obj(model, out, targets, num_boxes=3.0)
    return weighted_total(terms, obj.weight_dict), terms, out


def test_terms_and_weights():
    model = tiny()
    obj = objective(model)
    _, terms, out = o2m_loss(obj, model.train(), *batch())
    assert set(terms) == set(obj.weight_dict) == {f"ms_detr.loss_{t}.l{i}" for t in ("ce", "bbox", "giou")
                                                  for i in range(2)}
    assert obj.weight_dict["ms_detr.loss_ce.l0"] == 2.0 and obj.weight_dict["ms_detr.loss_bbox.l1"] == 5.0
    assert obj.weight_dict["ms_detr.loss_giou.l1"] == 2.0
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    assert obj.request() == DetectorRequest(candidates=True) and out["candidates"].shape == (2, 2, 8, 32)
    # an aux FFN per layer; the criterion is not part of the objective's state
    assert len(obj.aux_ffn) == 2 and not any(k.startswith("criterion") for k in obj.state_dict())


def test_student_is_untouched_and_inference_equals_a_plain_model():
    model = tiny()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    images, mask, targets = batch()
    x = images[:1]

    def same_as_plain(m):
        plain = build_model("cond_detr_r10_tiny", num_classes=C, **TINY)
        plain.load_state_dict(m.state_dict(), strict=True)
        with torch.no_grad():
            a, b = m.eval()(x), plain.eval()(x)
        for k in ("pred_logits", "pred_boxes", "hs"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        assert "candidates" not in a and a["pred_logits"].shape == (1, 8, C)  # no extra queries
        return a["pred_logits"]

    before = same_as_plain(model)
    obj = objective(model)
    opt = torch.optim.SGD([*model.parameters(), *obj.parameters()], lr=0.1)
    loss, _, _ = o2m_loss(obj, model.train(), images, mask, targets)
    loss.backward()
    opt.step()
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    after = same_as_plain(model)
    assert not torch.equal(before, after)  # the o2m step did train the student


def test_gradients_reach_the_aux_ffn_and_the_decoder_from_the_o2m_loss_alone():
    model = tiny().train()
    obj = objective(model)
    loss, _, _ = o2m_loss(obj, model, *batch())
    loss.backward()

    def nonzero(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    for ffn in obj.aux_ffn:
        assert nonzero(ffn.linear1.weight) and nonzero(ffn.linear2.weight) and nonzero(ffn.norm.weight)
    dec = model.transformer.decoder
    for layer in dec.layers:
        assert nonzero(layer.ca_v_proj.weight) and nonzero(layer.ca_qcontent_proj.weight)
    # (layer 0's self-attention runs on zero content, so only its value bias can get a gradient)
    assert nonzero(dec.layers[0].sa_v_proj.bias) and nonzero(dec.layers[1].sa_v_proj.weight)
    assert nonzero(dec.norm.weight)  # the candidates go through the shared final norm, as hs do
    assert nonzero(model.class_embed.weight) and nonzero(model.bbox_embed.layers[-1].weight)
    assert nonzero(model.backbone.body.conv1.weight) and nonzero(model.query_embed.weight)
    # tap after cross-attention: the last layer's FFN only feeds the o2o output, so the o2m loss never reaches it
    assert dec.layers[-1].linear1.weight.grad is None
    assert nonzero(dec.layers[0].linear1.weight)  # earlier FFNs feed the next layers


def test_separate_class_head_takes_the_class_gradient():
    model = tiny().train()
    obj = objective(model, class_head="separate")
    assert obj.class_head.bias.allclose(torch.full((C,), -math.log(99)))  # focal prior 0.01
    loss, _, _ = o2m_loss(obj, model, *batch())
    loss.backward()
    assert obj.class_head.weight.grad.abs().sum() > 0
    assert model.class_embed.weight.grad is None  # only the box head is shared
    assert model.bbox_embed.layers[-1].weight.grad.abs().sum() > 0


def test_layer_output_tap_without_aux_ffn_supervises_the_o2o_predictions():
    model = tiny().eval()
    obj = objective(model, tap="layer_output", use_aux_ffn=False)
    assert obj.request() == DetectorRequest() and obj.aux_ffn is None and not list(obj.parameters())
    images, mask, _ = batch()
    with torch.no_grad():
        out = model(images, mask)
        logits, boxes = obj.predictions(model, out)
    torch.testing.assert_close(logits[-1], out["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(boxes[0], out["aux_outputs"][0]["pred_boxes"], rtol=0, atol=0)
    # the cross-attention tap predicts from other features
    obj2 = objective(model, use_aux_ffn=False)
    with torch.no_grad():
        out2 = model(images, mask, request=obj2.request())
        logits2, _ = obj2.predictions(model, out2)
        ref = model.heads(model.transformer.decoder.norm(out2["candidates"]), out2["reference_points"])[0]
    torch.testing.assert_close(logits2, ref)
    assert not torch.allclose(logits2[-1], out["pred_logits"])


def test_o2m_loss_alone_fits_a_fixed_batch():
    model = tiny().train()
    obj = objective(model)
    opt = torch.optim.AdamW([*model.parameters(), *obj.parameters()], lr=1e-3)
    data = batch()
    history = []
    for _ in range(40):
        loss, terms, _ = o2m_loss(obj, model, *data)
        history.append({k: float(v.detach()) for k, v in terms.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k in obj.weight_dict:  # every term, every layer
        assert sum(h[k] for h in history[-5:]) < 0.8 * sum(h[k] for h in history[:5]), k
    total = [sum(h[k] * w for k, w in obj.weight_dict.items()) for h in history]
    assert sum(total[-5:]) < 0.5 * sum(total[:5])


def test_objective_handles_an_image_without_gt():
    model = tiny().train()
    obj = objective(model)
    images, mask, targets = batch()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    loss, terms, _ = o2m_loss(obj, model, images, mask, targets)
    assert torch.isfinite(loss)


def test_recipes():
    r = load_recipe("ms_detr")
    assert r.ms_detr.enabled and not r.distill.enabled and r.train == {"epochs": 12, "lr_drop": 11}
    assert (r.ms_detr.alpha, r.ms_detr.threshold, r.ms_detr.topk, r.ms_detr.max_positive_fraction) == (0.3, 0.4, 6, 0.25)
    assert r.ms_detr.tap == "cross_attn" and r.ms_detr.use_aux_ffn and r.ms_detr.class_head == "shared"
    d = load_recipe("d3etr_ms")
    assert d.ms_detr.enabled and d.distill.enabled and d.distill.adaptive and d.distill.fixed
    assert not load_recipe("baseline").ms_detr.enabled and not load_recipe("d3etr").ms_detr.enabled
    with pytest.raises(ValueError, match="ms_detr.tap"):
        load_recipe("ms_detr", ["ms_detr.tap=after_ffn"])
    with pytest.raises(ValueError, match="max_positive_fraction"):
        load_recipe("ms_detr", ["ms_detr.max_positive_fraction=0"])


# --------------------------------------------------------------------------- a short run
def test_short_run_lowers_the_o2m_losses_and_saves_a_plain_student(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main
    from kd_detr.models import load_model

    out = tmp_path / "run"
    args = ["distill", "--recipe", "ms_detr", "--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=10",
            "--data", str(synth_data), "--image-size", "64", "--num-workers", "0", "--output-dir", str(out),
            "--no-progress", "--set", "train.batch_size=4", "--set", "train.max_iters=30", "--set",
            "train.log_every=1", "--set", "train.eval_every_epochs=0", "--set", "train.lr=1e-3", "--set",
            "train.lr_backbone=1e-3", "--set", "train.lr_drop=1000"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    log = [r for r in log if "loss" in r]
    assert len(log) == 30
    keys = [k for k in log[0] if re.fullmatch(r"ms_detr\.loss_\w+\.l\d+", k)]
    assert sorted(keys) == sorted(f"ms_detr.loss_{t}.l{i}" for t in ("ce", "bbox", "giou") for i in range(2))
    assert "ms_detr.total" in log[0] and "loss_ce" in log[0]  # o2m sum beside the usual o2o terms
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in log for k in keys)

    def mean(rows, ks):
        return sum(r[k] for r in rows for k in ks) / (len(rows) * len(ks))

    # The o2m box terms are sums over the o2m positives / number of GT boxes: while the boxes improve,
    # more queries pass the threshold (up to the cap), so over 30 iterations they stay roughly flat on
    # this data (their per-positive value falls: test_o2m_loss_alone_fits_a_fixed_batch). The o2m
    # classification terms and the total loss must fall clearly.
    ce = [k for k in keys if ".loss_ce." in k]
    assert mean(log[-5:], ce) < 0.85 * mean(log[:5], ce), (mean(log[:5], ce), mean(log[-5:], ce))
    assert mean(log[-5:], ["loss"]) < 0.85 * mean(log[:5], ["loss"])
    assert mean(log[-5:], keys) < mean(log[:5], keys)

    model, _ = load_model(out / "model_final.safetensors")  # strict: no extra keys
    plain = build_model("cond_detr_r10_tiny", num_classes=model.config.num_classes, num_queries=10)
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    ckpt = copy.deepcopy(model.state_dict())
    assert not any("aux_ffn" in k or "ms_detr" in k for k in ckpt)


def test_method_base_class_is_abstract():
    """A method without its loss cannot be built (no silent do-nothing method)."""
    import pytest

    from kd_detr.methods import Method

    with pytest.raises(TypeError, match="abstract"):
        Method()
