"""The in-process teacher runs in float32 under the student's autocast (``--amp``): the same numbers as the Ray
and cached teachers, which run outside it."""

from __future__ import annotations

import pytest
import torch

from kd_detr.models import build_model, list_models
from kd_detr.teacher import InProcessTeacher

TEACHERS = ["cond_detr_r10_tiny"] + [n for n in ("hf_detr_tiny", "hf_rt_detr_tiny") if n in list_models()]


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_outputs_ignore_the_callers_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, num_queries=6)
    teacher = InProcessTeacher(model, attn="none")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True
    plain = teacher(images, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what --amp does to the student's step (CUDA: float16)
        amp = teacher(images, mask)
        raw = model.eval()(images[:1, :, :, :], mask[:1])  # the model itself does follow the autocast
    assert amp.logits.dtype == torch.float32 and torch.equal(amp.logits, plain.logits)
    assert torch.equal(amp.boxes, plain.boxes)
    assert raw["pred_logits"].dtype == torch.bfloat16 or not torch.equal(
        raw["pred_logits"].float(), plain.logits[-1, :1].float())


# ---------------------------------------------------------------- teacher.precision, the same in every source
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

from torch.utils.data import DataLoader  # noqa: E402

from kd_detr.data import CocoDetection, make_policy  # noqa: E402
from kd_detr.data.view_plan import PlanViews, ViewPlan  # noqa: E402
from kd_detr.models import save_model  # noqa: E402
from kd_detr.teacher import CacheSource, InProcessSource, RaySource  # noqa: E402
from kd_detr.teacher.loading import TeacherSpec, resolve_teacher  # noqa: E402
from tests.support.threads import torch_threads  # noqa: E402

FIELDS = ("logits", "boxes", "self_attn", "cross_attn", "reference_points", "query_embed")


def test_precision_changes_the_teachers_numbers_and_stays_float32():
    torch.manual_seed(0)
    model = build_model("cond_detr_r10_tiny", num_classes=3, num_queries=6)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    f32 = InProcessTeacher(model, attn="mean")(images, mask)
    bf16 = InProcessTeacher(model, attn="mean", precision="bfloat16")(images, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = InProcessTeacher(model, attn="mean", precision="bfloat16")(images, mask)
    assert bf16.logits.dtype == torch.float32 and bf16.self_attn.dtype == torch.float32
    assert not torch.equal(bf16.logits, f32.logits)  # the forward really ran in bfloat16
    assert torch.allclose(bf16.logits, f32.logits, atol=0.1)  # ... and still computes the same thing
    assert torch.equal(under_amp.logits, bf16.logits) and torch.equal(under_amp.cross_attn, bf16.cross_attn)


def test_an_unknown_precision_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--teacher-precision must be one of float32, bfloat16, float16"):
        TeacherSpec(name="t", model="cond_detr_r10_tiny", checkpoint="x.safetensors", precision="fp8")
    with pytest.raises(ValueError, match="teacher.precision must be one of"):
        InProcessTeacher(build_model("cond_detr_r10_tiny", num_classes=3), precision="half")




@pytest.fixture(scope="module")
def bf16_setup(synth_data, tmp_path_factory, ray_session):
    """A tiny teacher at ``bfloat16``, the training data on a 2-view plan, and a cache built from it."""
    from kd_detr.teacher.cache import StoreConfig
    from kd_detr.teacher.cache.build import build_cache

    ds = CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json",
                       transforms=make_policy(True, 64), label_map="contiguous", log_report=False)
    torch.manual_seed(7)
    model = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes, num_queries=10,
                        dim_feedforward=128)
    root = tmp_path_factory.mktemp("bf16")
    save_model(model, root / "teacher.safetensors", label_map=ds.label_map, extra_metadata={"image_size": 64})
    spec = resolve_teacher("cond_detr_r10_tiny", str(root / "teacher.safetensors"), precision="bfloat16")
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    build_cache(spec, ds, plan, root / "cache", StoreConfig.parse("full", dtype="float32", heads="per_head"),
                actors=1, images_per_shard=24, progress=False, image_size=64, num_threads=1)
    return spec, ds, plan, root / "cache"


def _loader(ds, plan, hook=None):
    """Views 0 then 1 of every image, 4 views a batch (the loader every source reads)."""
    keys = plan.all_views()
    return DataLoader(PlanViews(ds, plan, hook), batch_sampler=[keys[i:i + 4] for i in range(0, len(keys), 4)],
                      collate_fn=PlanViews.collate, num_workers=0)


