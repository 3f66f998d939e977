"""Ray teacher actors: building the teacher cache (complete, exact, resumable, fault tolerant) and
serving teacher outputs ahead of the student.

All tests share one local Ray session (``ray_session``); the teacher is a tiny random-init model and
the data 24 images at 64 px, so each build takes a few seconds (mostly actor start-up).

Bit-identity with the in-process teacher needs the same torch intra-op thread count on both sides
(reductions split over other thread counts round differently), so actors and the reference use 1.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from kd_detr.data import CocoDetection, make_policy  # noqa: E402
from tests.support.threads import torch_threads  # noqa: E402
from kd_detr.data.view_plan import PlanViews, ViewPlan  # noqa: E402
from kd_detr.teacher import InProcessTeacher, TeacherOutputs  # noqa: E402
from kd_detr.teacher.loading import load_teacher, resolve_teacher  # noqa: E402
from kd_detr.models import build_model, save_model  # noqa: E402
from kd_detr.teacher.ray_serving import RayTeacherServer  # noqa: E402
from kd_detr.teacher.cache import CacheReader, StoreConfig, verify_cache  # noqa: E402
from kd_detr.teacher.cache.attention_codec import decode_attention, encode_attention  # noqa: E402
from kd_detr.teacher.cache.build import build_cache  # noqa: E402

FIELDS = ("logits", "boxes", "self_attn", "cross_attn", "reference_points", "query_embed")




def _dataset(synth_data):
    return CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json",
                         transforms=make_policy(True, 64), label_map="contiguous", log_report=False)


@pytest.fixture(scope="module")
def setup(synth_data, tmp_path_factory, ray_session):
    """``(spec, dataset, plan, reference)``: ``reference[(i, k)]`` the in-process teacher's outputs
    (per-head attention, 1 thread) on view ``k`` of image ``i`` alone."""
    ds = _dataset(synth_data)
    torch.manual_seed(7)
    teacher = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes, num_queries=10,
                          dim_feedforward=128)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(teacher, path, label_map=ds.label_map, extra_metadata={"image_size": 64})
    spec = resolve_teacher("cond_detr_r10_tiny", str(path))
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    model, _, _ = load_teacher(spec, ds.label_map)
    in_proc = InProcessTeacher(model, attn="per_head")
    views = PlanViews(ds, plan)
    with torch_threads(1):
        reference = {key: in_proc.view(views[key][0]) for key in plan.all_views()}
    return spec, ds, plan, reference


def _check_complete(root, ds, plan):
    """Every (image, view) is stored exactly once, each entry holds its image's index, cache verifies."""
    manifest = json.loads((root / "manifest.json").read_text())
    seen = collections.Counter((e["view"], i) for e in manifest["shards"] for i in e["image_ids"])
    want = {(k, i) for k in range(plan.num_views) for i in ds.image_ids}
    assert set(seen) == want and set(seen.values()) == {1}, seen
    reader = CacheReader(root)
    assert reader.keys() == sorted(plan.all_views())
    for i, k in plan.all_views():
        assert reader.entry(i, k)["image_index"].tolist() == [i]
    assert verify_cache(root) == []
    return reader


def _shard_state(root):
    """``file -> (sha256 of the bytes on disk, mtime_ns)`` of the shards listed in the manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    return {e["file"]: (hashlib.sha256((root / e["file"]).read_bytes()).hexdigest(),
                        (root / e["file"]).stat().st_mtime_ns, e["sha256"]) for e in manifest["shards"]}


@pytest.fixture
def slow_writes(monkeypatch):
    """Make the driver's shard writes slow, so that a build lasts long enough to be interrupted."""
    from kd_detr.teacher.cache import build

    orig = build.CacheWriter.write_shard

    def write_shard(self, *args, **kw):
        entry = orig(self, *args, **kw)
        time.sleep(0.2)
        return entry

    monkeypatch.setattr(build.CacheWriter, "write_shard", write_shard)


