"""Model registry, shapes, attention maps, query groups and backbone options."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from kd_detr.models import DetectorRequest
from kd_detr.models import (
    ConditionalAttention,
    ModelConfig,
    PositionEmbeddingSine,
    build_model,
    get_config,
    list_models,
)

# A small transformer for tests that do not care about the registry sizes.
TINY = dict(d_model=64, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=96, num_queries=10)


def _batch(sizes=((64, 96), (48, 64)), seed=0):
    """Zero-padded batch [B,3,Hmax,Wmax] with mask True at padding (data contract)."""
    g = torch.Generator().manual_seed(seed)
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, hmax, wmax)
    mask = torch.ones(len(sizes), hmax, wmax, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


def _tiny(num_classes=5, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(TINY)
    cfg.update(kw)
    return build_model("cond_detr_r10_tiny", num_classes=num_classes, **cfg).eval()


# ---------------------------------------------------------------- registry / configs


def test_registry_lists_required_models():
    models = list_models()
    for name in ("cond_detr_r50", "cond_detr_r101", "cond_detr_r50_dc5", "cond_detr_r101_dc5",
                 "cond_detr_r18_tiny", "cond_detr_r10_tiny", "cond_detr_r34_small"):
        assert name in models and models[name]
    with pytest.raises(ValueError, match="unknown model"):
        get_config("cond_detr_r999")


@pytest.mark.parametrize("name,backbone,dilation", [
    ("cond_detr_r50", "resnet50", False), ("cond_detr_r101", "resnet101", False),
    ("cond_detr_r50_dc5", "resnet50", True), ("cond_detr_r101_dc5", "resnet101", True)])
def test_official_configs(name, backbone, dilation):
    c = get_config(name)
    assert (c.backbone, c.dilation, c.backbone_norm) == (backbone, dilation, "frozen_bn")
    assert (c.num_queries, c.enc_layers, c.dec_layers, c.d_model, c.nheads, c.dim_feedforward,
            c.num_classes, c.dropout) == (300, 6, 6, 256, 8, 2048, 91, 0.1)


@pytest.mark.parametrize("name,millions", [("cond_detr_r50", 43.4), ("cond_detr_r101", 62.4)])
def test_official_param_counts(name, millions):
    with torch.device("meta"):
        model = build_model(name)
    n = sum(p.numel() for p in model.parameters())  # frozen BN statistics are buffers
    assert abs(n / 1e6 - millions) < 0.05
    transformer_and_heads = n - sum(p.numel() for p in model.backbone.parameters())
    assert abs(transformer_and_heads / 1e6 - 20.0) < 0.3
    assert model.config.freeze_stem is True
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError) as e:
        build_model("cond_detr_r10_tiny", hidden_dim=64)
    assert "hidden_dim" in str(e.value) and "d_model" in str(e.value)  # names it and lists valid keys
    with pytest.raises(ValueError, match="divisible"):
        build_model("cond_detr_r10_tiny", d_model=64, nheads=5)
    with pytest.raises(ValueError, match="Bottleneck"):
        build_model("cond_detr_r10_tiny", dilation=True)
    with pytest.raises(ValueError, match="backbone_norm"):
        build_model("cond_detr_r10_tiny", backbone_norm="ln")


def test_config_roundtrip_and_model_config():
    model = _tiny(num_classes=3)
    cfg = model.config
    assert cfg.name == "cond_detr_r10_tiny" and cfg.num_classes == 3 and cfg.d_model == 64
    assert cfg.freeze_stem is False  # trainable-BN model from scratch: nothing frozen
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["cond_detr_r10_tiny", "cond_detr_r18_tiny", "cond_detr_r34_small",
                                  "cond_detr_r18"])
def test_registry_output_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    cfg = model.config
    images, mask = _batch()
    with torch.no_grad():
        out = model(images, mask)
    B, Q, L, d = 2, cfg.num_queries, cfg.dec_layers, cfg.d_model
    assert out["pred_logits"].shape == (B, Q, 7)
    assert out["pred_boxes"].shape == (B, Q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == L - 1
    assert all(a["pred_logits"].shape == (B, Q, 7) and a["pred_boxes"].shape == (B, Q, 4)
               for a in out["aux_outputs"])
    assert out["hs"].shape == (L, B, Q, d)
    assert out["reference_points"].shape == (B, Q, 2)
    assert out["query_embed"].shape == (Q, d)
    assert out["feature_size"] == (2, 3)  # ceil(64/32), ceil(96/32)
    assert out["memory_mask"].shape == (B, 6) and out["memory_mask"].dtype == torch.bool
    assert "self_attn" not in out and "cross_attn" not in out and "groups" not in out
    # last layer and aux layers come from hs through the shared heads
    assert torch.allclose(out["pred_logits"], model.class_embed(out["hs"][-1]), atol=1e-6)
    assert torch.equal(out["aux_outputs"][0]["pred_logits"], model.class_embed(out["hs"][0]))


def test_initial_heads_follow_official_init():
    model = _tiny()
    assert torch.allclose(model.class_embed.bias, torch.full((5,), -4.59511985), atol=1e-6)
    images, mask = _batch()
    with torch.no_grad():
        out = model(images, mask)
    # zero-initialised last box layer: boxes are the reference points with w = h = 0.5
    assert torch.allclose(out["pred_boxes"][..., :2], out["reference_points"], atol=1e-5)
    assert torch.allclose(out["pred_boxes"][..., 2:], torch.full_like(out["pred_boxes"][..., 2:], 0.5))
    # decoder layers 1.. have no ca_qpos_proj (official)
    layers = model.transformer.decoder.layers
    assert layers[0].ca_qpos_proj is not None and all(l.ca_qpos_proj is None for l in layers[1:])


def test_dc5_doubles_feature_size():
    torch.manual_seed(0)
    small = dict(d_model=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=4)
    c5 = build_model("cond_detr_r50", **small).eval()
    dc5 = build_model("cond_detr_r50_dc5", **small).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = c5(x), dc5(x)
    assert a["feature_size"] == (2, 3) and b["feature_size"] == (4, 6)
    assert b["memory_mask"].shape == (1, 24)
    assert dc5.backbone.num_channels == 2048 and dc5.backbone.stride == 16


# ---------------------------------------------------------------- attention maps


def test_attention_maps_shapes_normalisation_and_padding():
    model = _tiny()
    images, mask = _batch()
    with torch.no_grad():
        plain = model(images, mask)
        out = model(images, mask, request=DetectorRequest(attention=True))
    L, B, H, Q = 3, 2, 4, 10
    S = out["memory_mask"].shape[1]
    sa, ca = out["self_attn"], out["cross_attn"]
    assert sa.shape == (L, B, H, Q, Q) and ca.shape == (L, B, H, Q, S)
    assert torch.allclose(sa.sum(-1), torch.ones(L, B, H, Q), atol=1e-5)
    assert torch.allclose(ca.sum(-1), torch.ones(L, B, H, Q), atol=1e-5)
    pad = out["memory_mask"]  # second image (48,64) in (64,96): C5 2x3 with the last column padded
    assert not pad[0].any() and pad[1].tolist() == [False, False, True, False, False, True]
    assert (ca[:, 1][..., pad[1]] == 0).all()  # exact zeros at padded keys
    assert (ca[:, 1][..., ~pad[1]] > 0).all()
    # maps are per head (heads differ), and asking for them does not change the outputs
    assert not torch.allclose(ca[:, :, 0], ca[:, :, 1])
    assert torch.equal(plain["pred_logits"], out["pred_logits"])
    assert torch.equal(plain["pred_boxes"], out["pred_boxes"])


def test_attention_maps_are_pre_dropout_and_differentiable():
    model = _tiny(dropout=0.5).train()
    images, mask = _batch()
    out = model(images, mask, request=DetectorRequest(attention=True))
    ca = out["cross_attn"]
    # dropout would zero entries and rescale the rest; pre-dropout rows still sum to 1
    assert torch.allclose(ca.sum(-1), torch.ones_like(ca.sum(-1)), atol=1e-5)
    assert torch.allclose(out["self_attn"].sum(-1), torch.ones_like(out["self_attn"].sum(-1)), atol=1e-5)
    (ca.pow(2).sum() + out["self_attn"].pow(2).sum()).backward()
    assert model.transformer.decoder.layers[0].ca_qcontent_proj.weight.grad is not None
    assert model.query_embed.weight.grad.abs().sum() > 0


def test_conditional_attention_matches_torch_mha():
    """With identity in-projections nn.MultiheadAttention computes the same thing."""
    torch.manual_seed(0)
    E, H, Q, S, B = 16, 4, 5, 7, 2
    ours = ConditionalAttention(E, H).eval()
    ref = nn.MultiheadAttention(E, H).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.eye(E).repeat(3, 1))
        ref.in_proj_bias.zero_()
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    q, k, v = torch.randn(Q, B, E), torch.randn(S, B, E), torch.randn(S, B, E)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -3:] = True
    out, w = ours(q, k, v, key_padding_mask=kpm, need_weights=True)
    r_out, r_w = ref(q, k, v, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    assert torch.allclose(out, r_out, atol=1e-6) and torch.allclose(w, r_w, atol=1e-6)
    assert ours(q, k, v, key_padding_mask=kpm)[1] is None


# ---------------------------------------------------------------- query groups


def test_extra_group_leaves_primary_unchanged():
    model = _tiny()
    images, mask = _batch()
    g = torch.Generator().manual_seed(3)
    groups = [{"query_pos": torch.randn(7, 64, generator=g)}]
    with torch.no_grad():
        plain = model(images, mask, request=DetectorRequest(attention=True))
        empty = model(images, mask, request=DetectorRequest(query_groups=[], attention=True))
        both = model(images, mask, request=DetectorRequest(query_groups=groups, attention=True))
    # no group -> exactly the plain computation
    for k in ("pred_logits", "pred_boxes", "hs", "self_attn", "cross_attn"):
        assert torch.equal(plain[k], empty[k])
    # one group -> primary outputs equal up to float round-off
    for k in ("pred_logits", "pred_boxes", "hs", "reference_points", "self_attn", "cross_attn"):
        assert both[k].shape == plain[k].shape
        assert (both[k] - plain[k]).abs().max() < 1e-6, k
    for a, b in zip(both["aux_outputs"], plain["aux_outputs"]):
        assert (a["pred_boxes"] - b["pred_boxes"]).abs().max() < 1e-6
    (grp,) = both["groups"]
    assert grp["pred_logits"].shape == (2, 7, 5) and grp["pred_boxes"].shape == (2, 7, 4)
    assert grp["hs"].shape == (3, 2, 7, 64) and grp["reference_points"].shape == (2, 7, 2)
    assert grp["self_attn"].shape == (3, 2, 4, 7, 7)
    assert grp["cross_attn"].shape == (3, 2, 4, 7, plain["memory_mask"].shape[1])
    assert len(grp["aux_outputs"]) == 2
    assert grp["feature_size"] == plain["feature_size"]
    assert torch.allclose(grp["self_attn"].sum(-1), torch.ones(3, 2, 4, 7), atol=1e-5)


def test_group_with_primary_queries_reproduces_primary():
    """Same decoder weights: a group holding the primary queries gives the primary outputs."""
    model = _tiny()
    images, mask = _batch()
    groups = [{"query_pos": model.query_embed.weight.detach().clone()}]
    with torch.no_grad():
        out = model(images, mask, request=DetectorRequest(query_groups=groups, attention=True))
    grp = out["groups"][0]
    for k in ("pred_logits", "pred_boxes", "hs", "reference_points", "self_attn", "cross_attn"):
        assert (grp[k] - out[k]).abs().max() < 1e-5, k


def test_group_outputs_depend_only_on_own_queries():
    model = _tiny()
    images, mask = _batch()
    g = torch.Generator().manual_seed(4)
    a = {"query_pos": torch.randn(2, 6, 64, generator=g),  # per-image positional queries [B,N,d]
         "query_content": torch.randn(2, 6, 64, generator=g),
         "reference_points": torch.rand(2, 6, 2, generator=g)}
    b1 = {"query_pos": torch.randn(5, 64, generator=g)}
    b2 = {"query_pos": torch.randn(9, 64, generator=g)}
    with torch.no_grad():
        out1 = model(images, mask, request=DetectorRequest(query_groups=[a, b1]))
        out2 = model(images, mask, request=DetectorRequest(query_groups=[a, b2]))
        model.query_embed.weight.add_(1.0)  # changes the primary queries only
        out3 = model(images, mask, request=DetectorRequest(query_groups=[a, b1]))
    ga1, ga2, ga3 = out1["groups"][0], out2["groups"][0], out3["groups"][0]
    assert torch.equal(ga1["reference_points"], a["reference_points"])  # override honoured
    for k in ("pred_logits", "pred_boxes", "hs"):
        assert (ga1[k] - ga2[k]).abs().max() < 1e-5
        assert (ga1[k] - ga3[k]).abs().max() < 1e-5
    assert (out1["pred_logits"] - out3["pred_logits"]).abs().max() > 1e-3  # the primary did change
    assert out2["groups"][1]["pred_logits"].shape == (2, 9, 5)


def test_extra_group_validation():
    model = _tiny()
    images, mask = _batch()
    with pytest.raises(ValueError, match="query_pos"):
        model(images, mask, request=DetectorRequest(query_groups=[{"query_pos": torch.randn(4, 32)}]))
    with pytest.raises(ValueError, match="query_content"):
        model(images, mask, request=DetectorRequest(query_groups=[{"query_pos": torch.randn(4, 64), "query_content": torch.randn(4, 64)}]))
    with pytest.raises(ValueError, match="keys"):
        model(images, mask, request=DetectorRequest(query_groups=[{"pos": torch.randn(4, 64)}]))


# ---------------------------------------------------------------- invariants


def test_decoder_is_permutation_equivariant_in_queries():
    model = _tiny()
    images, mask = _batch()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(images, mask, request=DetectorRequest(attention=True))
        model.query_embed.weight.copy_(model.query_embed.weight[perm])
        outp = model(images, mask, request=DetectorRequest(attention=True))
    for k in ("pred_logits", "pred_boxes", "reference_points"):
        assert (outp[k] - out[k][:, perm]).abs().max() < 1e-5, k
    assert (outp["cross_attn"] - out["cross_attn"][:, :, :, perm]).abs().max() < 1e-5
    assert (outp["self_attn"] - out["self_attn"][:, :, :, perm][..., perm]).abs().max() < 1e-5


def test_eval_determinism_and_unpadded_image_in_batch():
    model = _tiny()
    images, mask = _batch()  # image 0 is the largest, so it carries no padding
    with torch.no_grad():
        a = model(images, mask)
        b = model(images, mask)
        single = model(images[:1], mask[:1])
        no_mask = model(images[:1])
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    # eval-mode BN and per-image attention: an unpadded image is unaffected by its batch mates
    assert (a["pred_logits"][0] - single["pred_logits"][0]).abs().max() < 1e-4
    assert (a["pred_boxes"][0] - single["pred_boxes"][0]).abs().max() < 1e-5
    assert torch.equal(single["pred_logits"], no_mask["pred_logits"])  # mask=None means no padding


def test_position_encoding_of_valid_area_ignores_padding():
    pe = PositionEmbeddingSine(32)
    m_small = torch.zeros(1, 3, 4, dtype=torch.bool)
    m_pad = torch.ones(1, 5, 7, dtype=torch.bool)
    m_pad[:, :3, :4] = False
    a, b = pe(m_small), pe(m_pad)
    assert a.shape == (1, 64, 3, 4) and b.shape == (1, 64, 5, 7)
    assert torch.equal(a, b[:, :, :3, :4])


def test_mask_shape_is_checked():
    model = _tiny()
    images, mask = _batch()
    with pytest.raises(ValueError, match="mask"):
        model(images, mask[:, :10])


# ---------------------------------------------------------------- backbone options


@pytest.mark.parametrize("norm,cls", [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d),
                                      ("gn", nn.GroupNorm)])
def test_backbone_norm_variants(norm, cls):
    model = _tiny(backbone_norm=norm)
    norms = [m for m in model.backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))]
    assert norms and all(isinstance(m, cls) for m in norms)
    images, mask = _batch()
    model.train()
    out = model(images, mask)
    out["pred_boxes"].sum().backward()
    assert torch.isfinite(out["pred_logits"]).all()
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    if norm == "frozen_bn":  # official: stem + layer1 frozen, BN statistics fixed
        assert trainable == {"layer2", "layer3", "layer4"}
        assert model.backbone.body.layer2[0].conv1.weight.grad is not None
    else:  # from scratch: everything trains
        assert trainable == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}


def test_freeze_options():
    frozen = _tiny(train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    stem = _tiny(freeze_stem=True)  # trainable BN with frozen stem: stem BN stays in eval mode
    stem.train()
    assert not stem.backbone.body.bn1.training and not stem.backbone.body.layer1[0].bn1.training
    assert stem.backbone.body.layer2[0].bn1.training
    images, mask = _batch()
    before = stem.backbone.body.bn1.running_mean.clone()
    stem(images, mask)
    assert torch.equal(before, stem.backbone.body.bn1.running_mean)


def _resnet10_imagenet_like():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(7)
    return ResNet(BasicBlock, [1, 1, 1, 1]).state_dict()  # includes fc.* and num_batches_tracked


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_weights_file(tmp_path, suffix):
    sd = _resnet10_imagenet_like()
    path = tmp_path / f"resnet10{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    model = build_model("cond_detr_r10_tiny", backbone_weights=str(path), **TINY)
    body = model.backbone.body.state_dict()
    for k, v in body.items():
        assert torch.equal(v, sd[k]), k
    assert model.config.freeze_stem is True  # pretrained -> official stem/layer1 freezing
    assert not model.backbone.body.conv1.weight.requires_grad
    for norm in ("frozen_bn",):  # frozen BN ignores num_batches_tracked
        m = build_model("cond_detr_r10_tiny", backbone_weights=str(path), backbone_norm=norm, **TINY)
        assert torch.equal(m.backbone.body.bn1.running_var, sd["bn1.running_var"])


def test_backbone_weights_errors(tmp_path):
    sd = _resnet10_imagenet_like()
    del sd["layer2.0.conv1.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError) as e:
        build_model("cond_detr_r10_tiny", backbone_weights=str(bad), **TINY)
    assert "bad.pth" in str(e.value) and "layer2.0.conv1.weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("cond_detr_r10_tiny", backbone_weights=str(tmp_path / "nope.pth"), **TINY)
    with pytest.raises(ValueError, match="gn"):
        good = tmp_path / "good.pth"
        torch.save(_resnet10_imagenet_like(), good)
        build_model("cond_detr_r10_tiny", backbone_weights=str(good), backbone_norm="gn", **TINY)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth"):
        build_model("cond_detr_r10_tiny", backbone_weights=str(junk), **TINY)


def test_decode_pass_and_candidates_match_the_grouped_forward():
    """``decode`` on the encoder output equals the same group inside ``forward``; candidates are the
    features after cross-attention (the FFN + norm3 of the layer turn them into its output)."""
    from kd_detr.models import build_model as build

    torch.manual_seed(0)
    m = build("cond_detr_r10_tiny", num_classes=5, num_queries=6, d_model=32, nheads=4).eval()
    x = torch.randn(2, 3, 64, 64)
    q = torch.randn(4, 32)
    with torch.no_grad():
        out = m(x, request=DetectorRequest(memory=True, candidates=True, query_groups=[{"query_pos": q}]))
        alone = m.decode(out["encoded"], [{"query_pos": q}], request=DetectorRequest(candidates=True))
    assert len(alone) == 1
    for key in ("pred_logits", "pred_boxes", "candidates"):
        torch.testing.assert_close(alone[0][key], out["groups"][0][key], rtol=0, atol=1e-6)
    assert out["candidates"].shape == (2, 2, 6, 32) and out["encoded"]["memory"].shape[1:] == (2, 32)
    layer = m.transformer.decoder.layers[-1]
    c = out["candidates"][-1]
    ffn = layer.norm3(c + layer.linear2(layer.activation(layer.linear1(c))))
    torch.testing.assert_close(m.transformer.decoder.norm(ffn), out["hs"][-1], rtol=0, atol=1e-5)
