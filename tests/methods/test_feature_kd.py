"""Feature distillation on the encoder output (``[feature_kd]``): MSE and CWD computed by hand on tiny maps, zero
for identical features through an identity projector, padding excluded, invariance to a channel permutation (both
definitions are free of channel order), the projector trained, the level matching by stride, the teacher features
through the wire, the cache codec and batch stacking, refusals, and one pipeline: an RT-DETR student distilled from
a kd-detr Conditional DETR teacher (cross family, other widths and strides) in process, from a ``--features``
cache and through Ray with the same losses."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from kd_detr.engine.recipe import load_recipe
from kd_detr.methods.feature_kd import (FeatureDistillation, FeatureKdConfig, feature_cwd, feature_mse,
                                        match_levels)
from kd_detr.models import DetectorRequest
from kd_detr.teacher import TeacherOutputs
from kd_detr.teacher.cache import StoreConfig, decode_batch, encode_batch
from kd_detr.teacher.outputs import own_grids
from tests.support.runs import read_log
from tests.support.tiny import tiny_batch, tiny_detector

STUDENT = dict(num_queries=6, d_model=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64)


def _teacher(features, strides, grids=None, batch=None):
    """Teacher outputs carrying only what feature KD reads (``features`` ``[B,C,h,w]`` per level)."""
    b = features[0].shape[0] if batch is None else batch
    return TeacherOutputs(logits=torch.zeros(1, b, 2, 3), boxes=torch.rand(1, b, 2, 4), self_attn=None,
                          cross_attn=None, query_embed=torch.zeros(2, 8), reference_points=torch.zeros(b, 2, 2),
                          feature_size=(1, 1), features=list(features), feature_strides=tuple(strides),
                          feature_grids=grids)


def _outputs(features, strides, masks=None):
    masks = masks or [torch.zeros(f.shape[0], *f.shape[-2:], dtype=torch.bool) for f in features]
    return {"features": list(features), "feature_strides": tuple(strides), "feature_masks": list(masks)}


class _Cfg:  # a detector config as feature KD reads it
    def __init__(self, levels, channels, name="toy"):
        self.feature_levels, self.feature_channels, self.name = levels, channels, name
        self.supports = frozenset({"features"})


def _method(student_width=4, teacher_width=4, levels=1, **cfg):
    return FeatureDistillation(FeatureKdConfig(enabled=True, **cfg), _Cfg(levels, student_width),
                               None, _Cfg(1, teacher_width))


# ------------------------------------------------------------------------------------------- the definitions

def test_mse_by_hand_and_only_inside_each_images_grid():
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.zeros(1, 2, 2, 2)
    assert feature_mse(s, [[2, 2]], t, [[2, 2]]).item() == pytest.approx((1 + 4 + 9 + 16) / 8)
    # image's own region: the first column only (the second is padding)
    assert feature_mse(s, [[2, 1]], t, [[2, 1]]).item() == pytest.approx((1 + 9) / 4)


def test_cwd_by_hand_with_temperature():
    s = torch.zeros(1, 1, 1, 2)                   # uniform student: p_s = [1/2, 1/2]
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2)  # p_t = [3/4, 1/4] at tau = 1
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert feature_cwd(s, [[1, 2]], t, [[1, 2]], tau=1.0).item() == pytest.approx(kl, rel=1e-6)
    p = math.sqrt(3) / (1 + math.sqrt(3))          # tau = 2: softmax([ln 3 / 2, 0])
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert feature_cwd(s, [[1, 2]], t, [[1, 2]], tau=2.0).item() == pytest.approx(4 * kl2, rel=1e-6)
    # averaged over channels and images: a second, identical channel and image change nothing
    s2, t2 = s.expand(2, 2, 1, 2), t.expand(2, 2, 1, 2)
    assert feature_cwd(s2, [[1, 2]] * 2, t2, [[1, 2]] * 2).item() == pytest.approx(kl, rel=1e-6)


def test_level_matching_by_nearest_stride():
    assert match_levels([8, 16, 32], [32]) == [0, 0, 0]
    assert match_levels([8, 16, 32, 64], [8, 16, 32]) == [0, 1, 2, 2]
    assert match_levels([16], [8, 32]) == [0]  # a tie goes to the finer teacher level


@pytest.mark.parametrize("loss", ["mse", "cwd"])
def test_identical_teacher_and_student_features_give_zero(loss):
    student = tiny_detector(0, **STUDENT).eval()
    images, mask, targets = tiny_batch()
    out = student(images, mask, request=DetectorRequest(features=True))
    grids = own_grids(out["feature_masks"])
    teacher = _teacher([f.detach() for f in out["features"]], out["feature_strides"], grids)
    method = FeatureDistillation(FeatureKdConfig(enabled=True, loss=loss), student.config, None, student.config)
    assert isinstance(method.projectors["p0"], torch.nn.Identity) and method.trainable_modules() == {}
    terms = method(student, out, targets, 3.0, teacher)
    assert list(terms) == [f"feature_kd.{loss}.p0"]
    assert terms[f"feature_kd.{loss}.p0"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["mse", "cwd"])
def test_padding_does_not_count_and_channel_order_does_not_matter(loss):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    masks = torch.zeros(2, 3, 5, dtype=torch.bool)
    masks[1, :, 3:] = True   # image 1: 3x3 of the 3x5 map
    grids = torch.tensor([[[3, 5]], [[3, 3]]])
    method = _method(loss=loss)
    base = method(None, _outputs([s], [32], [masks]), [], 1.0, _teacher([t], [32], grids))[f"feature_kd.{loss}.p0"]
    s2, t2 = s.clone(), t.clone()
    s2[1, :, :, 3:] = 100.0   # the student's padding
    t2[1, :, :, 3:] = -50.0   # and the teacher's zeros outside image 1's grid
    padded = method(None, _outputs([s2], [32], [masks]), [], 1.0, _teacher([t2], [32], grids))[f"feature_kd.{loss}.p0"]
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)
    perm = torch.randperm(4, generator=g)
    permuted = method(None, _outputs([s[:, perm]], [32], [masks]), [], 1.0,
                      _teacher([t[:, perm]], [32], grids))[f"feature_kd.{loss}.p0"]
    assert permuted.item() == pytest.approx(base.item(), rel=1e-6)
    assert base.item() > 0


def test_a_teacher_level_of_another_stride_is_resized_to_the_students_grid():
    method = _method(levels=3, loss="mse")
    constant = torch.full((1, 4, 2, 2), 0.7)   # teacher: one stride-32 level
    student = [torch.full((1, 4, 8, 8), 0.7), torch.full((1, 4, 4, 4), 0.7), torch.full((1, 4, 2, 2), 0.7)]
    terms = method(None, _outputs(student, [8, 16, 32]), [], 1.0, _teacher([constant], [32]))
    assert sorted(terms) == ["feature_kd.mse.p0", "feature_kd.mse.p1", "feature_kd.mse.p2"]
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in terms.values())
    # a non-constant teacher: the stride-16 student level is compared with the bilinear upsampling
    t = torch.arange(16.0).view(1, 4, 2, 2)
    up = torch.nn.functional.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
    terms = method(None, _outputs([torch.zeros(1, 4, 8, 8), up, torch.zeros(1, 4, 2, 2)], [8, 16, 32]), [], 1.0,
                   _teacher([t], [32]))
    assert terms["feature_kd.mse.p1"].item() == pytest.approx(0.0, abs=1e-10)


def test_the_projector_maps_student_width_to_teacher_width_and_learns():
    method = FeatureDistillation(FeatureKdConfig(enabled=True, levels=[1], weight=0.5), _Cfg(2, 3), None, _Cfg(1, 5))
    assert list(method.projectors) == ["p1"] and method.projectors["p1"].weight.shape == (5, 3, 1, 1)
    assert method.weight_dict == {"feature_kd.mse.p1": 0.5}
    assert list(method.trainable_modules()) == ["objective.feature_kd"]
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2, requires_grad=True)]
    terms = method(None, _outputs(s, [16, 32]), [], 1.0, _teacher([torch.randn(2, 5, 2, 2)], [32]))
    terms["feature_kd.mse.p1"].backward()
    grad = method.projectors["p1"].weight.grad
    assert grad is not None and grad.abs().sum() > 0 and s[1].grad.abs().sum() > 0


def test_refusals_name_the_problem():
    method = _method()
    out = _outputs([torch.randn(1, 4, 2, 2)], [32])
    with pytest.raises(ValueError, match=r"\[feature_kd\] needs the teacher's outputs"):
        method(None, out, [], 1.0, None)
    no_features = dataclasses.replace(_teacher([torch.randn(1, 4, 2, 2)], [32]), features=None, feature_strides=None)
    with pytest.raises(ValueError, match="built without --features"):
        method(None, out, [], 1.0, no_features)
    with pytest.raises(ValueError, match="has 3 channels, the projector gives 4"):
        method(None, out, [], 1.0, _teacher([torch.randn(1, 3, 2, 2)], [32]))
    with pytest.raises(ValueError, match=r"levels \[2\]: the student toy has 1 encoder output level"):
        FeatureDistillation(FeatureKdConfig(enabled=True, levels=[2]), _Cfg(1, 4), None, _Cfg(1, 4))
    teacher = _Cfg(1, 4, name="plain")
    teacher.supports = frozenset()
    with pytest.raises(ValueError, match="the teacher plain does not give"):
        FeatureDistillation.build(FeatureKdConfig(enabled=True), _Cfg(1, 4), None, teacher)
    with pytest.raises(Exception, match="loss"):
        load_recipe("feature_kd", ["feature_kd.loss='l1'"])
    with pytest.raises(Exception, match="tau"):
        load_recipe("feature_kd", ["feature_kd.tau=0"])


# ------------------------------------------------------------------------------ teacher features: wire, cache

def test_teacher_features_through_the_wire_the_cache_codec_and_batch_stacking():
    teacher = tiny_detector(1).eval()
    from kd_detr.teacher import InProcessTeacher

    images, mask, _ = tiny_batch()
    runner = InProcessTeacher(teacher, attn="none", features=True)
    views = [runner.view(images[0]), runner.view(images[1, :, :, :48])]  # image 1 is 64x48 (its padding cut)
    assert [tuple(v.features[0].shape) for v in views] == [(1, 128, 2, 2), (1, 128, 2, 2)]
    batch = runner(images, mask)
    assert batch.feature_strides == (32,) and batch.feature_grids.tolist() == [[[2, 2]], [[2, 2]]]
    # the wire (Ray) gives back the same tensors
    back = TeacherOutputs.from_wire(batch.to_wire(), batch.query_embed)
    assert torch.equal(back.features[0], batch.features[0]) and back.feature_strides == (32,)
    assert torch.equal(back.feature_grids, batch.feature_grids)
    # a float32 cache entry per view decodes exactly; stacking views of different grids embeds them top-left
    cfg = StoreConfig.parse("none", dtype="float32", classes="dense", features=True)
    small = dataclasses.replace(views[1], features=[views[1].features[0][..., :1, :]], feature_grids=None)
    decoded = []
    for i, v in enumerate([views[0], small]):
        v.gt_assignment = torch.full((1, v.num_queries), -1)
        decoded.append(decode_batch(encode_batch(v, torch.tensor([i]), cfg), cfg, v.query_embed))
    assert torch.equal(decoded[0].features[0], views[0].features[0])
    stacked = TeacherOutputs.stack_views(decoded)
    assert stacked.features[0].shape == (2, 128, 2, 2) and stacked.feature_grids.tolist() == [[[2, 2]], [[1, 2]]]
    assert torch.equal(stacked.features[0][1, :, :1], small.features[0][0]) and not stacked.features[0][1, :, 1:].any()
    # a cache without --features stores and decodes none (the keys of older caches)
    plain = StoreConfig.parse("none", dtype="float32", classes="dense")
    assert "features" not in encode_batch(views[0], torch.tensor([0]), plain)
    assert decode_batch(encode_batch(views[0], torch.tensor([0]), plain), plain, views[0].query_embed).features is None
    assert StoreConfig.from_dict({"attention": "none"}).features is False


# ---------------------------------------------------------------------- one pipeline: in process, cache, Ray

@pytest.fixture(scope="module")
def pipeline(synth_data, tmp_path_factory, ray_session):
    """A kd-detr Conditional DETR teacher checkpoint (d = 128, stride 32) and its ``kd-detr cache --features``
    cache (float32, one view per image)."""
    from kd_detr.data import DataSpec
    from kd_detr.models import build_model, save_model
    from click.testing import CliRunner

    from kd_detr.cli import main

    root = tmp_path_factory.mktemp("feature_kd")
    data = DataSpec(str(synth_data), image_size=64)
    dataset = data.train_set()
    torch.manual_seed(7)
    teacher = build_model("cond_detr_r10_tiny", num_classes=dataset.label_map.num_classes, num_queries=10,
                          dim_feedforward=128)
    path = root / "teacher.safetensors"
    save_model(teacher, path, label_map=dataset.label_map, extra_metadata={"image_size": 64})
    cache = root / "cache"
    res = CliRunner().invoke(main, ["cache", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(path),
                                    "--data", str(synth_data), "--image-size", "64", "--out", str(cache), "--views", "1",
                                    "--actors", "1", "--images-per-shard", "8", "--dtype", "float32", "--attention",
                                    "none", "--classes", "dense", "--features", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.loads((cache / "manifest.json").read_text())["store"]["features"] is True
    return {"data": data, "checkpoint": str(path), "cache": str(cache), "root": root}


def _values(tree, key):
    """Every value of ``key`` in a nested JSON tree."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [x for v in tree.values() for x in _values(v, key)]
    if isinstance(tree, list):
        return [x for v in tree for x in _values(v, key)]
    return []


