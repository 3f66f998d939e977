"""Hardening of the teacher cache, the Ray start-up / actors and teacher loading: every bad input or fault
is one line naming the file / field / option and what to do, and nothing is lost or half-written.

Ray tests share the session's local Ray (``ray_session``); the teacher is a tiny random-init model on
24 synthetic images at 64 px. Tests that need Ray *not* initialised call the probe directly or run in a
subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kd_detr.data import CocoDetection, make_policy
from kd_detr.data.view_plan import PlanViews, ViewPlan
from kd_detr.models import build_model, save_model
from kd_detr.models.checkpoint import save_official_checkpoint
from kd_detr.teacher.cache import CacheError, CacheReader, CacheWriter, StoreConfig, verify_cache
from kd_detr.teacher.cache import writer as writer_mod
from kd_detr.teacher.cache.fingerprint import dataset_fingerprint, images_problem
from kd_detr.teacher.cache.lock import CacheLock
from kd_detr.teacher.cache.manifest import IMAGES_FINGERPRINT
from kd_detr.teacher.loading import check_teacher_fits, describe_teacher, load_teacher, resolve_teacher
from kd_detr.teacher import ray_session

from tests.support.cache_store import build_cache as build_small, encode_view, make_header, make_outputs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _dataset(data: Path) -> CocoDetection:
    return CocoDetection(data / "train2017", data / "annotations" / "instances_train2017.json",
                         transforms=make_policy(True, 64), label_map="contiguous", log_report=False)


@pytest.fixture(scope="module")
def world(synth_data, tmp_path_factory):
    """``(data, dataset, plan, teacher path, spec)`` on a private copy of the synthetic data (tests touch
    its images); the teacher a tiny random model saved as a kd-detr file trained "at 64 px"."""
    tmp = tmp_path_factory.mktemp("hardening")
    data = tmp / "data"
    shutil.copytree(synth_data, data)  # copy2: times kept
    ds = _dataset(data)
    torch.manual_seed(7)
    teacher = build_model("cond_detr_r10_tiny", num_classes=ds.label_map.num_classes, num_queries=10,
                          dim_feedforward=128)
    path = tmp / "teacher.safetensors"
    save_model(teacher, path, label_map=ds.label_map, extra_metadata={"image_size": 64})
    spec = resolve_teacher("cond_detr_r10_tiny", str(path))
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    return data, ds, plan, path, spec


def _build(world, root, **kw):
    from kd_detr.teacher.cache.build import build_cache

    _, ds, plan, _, spec = world
    return build_cache(spec, ds, plan, root, StoreConfig.parse("none"), actors=1, images_per_shard=12,
                       progress=False, image_size=64, num_threads=1, **kw)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory, ray_session):
    """A complete cache of ``world`` (2 views x 24 images, 12 image views per shard: 4 shards), built once."""
    root = tmp_path_factory.mktemp("built") / "cache"
    summary = _build(world, root)
    assert summary["shards_written"] == 4 and verify_cache(root) == []
    return root


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst)
    return dst


# ----------------------------------------------------------------------- 1. one writer per folder

_HOLDER = textwrap.dedent("""
    import json, sys
    from kd_detr.teacher.cache import CacheWriter
    w = CacheWriter(sys.argv[1], json.loads(sys.argv[2]))
    print("locked", flush=True)
    sys.stdin.read()  # hold the writer (and its lock) until the parent closes stdin
