"""Distilling from a teacher cache or Ray-served teacher equals distilling from the in-process teacher
on the same view plan; mismatching or damaged caches are refused by name."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kd_detr.cli import main
from tests.support.runs import distill_args, read_log, save_teacher


def _cache_args(synth_data, teacher, out, *extra):
    return ["cache", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher), "--data", str(synth_data),
            "--image-size", "64", "--out", str(out), "--views", "2", "--actors", "1",
            "--images-per-shard", "8", "--no-progress", *extra]


def _losses(run):
    return [r for r in read_log(run) if "loss" in r]


@pytest.fixture(scope="module")
def cached(synth_data, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("cache")
    teacher = save_teacher(tmp, synth_data)
    runner = CliRunner()
    res = runner.invoke(main, _cache_args(synth_data, teacher, tmp / "full32", "--attention", "full",
                                          "--dtype", "float32", "--classes", "dense"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(main, _cache_args(synth_data, teacher, tmp / "topk", "--attention", "topk:8",
                                          "--classes", "dense"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    return tmp, teacher


def test_cached_distillation_equals_in_process(synth_data, cached):
    tmp, teacher = cached
    runner = CliRunner()
    res = runner.invoke(main, ["cache", "verify", str(tmp / "full32")])
    assert res.exit_code == 0 and "OK" in res.output
    info = runner.invoke(main, ["cache", "info", str(tmp / "full32")]).output
    assert "full" in info and "float32" in info
    common = ["--set", "train.max_iters=7", "--set", "distill.self_attn.per_head=false"]
    res = runner.invoke(main, distill_args(synth_data, tmp / "inproc", teacher, "--views", "2", *common))
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(main, distill_args(synth_data, tmp / "fromcache", teacher, "--teacher-cache",
                                           str(tmp / "full32"), *common))
    assert res.exit_code == 0, res.output + repr(res.exception)
    a, b = _losses(tmp / "inproc"), _losses(tmp / "fromcache")
    assert len(a) == len(b) == 7  # 6 batches per view: crosses into the second view
    for ra, rb in zip(a, b):
        for key in ("loss", "distill.total", "fixed_gt.total", "distill.adaptive.cross_attn.l1_unscaled"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["iteration"], key)
    record = json.loads((tmp / "fromcache" / "config.json").read_text())
    assert record["config"]["teacher_serving"]["mode"] == "cache"
    # the topk cache gives the same predictions terms and close attention terms
    res = runner.invoke(main, distill_args(synth_data, tmp / "fromtopk", teacher, "--teacher-cache",
                                           str(tmp / "topk"), *common))
    assert res.exit_code == 0, res.output + repr(res.exception)
    c = _losses(tmp / "fromtopk")
    assert c[0]["distill.adaptive.pred_cls"] == pytest.approx(a[0]["distill.adaptive.pred_cls"], rel=1e-2)


def test_ray_served_teacher_equals_in_process(synth_data, cached):
    tmp, teacher = cached
    runner = CliRunner()
    common = ["--views", "2", "--set", "train.max_iters=3"]
    res = runner.invoke(main, distill_args(synth_data, tmp / "ray", teacher, "--teacher-serve", "ray",
                                           "--teacher-actors", "2", *common))
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(main, distill_args(synth_data, tmp / "inproc3", teacher, *common))
    assert res.exit_code == 0, res.output + repr(res.exception)
    for ra, rb in zip(_losses(tmp / "inproc3"), _losses(tmp / "ray")):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["iteration"]


def test_mismatching_or_damaged_caches_are_refused(synth_data, cached, tmp_path):
    import shutil

    tmp, teacher = cached
    runner = CliRunner()
    # another teacher checkpoint than the one the cache was built with
    other = tmp_path / "other"
    other.mkdir()
    import torch

    from kd_detr.models import load_model, save_model
    model, meta = load_model(teacher)
    with torch.no_grad():
        model.class_embed.bias.add_(1.0)
    save_model(model, other / "teacher.safetensors", label_map=meta["label_map"], extra_metadata={"image_size": 64})
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "r1", other / "teacher.safetensors",
                                           "--teacher-cache", str(tmp / "full32"), "--set", "train.max_iters=1"))
    assert res.exit_code != 0 and "teacher:" in res.output
    # any batch size reads the cache (one entry per image view): here 3, which divides nothing of the build
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "r2", teacher, "--teacher-cache", str(tmp / "full32"),
                                           "--set", "train.batch_size=3", "--set", "train.max_iters=1"))
    assert res.exit_code == 0, res.output
    # other K
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "r3", teacher, "--teacher-cache", str(tmp / "full32"),
                                           "--views", "3", "--set", "train.max_iters=1"))
    assert res.exit_code != 0 and "views" in res.output
    # the recipe compares per-head maps but the topk cache holds head averages
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "r4", teacher, "--teacher-cache", str(tmp / "topk"),
                                           "--set", "distill.self_attn.per_head=true", "--set", "train.max_iters=1"))
    assert res.exit_code != 0 and "per_head" in res.output
    # a flipped byte in a shard: verify names it, and so does distill
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp / "topk", damaged)
    shard = sorted(damaged.glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = runner.invoke(main, ["cache", "verify", str(damaged)])
    assert res.exit_code != 0 and shard.name in res.output
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "r5", teacher, "--teacher-cache", str(damaged),
                                           "--set", "train.max_iters=12", "--num-workers", "0"))
    assert res.exit_code != 0 and shard.name in res.output


def test_verify_reports_a_stale_cache(cached, tmp_path):
    """A teacher checkpoint that changed after the build makes `cache verify` fail, naming the file."""
    import shutil

    tmp, teacher = cached
    stale = tmp_path / "stale"
    shutil.copytree(tmp / "topk", stale)
    moved = tmp_path / "teacher_copy.safetensors"
    shutil.copy(teacher, moved)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["teacher"]["checkpoint"] = str(moved)
    (stale / "manifest.json").write_text(json.dumps(manifest))
    ok = CliRunner().invoke(main, ["cache", "verify", str(stale), "--teacher-checkpoint", str(moved)])
    assert ok.exit_code == 0 and "OK, complete" in ok.output, ok.output
    moved.write_bytes(moved.read_bytes()[:-4] + b"\0\0\0\0")
    res = CliRunner().invoke(main, ["cache", "verify", str(stale), "--teacher-checkpoint", str(moved)])
    assert res.exit_code != 0 and "stale" in res.output and moved.name in res.output
    # not named: the recorded checkpoint is not read, and verify says so
    unnamed = CliRunner().invoke(main, ["cache", "verify", str(stale)])
    assert unnamed.exit_code == 0 and "not checked" in unnamed.output, unnamed.output
