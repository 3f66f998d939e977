"""Co-DETR objective: the adapter's pyramid, the ATSS assigner, positive queries carrying the heads'
assignments, gradients, a plain exported student and a short training run."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from kd_detr.models import DetectorRequest
from kd_detr.methods.co_detr import CollaborativeHybrid
from kd_detr.methods.co_detr.adapter import PYRAMID_STRIDES, PyramidAdapter, gn_groups
from kd_detr.methods.co_detr.atss_head import IGNORED, atss_assign
from kd_detr.criterion import SetCriterion, weighted_total
from kd_detr.engine.recipe import load_recipe
from kd_detr.methods.co_detr import CoDetrConfig
from kd_detr.models import build_model

TINY = dict(num_classes=5, num_queries=8, d_model=32, nheads=4, dec_layers=2, dim_feedforward=64)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model("cond_detr_r10_tiny", **TINY)


def batch(with_size=True):
    """Two 64 px images, the second padded on the right (48 px wide), a few GT boxes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = True
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.7, 0.6, 0.4, 0.5]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])},
    ]
    if with_size:
        targets[0]["size"], targets[1]["size"] = torch.tensor([64, 64]), torch.tensor([64, 48])
    return images, mask, targets


def objective(model, **cfg):
    crit = SetCriterion(5, num_dec_layers=model.config.dec_layers)
    return CollaborativeHybrid(CoDetrConfig(enabled=True, **cfg), model.config, crit)


def run_step(model, obj, with_size=True):
    images, mask, targets = batch(with_size)
    out = model(images, mask, request=obj.request())
    terms = obj(model, out, targets, num_boxes=3.0)
    return terms, targets


# --------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("hw", [(2, 2), (3, 5)])
def test_adapter_builds_five_levels_at_strides_8_to_128(hw):
    h, w = hw
    adapter = PyramidAdapter(32, in_stride=32)
    assert adapter.strides == PYRAMID_STRIDES == (8, 16, 32, 64, 128)
    memory = torch.randn(h * w, 2, 32)
    feats = adapter(memory, torch.zeros(2, h * w, dtype=torch.bool), (h, w))
    half = lambda n: -(-n // 2)  # noqa: E731  (a 3x3 stride-2 conv with padding 1 gives ceil(n/2))
    expected = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (half(h), half(w)), (half(half(h)), half(half(w)))]
    assert [tuple(f.shape) for f in feats] == [(2, 32, *s) for s in expected]
    # the stride-32 level is the memory itself, reshaped
    torch.testing.assert_close(feats[2], memory.permute(1, 2, 0).reshape(2, 32, h, w))
    # DC5 memory (stride 16): one upsampled level, three downsampled, same strides
    dc5 = PyramidAdapter(32, in_stride=16)
    feats = dc5(memory, torch.zeros(2, h * w, dtype=torch.bool), (h, w))
    assert [tuple(f.shape[-2:]) for f in feats][:3] == [(2 * h, 2 * w), (h, w), (half(h), half(w))]
    assert gn_groups(256) == 32 and gn_groups(128) == 32 and gn_groups(32) == 8


def test_adapter_ignores_padding_tokens():
    adapter = PyramidAdapter(32)
    memory, mask = torch.randn(6, 1, 32), torch.zeros(1, 6, dtype=torch.bool)
    mask[0, [2, 5]] = True  # last column of a 2x3 map is padding
    changed = memory.clone()
    changed[[2, 5]] = 100.0
    for a, b in zip(adapter(memory, mask, (2, 3)), adapter(changed, mask, (2, 3))):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- ATSS
def test_atss_assigns_the_anchor_at_the_gt_centre_and_not_far_ones():
    # one level: 32 px anchors centred every 8 px on a 64 px canvas
    ys, xs = torch.meshgrid(torch.arange(8) * 8.0, torch.arange(8) * 8.0, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], -1)
    anchors = torch.cat([centres - 16, centres + 16], -1)
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])  # centre (32, 32) = anchor 4 * 8 + 4
    out = atss_assign(anchors, [64], gt, topk=9)
    centre = 4 * 8 + 4
    # the 9 candidates have IoUs 1, 4 x 0.6, 4 x 0.39: mean + std = 0.75 leaves only the centred anchor
    assert out[centre] == 0 and int((out >= 0).sum()) == 1
    far = (centres - 32).norm(dim=1) > 16
    assert (out[far] == -1).all()
    # invalid anchors (e.g. centred in padding) are ignored, never candidates
    valid = centres[:, 0] < 48
    out = atss_assign(anchors, [64], gt, topk=9, valid=valid)
    assert (out[~valid] == IGNORED).all() and out[centre] == 0
    # an anchor positive for two GTs goes to the one it overlaps most; no GT -> all negative
    two = torch.tensor([[16.0, 16.0, 48.0, 48.0], [14.0, 14.0, 50.0, 50.0]])
    assert atss_assign(anchors, [64], two, topk=9)[centre] == 0
    assert (atss_assign(anchors, [64], gt[:0]) == -1).all()


