"""The streaming cache build (``build_cache(pipeline="stream")``: Ray Data decode tasks -> teacher actor pool ->
the driver, the one writer): the same bytes as the actor-pool build, resumable, its options checked, a teacher
stage that keeps dying ends it with one line, and no Ray process outlives it.

Ray tests share the session's local Ray (``ray_session``); the teacher is a tiny random-init model on the 24
synthetic images at 64 px, two views, 12 image views per shard (4 shards). Both pipelines run the actors
with one intra-op thread, so the stored numbers are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time

import pytest
import torch
from safetensors import safe_open

ray = pytest.importorskip("ray")

from kd_detr.data import CocoDetection, make_policy  # noqa: E402
from kd_detr.data.view_plan import ViewPlan  # noqa: E402
from kd_detr.models import build_model, save_model  # noqa: E402
from kd_detr.teacher.cache import CacheReader, StoreConfig, verify_cache  # noqa: E402
from kd_detr.teacher.cache import build, pipeline  # noqa: E402
from kd_detr.teacher.loading import resolve_teacher  # noqa: E402
from kd_detr.teacher.ray_actor import TeacherActorError  # noqa: E402

STORE = StoreConfig.parse("full", dtype="float32", heads="per_head")  # exact numbers: every attention map too


@pytest.fixture(scope="module")
def world(synth_data, tmp_path_factory):
    """``(dataset, plan, spec)``: a tiny teacher saved as a kd-detr file trained "at 64 px"."""
    ds = CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json",
                       transforms=make_policy(True, 64), label_map="contiguous", log_report=False)
    torch.manual_seed(7)
    teacher = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes, num_queries=10,
                          dim_feedforward=128)
    path = tmp_path_factory.mktemp("pipeline") / "teacher.safetensors"
    save_model(teacher, path, label_map=ds.label_map, extra_metadata={"image_size": 64})
    return ds, ViewPlan.for_dataset(ds, num_views=2, seed=0), resolve_teacher("cond_detr_r10_tiny", str(path))


def _build(world, root, **kw):
    ds, plan, spec = world
    return build.build_cache(spec, ds, plan, root, STORE, actors=1, images_per_shard=12, progress=False,
                             image_size=64, num_threads=1, **kw)


@pytest.fixture(scope="module")
def stream_cache(world, ray_session, tmp_path_factory):
    """``(root, summary)`` of a complete stream-built cache of ``world``."""
    root = tmp_path_factory.mktemp("stream") / "cache"
    return root, _build(world, root, pipeline="stream", teacher_batch_size=5)  # batches cut across shards


def _shards(root):
    """``file -> (sha256 of the bytes, mtime_ns)`` of the shards the manifest lists."""
    manifest = json.loads((root / "manifest.json").read_text())
    return {e["file"]: (hashlib.sha256((root / e["file"]).read_bytes()).hexdigest(),
                        (root / e["file"]).stat().st_mtime_ns) for e in manifest["shards"]}


def test_stream_cache_equals_the_actor_pool_cache(world, stream_cache, tmp_path):
    _, plan, _ = world
    root, s = stream_cache
    assert s["pipeline"] == "stream" and s["shards_written"] == 4 and s["images"] == 48
    assert 0 < s["actor_busy"] <= 1 and s["images_per_s"] > 0 and s["startup_s"] > 0
    assert sum(s["images_by_node"].values()) == 48  # the teacher stage says where each view ran
    pool = _build(world, tmp_path / "pool", pipeline="actor_pool")
    assert pool["pipeline"] == "actor_pool" and 0 < pool["actor_busy"] <= 1
    assert verify_cache(root) == []
    a, b = CacheReader(root), CacheReader(tmp_path / "pool")
    assert a.keys() == b.keys() == sorted(plan.all_views())
    for key in plan.all_views():
        ea, eb = a.entry(*key), b.entry(*key)
        assert ea.keys() == eb.keys(), key
        for name in ea:
            assert ea[name].dtype == eb[name].dtype and torch.equal(ea[name], eb[name]), (key, name)
    # (the files' bytes may differ: safetensors orders the header's metadata keys at random)
    qa, qb = (safe_open(str(r / "queries.safetensors"), framework="pt") for r in (root, tmp_path / "pool"))
    assert torch.equal(qa.get_tensor("query_embed"), qb.get_tensor("query_embed")) and qa.metadata() == qb.metadata()
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (root, tmp_path / "pool"))
    assert {k: v for k, v in ma.items() if k != "shards"} == {k: v for k, v in mb.items() if k != "shards"}
    strip = lambda m: sorted((e["file"], e["view"], e["images"], e["image_ids"]) for e in m["shards"])  # noqa: E731
    assert strip(ma) == strip(mb)


def test_stream_resumes_a_partial_cache(world, stream_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(stream_cache[0], root)
    manifest = json.loads((root / "manifest.json").read_text())
    dropped = [e["file"] for e in manifest["shards"][2:]]  # as if killed after two shards
    manifest["shards"] = manifest["shards"][:2]
    (root / "manifest.json").write_text(json.dumps(manifest))
    for name in dropped:
        (root / name).unlink()
    before = _shards(root)
    s = _build(world, root, pipeline="stream")
    assert s["shards_skipped"] == 2 and s["shards_written"] == 2
    assert s["images"] == 24 and s["images_skipped"] == 24  # only the missing shards' views were computed
    after = _shards(root)
    assert {f: after[f] for f in before} == before  # finished shards untouched
    assert sorted(after) == sorted(_shards(stream_cache[0])) and verify_cache(root) == []
    a, b = CacheReader(root), CacheReader(stream_cache[0])
    for key in b.keys():  # the same numbers as the uninterrupted build
        ea, eb = a.entry(*key), b.entry(*key)
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea), key
    again = _build(world, root, pipeline="stream")  # complete: recognised without Ray Data or an actor
    assert again["shards_skipped"] == 4 and again["images"] == 0 and again["device"] is None


def test_options_are_checked_before_any_work(world, tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"teacher_batch_size must be an integer >= 1 \(--teacher-batch-size\), got 0"):
        _build(world, root, pipeline="stream", teacher_batch_size=0)
    with pytest.raises(ValueError, match=r"pipeline must be one of auto, stream, actor_pool \(--pipeline\), "
                                         r"got 'fast'"):
        _build(world, root, pipeline="fast")
    with pytest.raises(ValueError, match=r"on_actors needs pipeline='actor_pool'"):
        _build(world, root, pipeline="stream", on_actors=lambda actors: None)
    assert not root.exists()  # refused before the folder was touched


class _DiesOnEveryBatch(pipeline.TeacherStage):
    def __call__(self, batch):
        os._exit(1)


def test_teacher_stage_dying_on_every_call_ends_the_stream_build(world, ray_session, monkeypatch, tmp_path):
    """The stream twin of test_hardening_cache's actor-pool test: one death ends it (each restart costs a worker
    start-up, seconds on two cores); Ray Data's own default would restart the actor forever."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(pipeline, "TeacherStage", _DiesOnEveryBatch)
    monkeypatch.setattr(pipeline, "ACTOR_OPTIONS", {"max_restarts": 0, "max_task_retries": 0})
    root = tmp_path / "cache"
    t0 = time.monotonic()
    with pytest.raises(TeacherActorError) as e:
        _build(world, root, pipeline="stream")
    assert time.monotonic() - t0 < 120
    msg = str(e.value)
    assert re.search(r"teacher actor died \d+ times \(last error: .*OOM killer", msg) and "\n" not in msg
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["shards"] == [] and verify_cache(root) == []  # consistent, resumable