def _run(pipeline, out, recipe="feature_kd", extra=(), **source):
    from kd_detr.runs.assemble import TeacherSourceSpec, assemble_run

    spec = TeacherSourceSpec(teacher="cond_detr_r10_tiny", checkpoint=pipeline["checkpoint"], **source)
    run = assemble_run("hf_rt_detr_tiny", recipe, pipeline["data"], spec, str(out),
                       student_overrides={"num_queries": 10},
                       overrides=["train.batch_size=2", "train.max_iters=2", "train.log_every=1",
                                  "train.eval_every_epochs=0", "train.lr_drop=1000", "train.checkpoint_every=2",
                                  *extra],
                       train_options={"num_workers": 0, "progress": False}, views=1)
    run.run()
    return [r for r in read_log(out) if "loss" in r]


# the new methods together: D3ETR's cross-family terms, feature KD and Teach-DETR (the random teacher's 5 best boxes)
COMBINED = ("d3etr_cross_family_feature", ("teach_detr.enabled=true", "teach_detr.score_threshold=0.0",
                                           "teach_detr.max_targets=5"))


def test_rt_detr_student_from_a_conditional_detr_teacher_in_process_cache_and_ray(pipeline, tmp_path):
    """Cross family (d = 128 at stride 32 -> RT-DETR's three 32-wide levels at strides 8/16/32): every level's
    term, the same losses from the three teacher sources (feature KD with Teach-DETR and D3ETR's cross-family
    terms beside it), and the projectors trained and checkpointed."""
    recipe, extra = COMBINED
    inproc = _run(pipeline, tmp_path / "inproc", recipe, extra)
    cached = _run(pipeline, tmp_path / "cached", recipe, extra, cache=pipeline["cache"])
    ray = _run(pipeline, tmp_path / "ray", recipe, extra, serve="ray")
    assert len(inproc) == len(cached) == len(ray) == 2
    assert inproc[0]["teach_detr.total"] > 0 and inproc[0]["distill.total"] > 0
    for key in ("loss", "feature_kd.total", "feature_kd.mse.p0", "feature_kd.mse.p1", "feature_kd.mse.p2",
                "teach_detr.total", "distill.total"):
        for i in range(2):
            a = inproc[i][key]
            assert cached[i][key] == pytest.approx(a, rel=1e-5, abs=1e-6), ("cache", i, key)
            assert ray[i][key] == pytest.approx(a, rel=1e-5, abs=1e-6), ("ray", i, key)
    assert inproc[0]["feature_kd.total"] > 0
    # under the family's preset (RT-DETR's: EMA on), as every method runs for a transformers student
    config = json.loads((tmp_path / "inproc" / "config.json").read_text())
    assert _values(config, "ema") and all(v is True for v in _values(config, "ema")), _values(config, "ema")
    # the projectors (32 -> 128 wide, one per RT-DETR level) are saved with the training state
    (state,) = (tmp_path / "inproc").rglob("iter_0000002.state.pth")
    extra = torch.load(state, map_location="cpu", weights_only=False)["extra"]["objective.feature_kd"]
    assert {k: tuple(v.shape) for k, v in extra.items() if k.endswith("weight")} == {
        f"projectors.p{i}.weight": (128, 32, 1, 1) for i in range(3)}


def test_a_cache_without_features_is_refused_naming_the_option(pipeline, tmp_path):
    """An existing cache (its manifest without the ``features`` field, as every cache built before it) loads as
    storing none, and a [feature_kd] run from it is refused at start, naming ``kd-detr cache --features``."""
    from kd_detr.teacher.cache import CacheReader

    old = tmp_path / "old_cache"
    shutil.copytree(pipeline["cache"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["store"]["features"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert CacheReader(old).store.features is False
    with pytest.raises(ValueError, match=r"stores no encoder feature maps.*kd-detr cache --features"):
        _run(pipeline, tmp_path / "run", cache=str(old))
    assert not (tmp_path / "run" / "log.jsonl").exists()
