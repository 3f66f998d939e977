"""The transformers DETR families under the detector contract: every adapter against the library's own
outputs and loss, the contract's invariances, and the refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kd_detr.criterion import FamilyLossCriterion, weighted_total  # noqa: E402
from kd_detr.models import build_model, get_config, list_models, load_model, save_model  # noqa: E402
from kd_detr.models.hf import FAMILIES, HFDetector, transformers_labels  # noqa: E402
from kd_detr.models.hf.registry import tiny_name  # noqa: E402

FAMILY_KEYS = sorted(k for k in FAMILIES if tiny_name(k) in list_models())
SIZE = 64


def _tiny(family: str, num_classes: int = 4, queries: int = 8) -> HFDetector:
    torch.manual_seed(0)
    overrides = {"num_queries": queries}
    if not FAMILIES[family].pixel_mask:
        overrides["input_size"] = SIZE
    return build_model(tiny_name(family), num_classes=num_classes, **overrides)


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[1, :, 48:] = True  # the second image is narrower: padded on the right
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.5, .5, .2, .2], [.3, .3, .1, .2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[.4, .5, .3, .2]])}]
    return images, mask, targets


def test_every_required_family_is_registered():
    required = {"detr", "conditional_detr", "dab_detr", "deformable_detr", "rt_detr", "rt_detr_v2", "d_fine"}
    assert required <= set(FAMILY_KEYS)


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_last_layer_equals_the_library_and_layers_equal_its_heads(family):
    model = _tiny(family).eval()
    images, mask, _ = _batch()
    with torch.no_grad():
        out = model(images, mask)
        pixel_values, pixel_mask = model.pixels(images, mask)
        ref = model.hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert torch.allclose(out["family_logits"], ref.logits, atol=1e-6, rtol=0)
    assert torch.allclose(out["pred_boxes"], ref.pred_boxes, atol=1e-6, rtol=0)
    L, B, Q, C = out.logits.shape
    assert (L, B, Q, C) == (model.config.dec_layers, 2, 8, 4)
    if FAMILIES[family].softmax:  # sigmoid of what the methods see is the family's own class probability
        assert torch.allclose(out["pred_logits"].sigmoid(), ref.logits.softmax(-1)[..., :-1], atol=1e-6)
    else:
        assert torch.equal(out["pred_logits"], out["family_logits"])

    # every intermediate layer equals the family's own per-layer outputs (its auxiliary outputs, computed by
    # transformers in training mode with labels; dropout is 0 in the tiny configs' decoders)
    model.train()
    torch.manual_seed(5)
    with torch.no_grad():
        mine = model(images, mask, targets=_batch()[2])
    torch.manual_seed(5)
    with torch.no_grad():
        theirs = model.hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=transformers_labels(_batch()[2]))
    fam = FAMILIES[family]
    if getattr(theirs, "intermediate_logits", None) is not None:
        # RT-DETR / D-FINE families emit every layer themselves: denoising queries first, D-FINE's "pre"
        # prediction at index 0
        n_dn = mine["dn_queries"]
        first = theirs.intermediate_logits.shape[1] - L
        ref_logits = theirs.intermediate_logits[:, first:, n_dn:].transpose(0, 1)
        ref_boxes = theirs.intermediate_reference_points[:, first:, n_dn:].transpose(0, 1)
        layers = [(ref_logits[i], ref_boxes[i]) for i in range(L)]
    else:  # the library's auxiliary outputs (its heads on each layer), group 0 of Group-DETR families
        aux = theirs.auxiliary_outputs
        assert aux is not None and len(aux) >= L - 1
        layers = [(a["logits"][:, :Q], a["pred_boxes"][:, :Q]) for a in aux[:L - 1]]
    for i, (hf_logits, hf_boxes) in enumerate(layers[:L - 1]):
        own = mine["aux_outputs"][i]
        if fam.softmax:
            assert torch.allclose(own["pred_logits"].sigmoid(), hf_logits.softmax(-1)[..., :-1], atol=1e-5)
        else:
            assert torch.allclose(own["pred_logits"], hf_logits, atol=1e-5, rtol=0), f"{family} layer {i} logits"
        assert torch.allclose(own["pred_boxes"], hf_boxes, atol=1e-5, rtol=0), f"{family} layer {i} boxes"


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_ground_truth_loss_equals_the_library_loss(family):
    model = _tiny(family).train()
    images, mask, targets = _batch()
    criterion = FamilyLossCriterion(4, model.family_loss_weights)
    torch.manual_seed(7)  # denoising groups are random: the same draw for both
    out = model(images, mask, targets=targets)
    terms = criterion(out, targets)
    total = weighted_total(terms, criterion.weight_dict)
    assert torch.allclose(total, out["family_loss"], rtol=1e-6, atol=1e-6)
    pixel_values, pixel_mask = model.pixels(images, mask)
    torch.manual_seed(7)
    ref = model.hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=transformers_labels(targets))
    assert torch.allclose(total, ref.loss, rtol=1e-5, atol=1e-5)
    assert set(terms) == set(ref.loss_dict)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_denoising_and_training_groups_never_reach_the_methods(family):
    model = _tiny(family).train()
    images, mask, targets = _batch()
    out = model(images, mask, targets=targets)
    assert out.logits.shape[2] == 8 and out.boxes.shape[2] == 8
    assert out["reference_points"].shape[:2] == (2, 8)


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_identical_teacher_and_student_give_zero_prediction_kd(family):
    from kd_detr.methods.d3etr.adaptive_match import adaptive_match
    from kd_detr.methods.d3etr.losses import prediction_distill

    model = _tiny(family).eval()
    images, mask, _ = _batch()
    with torch.no_grad():
        out = model(images, mask)
    logits, boxes = out.logits, out.boxes  # every layer
    t_idx, s_idx = adaptive_match(logits, boxes, logits, boxes)
    for layer in range(logits.shape[0]):
        p = prediction_distill(logits[layer], boxes[layer], logits[layer], boxes[layer], t_idx[layer], s_idx[layer])
        assert all(abs(float(v)) < 1e-5 for v in p.values()), (family, layer, p)


# families whose object queries are learned embeddings (the others select theirs per image from the encoder)
LEARNED_QUERIES = {"detr": "query_position_embeddings", "conditional_detr": "query_position_embeddings",
                   "dab_detr": "query_refpoint_embeddings", "deformable_detr": "query_position_embeddings"}


@pytest.mark.parametrize("family", sorted(set(LEARNED_QUERIES) & set(FAMILY_KEYS)))
def test_permuting_learned_queries_permutes_the_outputs(family):
    model = _tiny(family).eval()
    images, mask, _ = _batch()
    with torch.no_grad():
        out = model(images, mask)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    emb = getattr(model.hf.model, LEARNED_QUERIES[family]).weight
    with torch.no_grad():
        emb.copy_(emb[perm])
        permuted = model(images, mask)
    for key in ("logits", "boxes"):
        assert torch.allclose(getattr(permuted, key), getattr(out, key)[:, :, perm], atol=1e-5), (family, key)


def test_checkpoint_round_trip_and_hf_folder_spec(tmp_path):
    model = _tiny("rt_detr").eval()
    save_model(model, tmp_path / "m.safetensors")
    loaded, meta = load_model(tmp_path / "m.safetensors")
    images, mask, _ = _batch()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(images, mask)["pred_logits"], loaded(images, mask)["pred_logits"])
    model.hf.save_pretrained(tmp_path / "folder")
    cfg = get_config(f"hf:{tmp_path / 'folder'}")
    assert cfg.family == "rt_detr" and cfg.source == str(tmp_path / "folder")
    from_folder = build_model(f"hf:{tmp_path / 'folder'}", input_size=SIZE).eval()
    with torch.no_grad():
        assert torch.allclose(from_folder(images, mask)["pred_logits"], model(images, mask)["pred_logits"], atol=1e-6)


def test_bad_specs_are_refused_naming_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        get_config(f"hf:{tmp_path / 'nowhere'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert' is not a supported DETR family"):
        get_config(f"hf:{tmp_path / 'bad'}")
    with pytest.raises(ValueError, match="unknown model override 'nope'"):
        build_model(tiny_name("rt_detr"), nope=1)
    model = _tiny("rt_detr")
    from kd_detr.models import DetectorRequest

    with pytest.raises(ValueError, match="no dense attention maps"):
        model(*_batch()[:2], request=DetectorRequest(attention=True))


def test_a_nested_config_field_is_overridden_by_its_dotted_path():
    """``--model-opt backbone_config.hidden_sizes=[...]`` reaches the backbone the model is built with; a
    dotted path that does not exist is refused naming the sub-config's keys (a typo never builds a default)."""
    model = build_model(tiny_name("rt_detr"), num_classes=4, **{"backbone_config.hidden_sizes": [8, 16, 24, 40],
                                                                 "encoder_in_channels": [16, 24, 40]})
    assert model.config.hf_config["backbone_config"]["hidden_sizes"] == [8, 16, 24, 40]
    assert model.hf.config.backbone_config.hidden_sizes == [8, 16, 24, 40]
    # the last backbone stage really has 40 channels
    assert any(p.shape[0] == 40 for n, p in model.named_parameters() if "backbone" in n)
    # the base config is untouched
    assert get_config(tiny_name("rt_detr")).hf_config["backbone_config"]["hidden_sizes"] == [8, 16, 32, 32]
    with pytest.raises(ValueError, match=r"backbone_config has no key 'hidden_size'.*hidden_sizes"):
        build_model(tiny_name("rt_detr"), **{"backbone_config.hidden_size": [8]})
    with pytest.raises(ValueError, match="unknown model override 'nope.x'"):
        build_model(tiny_name("rt_detr"), **{"nope.x": 1})


