"""Official state-dict import/export and kd-detr safetensors model files."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from kd_detr.models import DetectorRequest
from kd_detr.models import (
    build_model,
    convert_official,
    load_model,
    load_official_state_dict,
    official_state_dict,
    read_official_checkpoint,
    save_model,
)
from kd_detr.models import checkpoint as ckpt

TINY = dict(d_model=64, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=96, num_queries=10)


def _images():
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 64, 96)
    mask = torch.ones(2, 64, 96, dtype=torch.bool)
    images[0], mask[0] = torch.randn(3, 64, 96, generator=g), False
    images[1, :, :40, :70], mask[1, :40, :70] = torch.randn(3, 40, 70, generator=g), False
    return images, mask


def _random_official(num_classes=6, seed=0, **kw):
    """A random model of the tiny architecture and its official-format state dict."""
    torch.manual_seed(seed)
    model = build_model("cond_detr_r10_tiny", num_classes=num_classes, backbone_norm="frozen_bn",
                        **{**TINY, **kw}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # make every tensor non-trivial (incl. zero-initialised box layer, BN stats)
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model, official_state_dict(model)


def _outputs(model):
    images, mask = _images()
    with torch.no_grad():
        return model.eval()(images, mask, request=DetectorRequest(attention=True))


# ---------------------------------------------------------------- official layout


@pytest.mark.parametrize("name,count,backbone_count", [("cond_detr_r50", 564, 265), ("cond_detr_r101", 819, 520),
                                                       ("cond_detr_r50_dc5", 564, 265)])
def test_official_key_counts(name, count, backbone_count):
    with torch.device("meta"):
        sd = official_state_dict(build_model(name))
    assert len(sd) == count
    assert sum(k.startswith("backbone.0.body.") for k in sd) == backbone_count
    assert not any("num_batches_tracked" in k for k in sd)
    assert {k.split(".")[0] for k in sd} == {"backbone", "input_proj", "query_embed", "transformer",
                                              "class_embed", "bbox_embed"}
    assert [k for k in sd if "ca_qpos_proj" in k] == ["transformer.decoder.layers.0.ca_qpos_proj.weight",
                                                      "transformer.decoder.layers.0.ca_qpos_proj.bias"]
    assert not any("in_proj" in k for k in sd if k.startswith("transformer.decoder"))


def test_official_representative_keys_and_shapes():
    with torch.device("meta"):
        sd = official_state_dict(build_model("cond_detr_r50"))
        sd101 = official_state_dict(build_model("cond_detr_r101"))
    expected = {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.bn1.running_var": (64,),
        "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.0.body.layer1.0.downsample.1.running_mean": (256,),
        "backbone.0.body.layer3.5.conv2.weight": (256, 256, 3, 3),
        "backbone.0.body.layer4.2.bn3.weight": (2048,),
        "input_proj.weight": (256, 2048, 1, 1),
        "input_proj.bias": (256,),
        "query_embed.weight": (300, 256),
        "transformer.encoder.layers.0.self_attn.in_proj_weight": (768, 256),
        "transformer.encoder.layers.0.self_attn.in_proj_bias": (768,),
        "transformer.encoder.layers.0.self_attn.out_proj.weight": (256, 256),
        "transformer.encoder.layers.0.linear1.weight": (2048, 256),
        "transformer.encoder.layers.0.norm2.bias": (256,),
        "transformer.decoder.layers.0.sa_qcontent_proj.weight": (256, 256),
        "transformer.decoder.layers.0.sa_qpos_proj.weight": (256, 256),
        "transformer.decoder.layers.0.sa_kcontent_proj.weight": (256, 256),
        "transformer.decoder.layers.0.sa_kpos_proj.weight": (256, 256),
        "transformer.decoder.layers.0.sa_v_proj.weight": (256, 256),
        "transformer.decoder.layers.0.self_attn.out_proj.weight": (256, 256),
        "transformer.decoder.layers.0.ca_qcontent_proj.weight": (256, 256),
        "transformer.decoder.layers.0.ca_kcontent_proj.weight": (256, 256),
        "transformer.decoder.layers.0.ca_kpos_proj.weight": (256, 256),
        "transformer.decoder.layers.0.ca_v_proj.weight": (256, 256),
        "transformer.decoder.layers.0.ca_qpos_sine_proj.weight": (256, 256),
        "transformer.decoder.layers.0.ca_qpos_proj.weight": (256, 256),
        "transformer.decoder.layers.3.cross_attn.out_proj.weight": (256, 256),
        "transformer.decoder.layers.5.norm3.weight": (256,),
        "transformer.decoder.norm.weight": (256,),
        "transformer.decoder.query_scale.layers.0.weight": (256, 256),
        "transformer.decoder.query_scale.layers.1.weight": (256, 256),
        "transformer.decoder.ref_point_head.layers.0.weight": (256, 256),
        "transformer.decoder.ref_point_head.layers.1.weight": (2, 256),
        "class_embed.weight": (91, 256),
        "class_embed.bias": (91,),
        "bbox_embed.layers.0.weight": (256, 256),
        "bbox_embed.layers.1.weight": (256, 256),
        "bbox_embed.layers.2.weight": (4, 256),
        "bbox_embed.layers.2.bias": (4,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in sd
    assert "backbone.0.body.layer3.22.conv2.weight" in sd101 and "backbone.0.body.layer3.23.conv1.weight" not in sd101
    assert "backbone.0.body.layer3.6.conv2.weight" not in sd


# ---------------------------------------------------------------- round trips


def test_official_pth_convert_safetensors_roundtrip(tmp_path):
    model, sd = _random_official()
    ref = _outputs(model)
    pth = tmp_path / "official.pth"
    # official training checkpoints also carry optimizer state and an argparse Namespace
    torch.save({"model": sd, "epoch": 49, "args": argparse.Namespace(lr=1e-4)}, pth)
    out = tmp_path / "converted.safetensors"
    label_map = {"num_classes": 6, "index_to_category": {"1": 1, "2": 3}}
    converted = convert_official(pth, "cond_detr_r10_tiny", None, out, label_map=label_map,
                                 backbone_norm="frozen_bn", **TINY)
    assert converted.config.num_classes == 6  # inferred from the file
    loaded, meta = load_model(out)
    assert meta["model_name"] == "cond_detr_r10_tiny" and meta["num_classes"] == 6
    assert meta["config"] == converted.config.to_dict() and meta["format_version"] == 1
    assert meta["label_map"] == label_map
    assert meta["extra_metadata"]["converted_from"] == "official.pth"
    assert len(meta["extra_metadata"]["source_sha256"]) == 64
    got = _outputs(loaded)
    for k in ("pred_logits", "pred_boxes", "hs", "self_attn", "cross_attn"):
        assert torch.equal(got[k], ref[k]), k
    # and back to official names, unchanged
    back = official_state_dict(loaded)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # bare state dicts are accepted too
    torch.save(sd, tmp_path / "bare.pth")
    assert set(read_official_checkpoint(tmp_path / "bare.pth")) == set(sd)


def test_save_official_checkpoint_roundtrip(tmp_path):
    model, sd = _random_official()
    path = tmp_path / "student.pth"
    ckpt.save_official_checkpoint(model, path)
    data = torch.load(path, weights_only=True)
    assert set(data) == {"model"} and list(data["model"]) == list(sd)
    fresh = build_model("cond_detr_r10_tiny", num_classes=6, backbone_norm="frozen_bn", **TINY)
    load_official_state_dict(fresh, data)
    assert torch.equal(_outputs(fresh)["pred_boxes"], _outputs(model)["pred_boxes"])


def test_official_weights_into_trainable_bn_model(tmp_path):
    model, sd = _random_official()
    bn = build_model("cond_detr_r10_tiny", num_classes=6, backbone_norm="bn", **TINY)
    load_official_state_dict(bn, sd)  # num_batches_tracked filled
    assert int(bn.backbone.body.bn1.num_batches_tracked) == 0
    # eval-mode BN with the same statistics computes the same function (BN eps = frozen eps = 1e-5)
    assert (_outputs(bn)["pred_logits"] - _outputs(model)["pred_logits"]).abs().max() < 1e-4
    back = official_state_dict(bn)
    assert list(back) == list(sd)
    # our own format keeps the BN counters and statistics after a training step
    bn.train()
    images, mask = _images()
    bn(images, mask)["pred_boxes"].sum().backward()
    path = tmp_path / "bn.safetensors"
    save_model(bn, path)
    loaded, _ = load_model(path)
    for k, v in bn.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert int(loaded.backbone.body.layer2[0].bn1.num_batches_tracked) == 1


def test_gn_model_refuses_official_weights():
    _, sd = _random_official()
    gn = build_model("cond_detr_r10_tiny", num_classes=6, backbone_norm="gn", **TINY)
    with pytest.raises(ValueError, match="gn"):
        load_official_state_dict(gn, sd)
    with pytest.raises(ValueError, match="gn"):
        official_state_dict(gn)


# ---------------------------------------------------------------- strictness


def test_strict_official_loading_names_offending_keys():
    _, sd = _random_official()
    def fresh(**kw):
        return build_model("cond_detr_r10_tiny", backbone_norm="frozen_bn", **{**TINY, "num_classes": 6, **kw})

    missing = dict(sd)
    del missing["transformer.decoder.layers.0.ca_qpos_proj.weight"]
    del missing["backbone.0.body.layer1.0.conv1.weight"]
    with pytest.raises(ValueError) as e:
        load_official_state_dict(fresh(), missing)
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in str(e.value)
    assert "backbone.0.body.layer1.0.conv1.weight" in str(e.value) and "missing" in str(e.value)

    extra = dict(sd)
    extra["transformer.decoder.layers.1.ca_qpos_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError) as e:
        load_official_state_dict(fresh(), extra)
    assert "unexpected" in str(e.value) and "transformer.decoder.layers.1.ca_qpos_proj.weight" in str(e.value)

    with pytest.raises(ValueError) as e:
        load_official_state_dict(fresh(num_classes=91), sd)
    msg = str(e.value)
    assert "class_embed.weight" in msg and "class_embed.bias" in msg and "num_classes" in msg

    with pytest.raises(ValueError) as e:
        load_official_state_dict(fresh(dec_layers=2), sd)  # checkpoint has 3 decoder layers
    assert "transformer.decoder.layers.2.sa_qcontent_proj.weight" in str(e.value) and "(34)" in str(e.value)

    # a failed load leaves the model untouched
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        load_official_state_dict(model, missing)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- files


def test_atomic_save_leaves_no_temp_files(tmp_path):
    model, _ = _random_official()
    path = tmp_path / "m.safetensors"
    save_model(model, path, extra_metadata={"note": "x"})
    save_model(model, path)  # overwrite in place
    assert os.listdir(tmp_path) == ["m.safetensors"]
    _, meta = load_model(path)
    assert meta["extra_metadata"] == {} and meta["label_map"] is None


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model, _ = _random_official()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    good = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temp file, no partial new file
    assert path.read_bytes() == good  # previous file intact


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_model(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*not a kd-detr model file"):
        load_model(foreign)
    pth = tmp_path / "weights.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, pth)
    with pytest.raises(ValueError, match="weights.pth"):
        load_model(pth)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="junk.pth"):
        read_official_checkpoint(junk)
    notsd = tmp_path / "notsd.pth"
    torch.save({"epoch": 3}, notsd)
    with pytest.raises(ValueError, match="notsd.pth"):
        read_official_checkpoint(notsd)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        convert_official(tmp_path / "absent.pth", "cond_detr_r50", 91, tmp_path / "o.safetensors")


def test_tampered_model_file_is_rejected(tmp_path):
    model, _ = _random_official()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["dec_layers"] = 2
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="m.safetensors.*unexpected"):
        load_model(path)


# ---------------------------------------------------------------- every transformers family (tied weights)


def _hf_names():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    from kd_detr.models.hf.registry import list_hf_models

    return sorted(list_hf_models())


def _randomised_hf(name):
    """A tiny transformers-family model with every parameter perturbed (tied ones once: they are one tensor)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # parameters() yields a tied parameter once
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", _hf_names())
def test_every_family_round_trips_bit_exact_and_keeps_its_ties(name, tmp_path):
    from safetensors import safe_open

    model = _randomised_hf(name)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded, meta = load_model(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    tied = ckpt.tied_names(a)
    assert meta["tied"] == tied and meta["format_version"] == (2 if tied else 1)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(a) - set(tied)  # each tied tensor stored once
    # the loaded model ties the same names as a freshly built one: one Parameter object each
    fresh = build_model(name, num_classes=3).state_dict(keep_vars=True)
    params = loaded.state_dict(keep_vars=True)
    assert ckpt.tied_names(fresh) == ckpt.tied_names(params) == tied
    assert all(params[alias] is params[first] for alias, first in tied.items())
    # 128 px: the two-stage families (LW-DETR) need at least as many encoder tokens as queries
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    with torch.no_grad():
        ref, got = model(images, mask), loaded.eval()(images, mask)
    assert torch.equal(ref["pred_logits"], got["pred_logits"]) and torch.equal(ref["pred_boxes"], got["pred_boxes"])


@pytest.mark.skipif("hf_d_fine_tiny" not in _hf_names(), reason="transformers without D-FINE")
def test_tied_names_stored_apart_load_only_when_equal(tmp_path):
    """A file holding every name (format 1, written by safetensors without ties) loads when the tied names
    carry one value, ties kept; different values are refused, naming the pair, instead of one silently
    replacing the other."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _randomised_hf("hf_d_fine_tiny")
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tied = json.loads(meta.pop("tied"))
    assert tied
    for alias, first in tied.items():
        tensors[alias] = tensors[first].clone()
    apart = tmp_path / "apart.safetensors"
    save_file(tensors, str(apart), metadata={**meta, "format_version": "1"})
    loaded, _ = load_model(apart)
    params = loaded.state_dict(keep_vars=True)
    assert all(params[alias] is params[first] for alias, first in tied.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    alias = sorted(tied)[0]
    tensors[alias] = tensors[alias] + 1
    save_file(tensors, str(apart), metadata={**meta, "format_version": "1"})
    with pytest.raises(ValueError, match=rf"apart.safetensors holds different values for names the model ties.*{alias}"):
        load_model(apart)
    # corrupt 'tied' metadata (a name both stored and tied) is refused by name
    save_file(tensors, str(apart), metadata={**meta, "tied": json.dumps(tied), "format_version": "2"})
    with pytest.raises(ValueError, match="apart.safetensors: corrupt 'tied' metadata"):
        load_model(apart)