def test_atss_candidates_are_taken_per_level():
    # two levels, each with an anchor identical to the GT: both are candidates, both positive
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    level0 = torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0], [0.0, 40.0, 20.0, 60.0]])
    level1 = torch.tensor([[10.0, 10.0, 30.0, 30.0], [-20.0, -20.0, 60.0, 60.0]])
    out = atss_assign(torch.cat([level0, level1]), [3, 2], gt, topk=1)
    assert out.tolist() == [0, -1, -1, 0, -1]


# --------------------------------------------------------------------------- positive queries
def test_positive_queries_carry_the_heads_assignments(monkeypatch):
    model = tiny()
    obj = objective(model)
    calls = []
    real = obj.criterion.layer_losses

    def spy(layer_outputs, targets, indices, num_boxes):
        calls.append((layer_outputs["pred_logits"].shape[1], targets, indices))
        return real(layer_outputs, targets, indices, num_boxes)

    monkeypatch.setattr(obj.criterion, "layer_losses", spy)
    terms, targets = run_step(model, obj)
    assert set(terms) == set(obj.weight_dict)  # every term weighted, nothing missing
    assert len(calls) == 2 * model.config.dec_layers  # every head, every decoder layer
    sizes = [(64, 64), (64, 48)]
    for h, name in enumerate(["atss", "faster_rcnn"]):
        rec = obj.last_assignments[name]
        sel = rec["selection"]
        bsz, m = sel.gt_index.shape
        assert m == max(9, int(sel.num_positive.max()))  # padded to the batch max, at least 9
        torch.testing.assert_close(rec["reference_points"], sel.boxes[..., :2])  # centres of the boxes
        for b in range(bsz):
            n = int(sel.num_positive[b])
            head = rec["assignments"][b]
            gt, src = sel.gt_index[b], sel.source_index[b]
            gt_abs = box_convert(targets[b]["boxes"], "cxcywh", "xyxy") * torch.tensor(sizes[b][::-1] * 2)
            # positives first: query j <-> the GT its head gave the anchor/proposal it comes from
            assert n > 0 and (gt[:n] >= 0).all() and torch.equal(head.gt_index[src[:n]], gt[:n])
            assert torch.equal(rec["labels"][b, :n], targets[b]["labels"][gt[:n]])
            torch.testing.assert_close(rec["target_boxes"][b, :n], targets[b]["boxes"][gt[:n]])
            # padding: the head's negatives, background label, no box
            assert (gt[n:] == -1).all() and (rec["labels"][b, n:] == -1).all() and (head.gt_index[src[n:]] == -1).all()
            # the query boxes are the head's boxes, normalised by the unpadded image
            w, h_ = sizes[b][1], sizes[b][0]
            norm = box_convert(head.boxes[src] / torch.tensor([w, h_, w, h_]), "xyxy", "cxcywh").clamp(0, 1)
            torch.testing.assert_close(sel.boxes[b], norm)
            iou = box_iou(head.boxes[src], gt_abs)
            if name == "atss":  # positive anchors are centred inside their GT
                ctr = (head.boxes[src[:n], :2] + head.boxes[src[:n], 2:]) / 2
                box = gt_abs[gt[:n]]
                assert ((ctr > box[:, :2]) & (ctr < box[:, 2:])).all()
            else:  # RoI sampling: positives IoU >= 0.5 with their GT, negatives below 0.5 with all
                assert (iou[torch.arange(n), gt[:n]] >= 0.5).all() and (iou[n:] < 0.5).all()
            # the decoder loss got exactly this supervision: query j <-> target j = GT gt[j]
            for layer in range(model.config.dec_layers):
                nq, sup, indices = calls[h * model.config.dec_layers + layer]
                assert nq == m
                src_idx, tgt_idx = indices[b]
                assert torch.equal(src_idx, torch.arange(n)) and torch.equal(tgt_idx, torch.arange(n))
                assert torch.equal(sup[b]["labels"], targets[b]["labels"][gt[:n]])
                torch.testing.assert_close(sup[b]["boxes"], targets[b]["boxes"][gt[:n]])


def test_image_sizes_come_from_targets_or_the_mask():
    model = tiny()
    obj = objective(model, heads=["atss"])
    images, mask, targets = batch(with_size=False)
    enc = model(images, mask, request=DetectorRequest(memory=True))["encoded"]
    assert obj.image_sizes(targets, enc) == [(64, 64), (64, 64)]  # 48 px rounded up to the stride
    _, _, targets = batch()
    assert obj.image_sizes(targets, enc) == [(64, 64), (64, 48)]
    terms, _ = run_step(model, obj, with_size=False)
    assert all(torch.isfinite(v) for v in terms.values())