def test_onnx_parity_of_an_rt_detr_student(tmp_path):
    """RT-DETR (fixed-size family: each image's region resized in the graph) exports to ONNX and runs in
    onnxruntime with the same outputs (1e-4) at the traced size and another batch and image size."""
    pytest.importorskip("onnxruntime")
    from kd_detr.runs.onnx_export import check_onnx, export_onnx

    torch.manual_seed(0)
    model = build_model(tiny_name("rt_detr"), num_classes=4, num_queries=8, input_size=128).eval()
    # transformers' RT-DETR init zeroes parts of the encoder-to-decoder path, so every encoder token gets the
    # same score and top-k query selection breaks the tie arbitrarily (differently in onnxruntime); a trained
    # model's scores differ, as they do after this perturbation
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    images, mask, _ = _batch()
    with torch.no_grad():
        scale = float(model(images, mask)["pred_logits"].abs().max())
    assert scale > 1.0  # the perturbed weights give large logits: the tolerance is relative to them
    tol = 1e-4 * scale
    path = export_onnx(model, tmp_path / "rt.onnx", height=128, width=128, atol=tol)
    assert check_onnx(path, model, [(images, mask)], atol=tol) <= tol


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_any_padded_batch_size_trains(family):
    """kd-detr's batches are padded to the largest image, any size: a family whose backbone needs whole windows
    (LW-DETR, RF-DETR) gets the batch padded further under the mask, and every family trains on it."""
    model = _tiny(family).train()
    images, mask, targets = _batch()
    images, mask = images[..., :50, :42], mask[..., :50, :42]  # 50 x 42: no multiple of any window grid
    out = model(images, mask, targets=targets)
    assert torch.isfinite(out["family_loss"]) and out.logits.shape[1:3] == (2, 8)


def test_windowed_backbones_pad_under_the_mask():
    from kd_detr.models.hf.adapter import _pad_to_multiple

    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float).view(2, 3, 5, 7)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, :, 6:] = True
    px, pm = _pad_to_multiple(x, mask, 4)
    assert px.shape == (2, 3, 8, 8) and torch.equal(px[..., :5, :7], x) and px[..., 5:, :].abs().sum() == 0
    assert torch.equal(pm[:, :5, :7], mask) and pm[:, 5:].all() and pm[:, :, 7:].all()
    same, none = _pad_to_multiple(x[..., :4, :4], None, 4)
    assert none is None and torch.equal(same, x[..., :4, :4])
    for family in ("lw_detr", "rf_detr"):
        if family in FAMILY_KEYS:
            model = _tiny(family)
            m = FAMILIES[family].pad_multiple(model.hf.config)
            pv, pmask = model.pixels(*_batch()[:2])
            assert m == 32 and pv.shape[-1] % m == 0 and pv.shape[-2] % m == 0 and pmask.shape == pv.shape[:1] + pv.shape[2:]