@pytest.mark.parametrize("student_amp", [False, True], ids=["no_amp", "bf16_autocast"])
def test_three_sources_give_identical_outputs_at_bfloat16(bf16_setup, student_amp):
    """In process, Ray actors and the cache: the same teacher outputs at teacher.precision = bfloat16, whether
    or not the student's step autocasts (the CPU's bfloat16 here, CUDA's float16 under --amp)."""
    from kd_detr.teacher.ray_serving import RayTeacherServer

    spec, ds, plan, cache = bf16_setup
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if student_amp else contextlib.nullcontext()

    in_process = InProcessSource(spec)
    in_process.prepare(ds.label_map, ds.label_map.num_classes, 64)
    in_process.start("per_head", "cpu")
    cached = CacheSource(str(cache), spec)
    assert cached.view_plan(ds, ds.label_map, 64, None).fingerprint() == plan.fingerprint()
    hook = cached.loader_hook(plan, plan.all_views())
    ray_source = RaySource(spec, actors=1, prefetch=2)
    ray_source.prepare(ds.label_map, ds.label_map.num_classes, 64)
    # RaySource.start, with one torch thread per actor (bit-identity, see tests/support/threads.py)
    ray_source.server = RayTeacherServer(spec, "per_head", actors=1, prefetch=2, label_map=ds.label_map,
                                         num_threads=1)
    try:
        with torch_threads(1), amp:
            got = {"inprocess": list(in_process.batches(_loader(ds, plan), "cpu")),
                   "ray": list(ray_source.batches(_loader(ds, plan), "cpu")),
                   "cache": list(cached.batches(_loader(ds, plan, hook), "cpu"))}
    finally:
        ray_source.close()
    assert [len(b) for b in got.values()] == [12, 12, 12]
    for name in ("ray", "cache"):
        for b_ref, b in zip(got["inprocess"], got[name]):
            assert torch.equal(b.images, b_ref.images)
            for f in FIELDS:
                ref, have = getattr(b_ref.teacher, f), getattr(b.teacher, f)
                assert have.dtype == torch.float32, (name, f)
                assert torch.equal(have, ref), (name, f, (have - ref).abs().max())


def test_the_manifest_records_the_precision_and_a_run_asking_another_is_refused(bf16_setup):
    spec, ds, plan, cache = bf16_setup
    assert json.loads((cache / "manifest.json").read_text())["teacher"]["precision"] == "bfloat16"
    with pytest.raises(ValueError, match=r"teacher precision: the cache's teacher ran in bfloat16, this run asks "
                                         r"for float32 \(--teacher-precision\)"):
        CacheSource(str(cache), precision="float32").view_plan(ds, ds.label_map, 64, None)
    with pytest.raises(ValueError, match="ran in bfloat16, this run asks for float16"):
        CacheSource(str(cache), dataclasses.replace(spec, precision="float16")).view_plan(ds, ds.label_map, 64, None)
    assert CacheSource(str(cache), precision="bfloat16").view_plan(ds, ds.label_map, 64, None) is not None


def test_distill_from_a_cache_needs_its_precision_on_the_command_line(bf16_setup, synth_data, tmp_path):
    """``--teacher-precision`` reaches the cache source: without it a bfloat16 cache is refused in one line
    naming the option; with it the run starts (and trains one step)."""
    from click.testing import CliRunner

    from kd_detr.cli import main

    spec, ds, plan, cache = bf16_setup
    args = ["distill", "--teacher-cache", str(cache), "--student", "cond_detr_r10_tiny", "--student-opt",
            "num_queries=10", "--recipe", "d3etr", "--data", str(synth_data), "--image-size", "64",
            "--set", "train.max_iters=1", "--set", "train.batch_size=2", "--set", "train.eval_every_epochs=0",
            "--set", "train.eval_max_images=2", "--num-workers", "0", "--no-progress", "--device", "cpu"]
    refused = CliRunner().invoke(main, args + ["--output-dir", str(tmp_path / "a")])
    assert refused.exit_code != 0
    assert "teacher precision: the cache's teacher ran in bfloat16, this run asks for float32" in refused.output
    assert "--teacher-precision bfloat16" in refused.output and "Traceback" not in refused.output
    ok = CliRunner().invoke(main, args + ["--output-dir", str(tmp_path / "b"), "--teacher-precision", "bfloat16"])
    assert ok.exit_code == 0, ok.output
    record = json.loads((tmp_path / "b" / "config.json").read_text())
    assert record["config"]["teacher_serving"]["precision"] == "bfloat16"