def test_cache_full_float32_is_the_in_process_teacher(setup, tmp_path):
    spec, ds, plan, reference = setup
    root = tmp_path / "full"
    store = StoreConfig.parse("full", dtype="float32", heads="per_head")
    summary = build_cache(spec, ds, plan, root, store, actors=1, images_per_shard=12, progress=False,
                          image_size=64, num_threads=1)
    assert summary["shards_total"] == 2 * 2 and summary["shards_written"] == 4 and summary["shards_skipped"] == 0
    assert summary["images"] == 2 * 24 and summary["images_per_s"] > 0
    reader = _check_complete(root, ds, plan)
    header = reader.manifest
    layers = next(iter(reference.values())).num_layers
    assert header["store"] == {**store.to_dict(), "layers": layers, "queries": 10,
                               "classes": ds.label_map.num_classes}
    assert header["dataset"]["image_size"] == 64 and header["dataset"]["images"] == 24
    assert header["teacher"]["checkpoint_sha256"] == hashlib.sha256(spec.checkpoint.read_bytes()).hexdigest()
    assert header["plan"]["fingerprint"] == plan.fingerprint()
    for key, ref in reference.items():
        got = reader.view_outputs(*key)
        for f in FIELDS:
            assert torch.equal(getattr(got, f), getattr(ref, f)), (key, f)
        assert got.feature_size == ref.feature_size
        assert got.gt_assignment.shape == (1, 10)
    # a rerun finds everything done and computes nothing
    again = build_cache(spec, ds, plan, root, store, actors=1, images_per_shard=12, progress=False,
                        image_size=64, num_threads=1)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 4 and again["images"] == 0
    assert again["device"] is None  # recognised from the manifest: no actor was started


_BUILD_SCRIPT = textwrap.dedent("""
    import sys, time
    from kd_detr.data import CocoDetection, make_policy
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher.loading import resolve_teacher
    from kd_detr.teacher.cache import StoreConfig, build
    orig = build.CacheWriter.write_shard
    def write_shard(self, *a, **kw):  # slow writes: the parent must catch the build mid-way
        entry = orig(self, *a, **kw)
        time.sleep(0.5)
        return entry
    build.CacheWriter.write_shard = write_shard
    address, data, teacher, out = sys.argv[1:5]
    ds = CocoDetection(data + "/train2017", data + "/annotations/instances_train2017.json",
                       transforms=make_policy(True, 64), label_map="contiguous", log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    build.build_cache(resolve_teacher("cond_detr_r10_tiny", teacher), ds, plan, out,
                      StoreConfig.parse("full", dtype="float32", heads="per_head"), actors=1,
                      images_per_shard=4, address=address, progress=False, image_size=64, num_threads=1,
                      pipeline="actor_pool")
""")


def test_interrupted_build_resumes(setup, synth_data, tmp_path):
    spec, ds, plan, reference = setup
    root = tmp_path / "cache"
    manifest = root / "manifest.json"
    # the child joins this test's Ray cluster (cheaper than its own, and its actors die with it)
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, address, str(synth_data), str(spec.checkpoint),
                             str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and json.loads(manifest.read_text())["shards"]:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _shard_state(root)
    total = 2 * 24 // 4
    assert 1 <= len(before) < total
    summary = build_cache(spec, ds, plan, root, StoreConfig.parse("full", dtype="float32", heads="per_head"),
                          actors=1, images_per_shard=4, progress=False, image_size=64, num_threads=1,
                          pipeline="actor_pool")
    assert summary["shards_skipped"] == len(before)
    assert summary["shards_written"] == total - len(before)
    assert summary["images_skipped"] + summary["images"] == 2 * 24
    after = _shard_state(root)
    assert {f: after[f] for f in before} == before  # finished shards untouched
    reader = _check_complete(root, ds, plan)
    for key, ref in reference.items():
        assert torch.equal(reader.view_outputs(*key).cross_attn, ref.cross_attn), key