def test_a_pool_the_cluster_cannot_place_fails_in_one_line(world, ray_session, monkeypatch, tmp_path):
    """A GPU teacher actor on this CPU-only Ray never starts: the build stops after WAIT_FOR_ACTORS_S with one
    line naming --actors (Ray Data alone would wait for the actor forever)."""
    monkeypatch.setattr(pipeline, "WAIT_FOR_ACTORS_S", 3)
    root = tmp_path / "cache"
    t0 = time.monotonic()
    with pytest.raises(TeacherActorError, match=r"did not all start within 3 s: .*--actors") as e:
        _build(world, root, pipeline="stream", num_gpus=1)
    assert time.monotonic() - t0 < 90 and "\n" not in str(e.value)
    assert json.loads((root / "manifest.json").read_text())["shards"] == []  # nothing half-written
    # and no teacher actor stays queued on the cluster for a GPU after the build gave up
    from ray._private.state import actors as actor_table

    deadline = time.monotonic() + 10
    while True:
        queued = [a for a in actor_table().values()
                  if "TeacherStage" in str(a.get("ActorClassName")) and a.get("State") != "DEAD"]
        if not queued or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert queued == []


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_no_ray_process_outlives_a_stream_build(synth_data, tmp_path):
    from tests.support.runs import save_teacher
    from tests.support.ray_processes import assert_no_new_ray, ray_processes, run_kd_detr

    teacher = save_teacher(tmp_path, synth_data)
    before = ray_processes()
    res = run_kd_detr(["cache", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher), "--data",
                       str(synth_data), "--image-size", "64", "--no-progress", "--out", str(tmp_path / "cache"),
                       "--views", "1", "--actors", "1", "--pipeline", "stream", "--teacher-batch-size", "4"], tmp_path)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert re.search(r"pipeline stream, [\d.]+ img/s, teacher actors \d+% busy", res.stdout), res.stdout
    assert_no_new_ray(before, "kd-detr cache --pipeline stream")
    assert verify_cache(tmp_path / "cache") == []