# --------------------------------------------------------------------------- gradients, weights, config
def test_aux_heads_adapter_queries_and_student_receive_gradient():
    model = tiny()
    obj = objective(model)
    terms, _ = run_step(model, obj)
    weighted_total(terms, obj.weight_dict).backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for prefix in ("heads.atss.cls_logits", "heads.atss.bbox_pred", "heads.atss.centerness",
                   "heads.faster_rcnn.rpn.head", "heads.faster_rcnn.roi_heads.box_head",
                   "heads.faster_rcnn.roi_heads.box_predictor", "adapter.levels", "queries.atss.proj",
                   "queries.faster_rcnn.head_embed"):
        assert any(n.startswith(prefix) for n, _ in obj.named_parameters()), prefix
    # the student's encoder (through the heads and the positive queries) and decoder both learn
    for part in ("transformer.encoder", "transformer.decoder", "class_embed", "bbox_embed"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part) and p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, part
    # no Co-DETR module lives in the student
    assert not any("co_detr" in n or "atss" in n or "rpn" in n for n in model.state_dict())


def test_weights_follow_the_paper_and_content_from_features():
    model = tiny()
    obj = objective(model, heads=["atss"], lambda1=0.5, lambda2=3.0, content_from_features=True,
                    use_head_embedding=False)
    layers = model.config.dec_layers
    assert obj.weight_dict["co_detr.atss.loss_bbox"] == 2.0 * layers * 3.0  # GIoU 2 x L x lambda2
    assert obj.weight_dict["co_detr.dec.atss.loss_bbox.l1"] == 5.0 * 0.5    # main L1 5 x lambda1
    assert obj.weight_dict["co_detr.dec.atss.loss_ce.l0"] == 2.0 * 0.5
    assert not any("faster_rcnn" in k for k in obj.weight_dict)
    terms, _ = run_step(model, obj)
    weighted_total(terms, obj.weight_dict).backward()
    assert obj.queries["atss"].head_embed is None
    assert obj.queries["atss"].feat_proj.weight.grad.abs().sum() > 0


def test_heads_are_validated():
    model = tiny()
    with pytest.raises(ValueError, match="co_detr.heads"):
        objective(model, heads=["atss", "fcos"])
    with pytest.raises(ValueError, match="co_detr.heads"):
        objective(model, heads=["atss", "atss"])
    r = load_recipe("co_detr")
    assert r.co_detr.enabled and r.co_detr.heads == ["atss", "faster_rcnn"] and not r.distill.enabled
    assert (r.co_detr.lambda1, r.co_detr.lambda2, r.co_detr.max_positive_queries) == (1.0, 2.0, 300)
    d = load_recipe("d3etr_co")
    assert d.co_detr.enabled and d.distill.enabled


# --------------------------------------------------------------------------- training run
def test_short_run_lowers_co_detr_losses_and_exports_a_plain_student(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main
    from kd_detr.models import load_model

    out = tmp_path / "run"
    args = ["distill", "--recipe", "co_detr", "--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=10",
            "--data", str(synth_data), "--image-size", "64", "--num-workers", "0", "--output-dir", str(out),
            "--no-progress", "--set", "train.batch_size=4", "--set", "train.max_iters=30",
            "--set", "train.log_every=1", "--set", "train.eval_every_epochs=0", "--set", "train.lr=1e-3",
            "--set", "train.lr_backbone=1e-3", "--set", "train.lr_drop=1000",
            # fewer sampled RoIs: the RoI head's 1024-wide FCs dominate a CPU step of this tiny student
            "--set", "co_detr.roi_batch_size_per_image=64"]
    # One thread: the heads run thousands of small ops per step, and on a shared 2-core machine every
    # parallel op can stall on the other (busy) core; one thread keeps this run at ~15 s either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output + repr(res.exception)
    log = [r for r in (json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(log) == 30
    for key in ("co_detr.atss.loss_cls", "co_detr.faster_rcnn.loss_rpn_cls", "co_detr.dec.atss.loss_ce.l1",
                "co_detr.dec.faster_rcnn.loss_giou.l0", "co_detr.total", "student.total"):
        assert key in log[0], key
    first = sum(r["co_detr.total"] for r in log[:5]) / 5
    last = sum(r["co_detr.total"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)

    trained, meta = load_model(out / "model_final.safetensors")  # strict: no extra tensors
    plain = build_model("cond_detr_r10_tiny", num_classes=trained.config.num_classes, num_queries=10)
    assert list(trained.state_dict()) == list(plain.state_dict())