def test_killed_actor_loses_and_duplicates_nothing(setup, tmp_path, slow_writes):
    """Also the ``topk`` store (one build covers both: actor start-up dominates the test time)."""
    spec, ds, plan, reference = setup
    store = StoreConfig.parse("topk:4", dtype="float32", heads="per_head")
    root = tmp_path / "cache"
    record: dict = {}

    def kill_one(actors):
        victim = actors[0]
        record["pid"] = ray.get(victim.ping.remote())

        def run():
            manifest = root / "manifest.json"
            while not json.loads(manifest.read_text())["shards"]:  # mid-run: the first shard is written
                time.sleep(0.01)
            ray.kill(victim, no_restart=False)
            # ray.kill is asynchronous: the old process may still answer a moment
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                record["new_pid"] = ray.get(victim.ping.remote())
                if record["new_pid"] != record["pid"]:
                    break
                time.sleep(0.05)

        record["thread"] = threading.Thread(target=run, daemon=True)
        record["thread"].start()

    summary = build_cache(spec, ds, plan, root, store, actors=2, images_per_shard=4, progress=False,
                          image_size=64, num_threads=1, pipeline="actor_pool", on_actors=kill_one)
    record["thread"].join(timeout=30)
    assert record.get("new_pid") not in (None, record["pid"])  # the actor really died and came back
    assert summary["shards_written"] == 2 * 24 // 4 and summary["images"] == 2 * 24
    reader = _check_complete(root, ds, plan)
    for key, ref in reference.items():
        got = reader.view_outputs(*key)
        assert torch.equal(got.logits, ref.logits) and torch.equal(got.boxes, ref.boxes), key
        # top-4 per row, renormalised: exactly the codec applied to the in-process maps
        for name, n in (("self_attn", 10), ("cross_attn", ref.feature_size[0] * ref.feature_size[1])):
            want = decode_attention(encode_attention(getattr(ref, name), store, name), store, n, name)
            assert torch.equal(getattr(got, name), want), (key, name)


def test_ray_teacher_server_prefetches_in_order(setup):
    spec, ds, plan, reference = setup
    views = PlanViews(ds, plan)
    # four padded batches of recorded views (images of different sizes: each is run alone by the actors)
    keys = [tuple(plan.all_views()[4 * b + n] for n in range(4)) for b in range(4)]
    batches = {key: PlanViews.collate([views[v] for v in key]) for key in keys}
    pulled = []

    def source():
        for key in keys:
            pulled.append(key)
            yield batches[key]

    server = RayTeacherServer(spec, "per_head", actors=2, prefetch=2, num_threads=1)
    try:
        assert torch.equal(server.query_embed, reference[keys[0][0]].query_embed)
        assert server.config.num_queries == 10
        results = []
        for i, (images, mask, targets, out) in enumerate(server.prefetching(source())):
            # bounded: the current batch and at most `prefetch` later ones have been taken
            assert len(pulled) == min(i + 1 + 2, len(keys))
            results.append((images, targets, out))
        assert len(results) == len(keys)
        for key, (images, targets, out) in zip(keys, results):
            assert torch.equal(images, batches[key][0])
            assert [t["image_id"].item() for t in targets] == [ds.image_ids[i] for i, _ in key]
            want = TeacherOutputs.stack_views([reference[v] for v in key])  # each view alone, then stacked
            for f in FIELDS:
                assert torch.equal(getattr(out, f), getattr(want, f)), (key, f)
            assert out.feature_size == want.feature_size and torch.equal(out.image_grids, want.image_grids)
        # synchronous use, like InProcessTeacher
        images, mask, _ = batches[keys[0]]
        want = TeacherOutputs.stack_views([reference[v] for v in keys[0]])
        assert torch.equal(server(images, mask).logits, want.logits)
    finally:
        server.close()
    assert server.actors == []
    if os.environ.get("RAY_ADDRESS") is None:
        assert ray.is_initialized()  # the shared session is not the server's to shut down