""")


def test_second_writer_fails_at_once(tmp_path, world):
    root = tmp_path / "cache"
    header = make_header(StoreConfig.parse("none"))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), json.dumps(header)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", line + proc.stderr.read()
        before = (root / "manifest.json").read_bytes()
        t0 = time.monotonic()
        with pytest.raises(CacheError) as e:
            CacheWriter(root, header)
        msg = str(e.value)
        assert f"another kd-detr cache build is writing {root} (pid {proc.pid})" in msg
        assert "wait for it, or use another --out" in msg and "\n" not in msg
        # a whole cache build fails the same way, before Ray or any hashing
        from kd_detr.teacher.cache.build import build_cache

        _, ds, plan, _, spec = world
        with pytest.raises(CacheError, match=rf"pid {proc.pid}"):
            build_cache(spec, ds, plan, root, StoreConfig.parse("none"), progress=False)
        assert time.monotonic() - t0 < 3
        assert (root / "manifest.json").read_bytes() == before
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    # the holder is gone: its lock went with it
    w = CacheWriter(root, header)
    assert w.done() == set()
    w.close()


def test_lock_is_shared_within_a_process_and_released(tmp_path):
    root = tmp_path / "cache"
    header = make_header(StoreConfig.parse("none"))
    w1 = CacheWriter(root, header)
    w2 = CacheWriter(root, header)  # same process: one holder (the caller coordinates its own writers)
    w1.close()
    w2.close()
    w1.close()  # idempotent
    with pytest.raises(CacheError, match="closed"):
        w1.write_shard("shard-00000.safetensors", 0, {0: encode_view(0, 0, StoreConfig.parse("none"))}, [100])
    # released: another process can take it now
    out = subprocess.run([sys.executable, "-c", _HOLDER, str(root), json.dumps(header)], input="",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "locked" in out.stdout, out.stderr
    # a foreign folder is refused before any lock file is dropped into it
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        CacheLock(foreign)
    assert not (foreign / ".lock").exists()


# ------------------------------------------------------------------ 2. resume repairs corrupt shards


def _flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF  # inside the tensor data; size unchanged
    path.write_bytes(bytes(data))


def test_writer_resume_drops_a_corrupt_shard(tmp_path, caplog):
    root = tmp_path / "c"
    cfg = StoreConfig.parse("topk:3")
    w, _, _ = build_small(root, cfg)
    w.close()
    entry = {e["file"]: e for e in _manifest(root)["shards"]}["shard-00001.safetensors"]
    _flip_byte(root / "shard-00001.safetensors")
    stale = [root / ".shard-00002.safetensors.a1b2c3d4.tmp", root / ".tmpXy12Z9"]  # writes killed mid-way
    for path in stale:
        path.write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="kd_detr.teacher.cache"):
        w2 = CacheWriter(root, make_header(cfg))
    assert not any(path.exists() for path in stale)
    assert w2.done() == {"shard-00000.safetensors"}
    assert [e["file"] for e in _manifest(root)["shards"]] == ["shard-00000.safetensors"]  # dropped on disk too
    warned = [r.getMessage() for r in caplog.records if "shard-00001.safetensors" in r.getMessage()]
    assert warned and "corrupt" in warned[0] and "rebuilt" in warned[0]
    enc = encode_view(0, 1, cfg)  # what build_small stored there
    w2.write_shard("shard-00001.safetensors", 1, {0: enc}, [100])
    w2.close()
    assert verify_cache(root) == []
    new = {e["file"]: e for e in _manifest(root)["shards"]}["shard-00001.safetensors"]
    assert _sha(root / "shard-00001.safetensors") == new["sha256"] and new["bytes"] == entry["bytes"]
    got = CacheReader(root).entry(0, 1)
    assert got.keys() == enc.keys() and all(torch.equal(got[k], enc[k]) for k in enc)


def test_cache_rerun_rebuilds_a_corrupt_shard(world, built, tmp_path, caplog):
    root = _copy(built, tmp_path / "cache")
    shard = root / "shard-00001.safetensors"
    good = {i: {k: v.clone() for k, v in CacheReader(root).entry(i, 0).items()} for i in range(12, 24)}  # view 0
    _flip_byte(shard)
    assert verify_cache(root)  # corrupt
    with caplog.at_level(logging.WARNING, logger="kd_detr.teacher.cache"):
        summary = _build(world, root)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 3
    assert any("shard-00001.safetensors" in r.getMessage() for r in caplog.records)
    assert verify_cache(root) == []
    entry = {e["file"]: e for e in _manifest(root)["shards"]}["shard-00001.safetensors"]
    assert _sha(shard) == entry["sha256"]  # rewritten (the corrupt bytes are gone) ...
    reader = CacheReader(root)
    for i, want in good.items():  # ... with the same numbers
        got = reader.entry(i, 0)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), i


# --------------------------------------------------------------- 3. no paths out of the cache folder


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "queries_symlink"])
def test_manifest_paths_outside_the_folder_are_refused(tmp_path, how):
    root = tmp_path / "c"
    cfg = StoreConfig.parse("topk:3")
    build_small(root, cfg)[0].close()
    outside = tmp_path / "outside.safetensors"
    shutil.copy(root / "shard-00000.safetensors", outside)  # same bytes: its SHA-256 matches the manifest
    m = _manifest(root)
    if how == "dotdot":
        m["shards"][0]["file"] = "../outside.safetensors"
        needle = "'../outside.safetensors'"
    elif how == "absolute":
        m["shards"][0]["file"] = str(outside)
        needle = repr(str(outside))
    elif how == "symlink":
        (root / "shard-00000.safetensors").unlink()
        (root / "shard-00000.safetensors").symlink_to(outside)
        needle = "'shard-00000.safetensors'"
    else:
        shutil.move(root / "queries.safetensors", tmp_path / "q.safetensors")
        (root / "queries.safetensors").symlink_to(tmp_path / "q.safetensors")
        needle = "'queries.safetensors'"
    (root / "manifest.json").write_text(json.dumps(m))
    manifest = str(root / "manifest.json")
    with pytest.raises(CacheError) as e:
        CacheReader(root)
    assert manifest in str(e.value) and needle in str(e.value) and "outside the cache folder" in str(e.value)
    problems = verify_cache(root)  # `kd-detr cache verify` fails
    assert len(problems) == 1 and needle in problems[0] and manifest in problems[0]
    with pytest.raises(CacheError, match="outside the cache folder"):
        CacheWriter(root, make_header(cfg))  # resume


# ------------------------------------------------------------------------- 4. image fingerprint


def test_dataset_fingerprint_follows_the_images(world, tmp_path):
    data, ds, _, _, _ = world
    data2 = shutil.copytree(data, tmp_path / "data")  # times kept: same fingerprint
    ds2 = _dataset(data2)
    fp = dataset_fingerprint(ds)
    assert fp == dataset_fingerprint(ds2) and len(fp) == 64
    img = data2 / "train2017" / ds2.coco.dataset["images"][3]["file_name"]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    assert dataset_fingerprint(ds2) != fp
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dataset_fingerprint(ds2) == fp
    img.write_bytes(img.read_bytes() + b"\0")  # another size
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dataset_fingerprint(ds2) != fp
    manifest = {"dataset": {IMAGES_FINGERPRINT: fp}}
    assert images_problem(manifest, ds) is None
    msg = images_problem(manifest, ds2)
    assert "changed since the cache was built" in msg and str(ds2.img_dir) in msg and "rebuild the cache" in msg
    old = images_problem({"dataset": {}}, ds)
    assert "no image fingerprint" in old and "rebuild the cache" in old


def test_cache_records_images_and_refuses_changed_ones(world, built, tmp_path):
    data, ds, _, _, _ = world
    m = _manifest(built)
    assert m["dataset"][IMAGES_FINGERPRINT] == dataset_fingerprint(ds)
    assert m["dataset"]["image_dir"] == str(ds.img_dir)
    # changed images: a resumed build is refused before any work
    root = _copy(built, tmp_path / "cache")
    img = data / "train2017" / ds.coco.dataset["images"][0]["file_name"]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    try:
        t0 = time.monotonic()
        with pytest.raises(CacheError) as e:
            _build(world, root)
        assert time.monotonic() - t0 < 5
        assert "cannot resume the teacher cache" in str(e.value) and "changed since the cache was built" in str(e.value)
        assert images_problem(m, ds) is not None  # what CacheSource.open refuses for a run
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert images_problem(m, ds) is None
    # a cache from before image fingerprints: refused, "rebuild the cache"
    old = _copy(built, tmp_path / "old")
    m_old = _manifest(old)
    del m_old["dataset"][IMAGES_FINGERPRINT]
    (old / "manifest.json").write_text(json.dumps(m_old))
    with pytest.raises(CacheError, match="no image fingerprint.*rebuild the cache"):
        _build(world, old)
    assert "rebuild the cache" in images_problem(m_old, ds)


# ------------------------------------------------------------------------------------ 5. disk full


def test_disk_full_is_one_line_and_keeps_the_manifest(tmp_path, monkeypatch):
    root = tmp_path / "c"
    cfg = StoreConfig.parse("none")
    w = CacheWriter(root, make_header(cfg))
    w.write_queries(make_outputs().query_embed)
    w.write_shard("shard-00000.safetensors", 0, {0: encode_view(0, 0, cfg)}, [100])
    enc = encode_view(1, 0, cfg)
    before = (root / "manifest.json").read_bytes()
    real_save = writer_mod.save_file

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")  # a half-written temp file that must not survive
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_mod, "save_file", full)
    with pytest.raises(CacheError) as e:
        w.write_shard("shard-00001.safetensors", 0, {1: enc}, [101])
    msg = str(e.value)
    assert str(root / "shard-00001.safetensors") in msg and os.strerror(errno.ENOSPC) in msg
    assert "no space left on device?" in msg and "\n" not in msg
    # safetensors' own error type for the same fault
    from safetensors import SafetensorError

    def full_rust(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(writer_mod, "save_file", full_rust)
    with pytest.raises(CacheError, match=r"shard-00001.safetensors.*No space left on device.*no space left on dev"):
        w.write_shard("shard-00001.safetensors", 0, {1: enc}, [101])
    monkeypatch.setattr(writer_mod, "save_file", real_save)
    # the manifest write itself fails
    real_json = writer_mod.write_json_atomic

    def full_json(path, obj, indent=2):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_mod, "write_json_atomic", full_json)
    with pytest.raises(CacheError, match=r"manifest.*no space left on device\?"):
        w.write_shard("shard-00001.safetensors", 0, {1: enc}, [101])
    assert w.done() == {"shard-00000.safetensors"}  # not listed in memory either
    monkeypatch.setattr(writer_mod, "write_json_atomic", real_json)
    assert (root / "manifest.json").read_bytes() == before
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
    assert verify_cache(root) == [] and CacheReader(root).keys() == [(0, 0)]
    # space again: the same shard is written (the unlisted file on disk is simply replaced)
    w.write_shard("shard-00001.safetensors", 0, {1: enc}, [101])
    w.close()
    assert verify_cache(root) == [] and CacheReader(root).keys() == [(0, 0), (1, 0)]


# ----------------------------------------------------------------------------- 6. Ray address


def test_unreachable_ray_address_fails_fast(no_ray_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        ray_session.ensure_ray()
    msg = str(e.value)
    assert time.monotonic() - t0 < 10
    assert "cannot reach the Ray cluster at 127.0.0.1:1 (from $RAY_ADDRESS" in msg
    assert "ray start --head" in msg and "unset RAY_ADDRESS" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"127\.0\.0\.1:1 \(from --address"):
        ray_session.ensure_ray("127.0.0.1:1")
    with pytest.raises(ValueError, match="not host:port"):
        ray_session.ensure_ray("nohost")


def test_ray_address_auto_unresolvable(no_ray_init, monkeypatch):
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def none_found(addr, temp_dir=None):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", none_found)
    with pytest.raises(ValueError, match=r"cannot resolve the Ray address 'auto' \(from --address\).*ray start --head"):
        ray_session.ensure_ray("auto")


def test_reachable_address_passes_the_probe():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        ray_session.check_ray_reachable(f"127.0.0.1:{port}")
        ray_session.check_ray_reachable(f"ray://127.0.0.1:{port}")


def test_stale_ray_address_in_a_fresh_process():
    """Where Ray is really not started: ``ensure_ray`` with a dead $RAY_ADDRESS returns an error in seconds."""
    script = textwrap.dedent("""
        import time, ray
        from kd_detr.teacher.ray_session import ensure_ray
        t0 = time.monotonic()
        try:
            ensure_ray(num_cpus=1)
        except ValueError as e:
            print(f"{time.monotonic() - t0:.2f}|{ray.is_initialized()}|{e}")
    """)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, initialised, msg = out.stdout.strip().split("|", 2)
    assert float(seconds) < 10 and initialised == "False"
    assert "cannot reach the Ray cluster at 127.0.0.1:1 (from $RAY_ADDRESS" in msg


# ------------------------------------------------------------------------- 7. actors that keep dying


def _dying_actor(**options):
    """A TeacherActor (the same restart options unless ``options``) whose process exits on every teacher call."""
    import ray
    from ray import cloudpickle

    from kd_detr.teacher.ray_actor import ACTOR_OPTIONS, TeacherWorker

    class DiesOnEveryCall(TeacherWorker):
        def forward(self, images, mask):
            os._exit(1)

        def run_shard(self, name, view, indices):
            os._exit(1)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    return ray.remote(**{**ACTOR_OPTIONS, **options})(DiesOnEveryCall)


def test_teacher_actor_dying_on_every_call_ends_serving(world, ray_session, monkeypatch):
    from kd_detr.teacher import ray_serving
    from kd_detr.teacher.ray_actor import MAX_RESTARTS, TeacherActorError

    _, ds, plan, _, spec = world
    monkeypatch.setattr(ray_serving, "TeacherActor", _dying_actor())
    views = PlanViews(ds, plan)
    images, mask, _ = PlanViews.collate([views[(i, 0)] for i in range(4)])
    server = ray_serving.RayTeacherServer(spec, "none", actors=1, prefetch=0, num_threads=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(TeacherActorError) as e:
            server(images, mask)
        assert time.monotonic() - t0 < 120
    finally:
        server.close()
    msg = str(e.value)
    assert f"teacher actor died {MAX_RESTARTS + 1} times (last error: " in msg
    assert "check memory (OOM killer) and the teacher checkpoint" in msg and "\n" not in msg
    assert "Some common causes" not in msg  # Ray's paragraph of hints is cut: the one line says what to check


def test_teacher_actor_dying_on_every_call_ends_the_cache_build(world, ray_session, monkeypatch, tmp_path):
    """The restarts themselves are the serving test's; here one death ends it (each restart costs a
    worker start-up, seconds on two cores)."""
    from kd_detr.teacher.cache import build
    from kd_detr.teacher.ray_actor import TeacherActorError

    monkeypatch.setattr(build, "TeacherActor", _dying_actor(max_restarts=0, max_task_retries=0))
    root = tmp_path / "cache"
    with pytest.raises(TeacherActorError, match=r"teacher actor died \d+ times \(last error: .*OOM killer"):
        _build(world, root, pipeline="actor_pool")  # stream: test_cache_pipeline.py
    assert _manifest(root)["shards"] == [] and verify_cache(root) == []  # consistent, resumable
    CacheWriter(root, {k: v for k, v in _manifest(root).items() if k != "shards"}).close()  # lock released


def test_teacher_actor_that_cannot_load_is_one_line(world, ray_session, tmp_path):
    from kd_detr.teacher.ray_actor import TeacherActorError
    from kd_detr.teacher.ray_serving import RayTeacherServer

    _, _, _, path, spec = world
    bad = tmp_path / "teacher.safetensors"
    shutil.copy(path, bad)
    import dataclasses

    with pytest.raises(TeacherActorError) as e:  # a model name the file does not hold: refused in __init__
        RayTeacherServer(dataclasses.replace(spec, checkpoint=bad, model="cond_detr_r18_tiny"), "none",
                         num_threads=1)
    assert "could not start" in str(e.value) and "cond_detr_r18_tiny" in str(e.value)
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------- 8. card num_classes vs checkpoint


def _card(tmp_path: Path, checkpoint: str, fmt: str, num_classes: int, *, image_size: int = 64,
          label_map: str = "contiguous", known_ap: float = 0.0, name: str = "tiny_teacher") -> Path:
    card = tmp_path / f"{name}.toml"
    card.write_text(f'name = "{name}"\nmodel = "cond_detr_r10_tiny"\ncheckpoint = "{checkpoint}"\nformat = "{fmt}"\n'
                    f'num_classes = {num_classes}\nlabel_map = "{label_map}"\nimage_size = {image_size}\n'
                    f'known_ap = {known_ap}\n[model_overrides]\nnum_queries = 10\ndim_feedforward = 128\n')
    return card


def test_card_num_classes_must_match_the_checkpoint(world, tmp_path):
    from kd_detr.models import load_model

    _, ds, _, path, _ = world
    k = ds.label_map.num_classes
    shutil.copy(path, tmp_path / "teacher.safetensors")
    save_official_checkpoint(load_model(path)[0], tmp_path / "teacher.pth")
    for ckpt, fmt in (("teacher.safetensors", "safetensors"), ("teacher.pth", "official")):
        good = resolve_teacher(str(_card(tmp_path, ckpt, fmt, k)))
        assert load_teacher(good, ds.label_map)[0].config.num_classes == k
        card = _card(tmp_path, ckpt, fmt, k + 3)
        spec = resolve_teacher(str(card))
        with pytest.raises(ValueError) as e:
            load_teacher(spec, ds.label_map)
        msg = str(e.value)
        assert str(card) in msg and str(tmp_path / ckpt) in msg and f"num_classes = {k + 3}" in msg
        assert f"has {k} classes" in msg and "\n" not in msg
        if fmt == "safetensors":  # its metadata says so without loading the weights
            with pytest.raises(ValueError, match=f"num_classes = {k + 3}"):
                describe_teacher(spec, ds.label_map)


# ------------------------------------------------------- 9. a kd-detr checkpoint replacing a card's file


def test_kd_detr_checkpoint_replacing_a_card_brings_its_own_metadata(world, tmp_path, caplog):
    _, ds, _, path, _ = world
    # like the shipped official cards: official file (absent here), official sizes, 91 coco91 slots, known AP
    card = _card(tmp_path, "checkpoints/official.pth", "official", 91, image_size=0, label_map="coco91",
                 known_ap=41.0, name="official_like")
    with caplog.at_level(logging.INFO, logger="kd_detr.teacher"):
        spec = resolve_teacher(str(card), str(path))
    assert any("replaced" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert spec.format == "safetensors" and not spec.image_size_known and spec.known_ap is None
    assert spec.num_classes is None and spec.label_map is None and spec.card == str(card)
    config, label_map, image_size = describe_teacher(spec, ds.label_map)
    assert image_size == 64 and label_map.to_dict() == ds.label_map.to_dict()
    check_teacher_fits(spec, label_map, image_size, ds.label_map, config.num_classes, 64)  # not "official sizes"
    model, _, size = load_teacher(spec, ds.label_map)
    assert size == 64 and model.config.num_classes == ds.label_map.num_classes
    # an official .pth replacing the card's file carries no metadata: the card still describes it
    from kd_detr.models import load_model

    save_official_checkpoint(load_model(path)[0], tmp_path / "other.pth")
    card2 = _card(tmp_path, "checkpoints/official.pth", "official", ds.label_map.num_classes, image_size=0)
    spec2 = resolve_teacher(str(card2), str(tmp_path / "other.pth"))
    assert spec2.image_size_known and spec2.image_size is None and spec2.num_classes == ds.label_map.num_classes
