"""Audit findings on folder locks, teacher caches and run state (issue 21): each test failed before its fix.

1. a ``.lock`` that is a link (symbolic or hard), a dangling link or not a regular file is refused, for a run's
   output dir and for a cache folder alike (one :class:`~kd_detr.folder_lock.FolderLock`), and nothing is
   written through it;
2. an incomplete cache is reported (``verify_report``: N of M views present) and refused at the start of a
   run; a shard whose header disagrees with its manifest entry (swapped views) is refused when opened;
3. ``cache verify`` reads files outside the cache folder only when the caller names them;
4. one-line errors naming the file: a plain-pickle / legacy-format ``state.pth``, a full disk under
   ``log.jsonl``, a manifest entry that is not an integer;
5. a stream cache build prints no Ray ERROR line about actor constructor arguments in the object store.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kd_detr.cli import main
from kd_detr.engine.checkpointing import CheckpointRefused, OutputDirLock, OutputDirLockRefused, load_training_state
from kd_detr.engine.logger import RunLogger
from kd_detr.folder_lock import FolderLock, LockBusy, LockFileRefused
from kd_detr.teacher.cache import CacheError, CacheReader, CacheWriter, StoreConfig, pipeline
from kd_detr.teacher.cache.lock import CacheLock
from kd_detr.teacher.cache.verify import verify_report

from tests.support.cache_store import build_cache as build_small, make_header


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


# ------------------------------------------------------------------------------------ 1. folder locks


@pytest.fixture
def victim(tmp_path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    return v


def test_a_symlinked_lock_of_an_output_dir_is_refused_and_its_target_kept(tmp_path, victim):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / ".lock").symlink_to("../victim.txt")
    with pytest.raises(OutputDirLockRefused) as e:
        OutputDirLock(run).acquire()
    assert str(e.value) == (f"--output-dir: refusing the lock file {run / '.lock'}: it is a symbolic link (to "
                            f"../victim.txt), and taking the lock would write into it; a lock file must be a regular "
                            f"file: remove {run / '.lock'} and run again")
    assert victim.read_text() == "precious\n"


def test_distill_resume_auto_on_a_symlinked_lock_exits_1_and_keeps_the_target(synth_data, tmp_path, victim):
    from tests.support.runs import distill_args, save_teacher

    teacher = save_teacher(tmp_path, synth_data)
    run = tmp_path / "RUN"
    run.mkdir()
    (run / ".lock").symlink_to("../victim.txt")
    res = CliRunner().invoke(main, distill_args(synth_data, run, teacher, "--resume", "auto",
                                                "--set", "train.max_iters=1"))
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines() == [f"Error: --output-dir: refusing the lock file {run / '.lock'}: it is "
                                               "a symbolic link (to ../victim.txt), and taking the lock would write "
                                               f"into it; a lock file must be a regular file: remove {run / '.lock'}"
                                               " and run again"]
    assert victim.read_text() == "precious\n" and sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_symlinked_cache_lock_is_refused_and_its_target_kept(tmp_path, victim):
    root = tmp_path / "CACHE"
    build_small(root)[0].close()
    (root / ".lock").unlink()
    (root / ".lock").symlink_to(victim)
    for opener in (lambda: CacheLock(root), lambda: CacheWriter(root, make_header(StoreConfig.parse("topk:3")))):
        with pytest.raises(CacheError, match=re.escape(f"teacher cache {root}: refusing the lock file {root / '.lock'}"
                                                       f": it is a symbolic link (to {victim})")):
            opener()
    assert victim.read_text() == "precious\n"


def test_a_dangling_lock_link_creates_nothing(tmp_path):
    for folder, take, err in ((tmp_path / "RUN", lambda p: OutputDirLock(p).acquire(), OutputDirLockRefused),
                              (tmp_path / "CACHE", CacheLock, CacheError)):
        folder.mkdir()
        target = tmp_path / f"created-by-{folder.name}"
        (folder / ".lock").symlink_to(target)
        with pytest.raises(err, match="symbolic link"):
            take(folder)
        assert not target.exists() and not target.is_symlink()


def test_a_lock_that_is_a_hard_link_a_fifo_or_a_folder_is_refused(tmp_path, victim):
    cases = {"hard": lambda p: os.link(victim, p), "fifo": os.mkfifo, "dir": os.mkdir}
    kinds = {"hard": "a hard link (one of 2 names of one file)", "fifo": "a FIFO", "dir": "a folder"}
    for name, make in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        make(folder / ".lock")
        with pytest.raises(LockFileRefused, match=re.escape(f"{folder / '.lock'}: it is {kinds[name]}, ")):
            FolderLock(folder).acquire()  # a FIFO must not hang the open either
    assert victim.read_text() == "precious\n"
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_dir / ".lock"))
        with pytest.raises(LockFileRefused, match="it is a socket"):
            FolderLock(sock_dir).acquire()


def test_run_and_cache_locks_are_the_one_folder_lock(tmp_path):
    """Both keep their semantics on the shared lock: the pid inside, non-blocking, a cache lock shared within a
    process, the run lock exclusive and removing the output dir it created when nothing was written."""
    folder = tmp_path / "f"
    folder.mkdir()
    with FolderLock(folder):
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockBusy, match=f"locked by pid {os.getpid()}"):
            FolderLock(folder).acquire()
        with pytest.raises(OSError, match=f"another kd-detr run is using --output-dir {folder} \\(pid {os.getpid()}"):
            OutputDirLock(folder).acquire()
    assert (folder / ".lock").read_text() == ""
    a, b = CacheLock(folder), CacheLock(folder)  # shared within this process
    with pytest.raises(LockBusy):
        FolderLock(folder).acquire()
    a.release()
    with pytest.raises(LockBusy):
        FolderLock(folder).acquire()
    b.release()
    FolderLock(folder).acquire().release()
    fresh = tmp_path / "new"
    lock = OutputDirLock(fresh).acquire()
    lock.release()
    assert not fresh.exists()


# ------------------------------------------------------------------------------ 2. incomplete caches


def test_verify_reports_completeness(tmp_path):
    root = tmp_path / "c"
    build_small(root)[0].close()  # 4 of 6 images x 2 views
    report = verify_report(root)
    assert report.problems == [] and not report.complete and (report.present, report.total) == (4, 12)
    assert report.completeness() == ("incomplete: 4 of 12 image views present (first missing: view 0 of image 2, "
                                     "view 0 of image 3, view 0 of image 5); finish it: rerun `kd-detr cache` with "
                                     "the same options")
    (root / "shard-00001.safetensors").unlink()  # a listed shard removed: its view is absent too
    report = verify_report(root)
    assert report.present == 3 and report.problems == ["shard-00001.safetensors: missing (listed in manifest.json)"]


def test_verify_reports_a_complete_cache(tmp_path):
    cfg = StoreConfig.parse("none")
    header = make_header(cfg)
    header["dataset"]["images"] = 2
    header["plan"]["num_views"] = 1
    from tests.support.cache_store import encode_view, make_outputs

    with CacheWriter(tmp_path / "c", header) as w:
        w.write_queries(make_outputs().query_embed)
        w.write_shard("shard-00000.safetensors", 0, {i: encode_view(i, 0, cfg) for i in (0, 1)}, [100, 101])
    report = verify_report(tmp_path / "c")
    assert report.problems == [] and report.complete and report.completeness() == "complete (2 image views)"


def test_a_swapped_view_in_the_manifest_is_refused_when_the_shard_opens(tmp_path):
    root = tmp_path / "c"
    build_small(root)[0].close()
    m = _manifest(root)
    m["shards"][0]["view"], m["shards"][1]["view"] = 1, 0  # the views of the two shards swapped
    (root / "manifest.json").write_text(json.dumps(m))
    r = CacheReader(root, verify_shards=False)
    with pytest.raises(CacheError) as e:
        r.entry(4, 1)
    assert str(e.value) == (f"teacher cache shard {root / 'shard-00000.safetensors'}: its header says view '0' (the "
                            "manifest: '1'); refused (the manifest does not describe this shard): rebuild the cache "
                            "with `kd-detr cache`")
    assert [p.split(":")[0] for p in verify_report(root).problems] == ["shard-00000.safetensors",
                                                                       "shard-00001.safetensors"]


def _incomplete_real_cache(synth_data, tmp_path, teacher) -> Path:
    """A cache of ``teacher`` on the synthetic training set (2 views) whose build has written no shard yet."""
    from kd_detr.data import CocoDetection, make_policy
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher.cache.build import cache_header
    from kd_detr.teacher.loading import resolve_teacher

    ds = CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json",
                       transforms=make_policy(True, 64), log_report=False)
    store = StoreConfig.parse("full")
    header = cache_header(resolve_teacher("cond_detr_r10_tiny", str(teacher)), ds,
                          ViewPlan.for_dataset(ds, num_views=2, seed=0), store, ds.label_map, 64)
    header["store"].update(layers=6, queries=10, classes=ds.label_map.num_classes)
    root = tmp_path / "CACHE"
    CacheWriter(root, header).close()
    return root


def test_distill_from_an_incomplete_cache_stops_at_start_in_one_line(synth_data, tmp_path):
    from tests.support.runs import distill_args, save_teacher

    teacher = save_teacher(tmp_path, synth_data)
    cache = _incomplete_real_cache(synth_data, tmp_path, teacher)
    res = CliRunner().invoke(main, distill_args(synth_data, tmp_path / "RUN", teacher, "--teacher-cache", str(cache),
                                                "--set", "train.max_iters=1"))
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"Error: teacher cache {cache} is incomplete: 24 of the 24 image views this run reads are missing (view 0 of "
        "image 3, view 0 of image 4, view 0 of image 5, ...); finish it: rerun `kd-detr cache` with the same options "
        f"(--out {cache})")


# ------------------------------------------------------------------ 3. verify reads only what it is given


def test_verify_never_reads_a_file_the_manifest_names_outside_the_cache(tmp_path, monkeypatch):
    from kd_detr.teacher.cache import verify as verify_mod

    root = tmp_path / "c"
    build_small(root)[0].close()
    secret = tmp_path / "secret"
    secret.write_text("not for the cache\n")
    m = _manifest(root)
    m["dataset"]["annotations"], m["teacher"]["checkpoint"] = str(secret), str(secret)
    (root / "manifest.json").write_text(json.dumps(m))
    hashed = []
    real = verify_mod.sha256_file
    monkeypatch.setattr(verify_mod, "sha256_file", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    report = verify_report(root)
    assert secret not in hashed and all(p.parent == root for p in hashed)
    assert report.unchecked == [
        f"the teacher checkpoint (the manifest names '{secret}'; pass --teacher-checkpoint to check it against its "
        "recorded SHA-256)",
        f"the annotation file (the manifest names '{secret}'; pass --data or --train-ann to check it against its "
        "recorded SHA-256)",
        "the training images (a run checks them against dataset.images_fingerprint)"]
    data = tmp_path / "data"
    data.mkdir()
    report = verify_report(root, data=data)  # the manifest's file is not inside the data folder the user named
    assert secret not in hashed and report.unchecked[1] == (f"the annotation file: the manifest names '{secret}', "
                                                            f"outside --data {data} (pass --train-ann to check a file)")


def test_verify_checks_the_files_the_user_names(tmp_path):
    root = tmp_path / "c"
    build_small(root)[0].close()
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    ann = data / "annotations" / "train.json"
    ann.write_text("{}")
    m = _manifest(root)
    m["dataset"]["annotations"] = str(ann)
    (root / "manifest.json").write_text(json.dumps(m))
    assert verify_report(root, data=data).problems == [
        f"{ann}: the annotation file changed since the cache was built (SHA-256 differs from the manifest's "
        "dataset.annotations_sha256): the cache is stale, rebuild it"]
    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"x")
    assert verify_report(root, checkpoint=ckpt).problems == [
        f"{ckpt}: not the teacher checkpoint the cache was built from (SHA-256 differs from the manifest's "
        "teacher.checkpoint_sha256): use that checkpoint, or rebuild the cache"]


# -------------------------------------------------------------------------- 4. one-line messages


def test_a_plain_pickle_or_legacy_state_is_refused_without_advising_weights_only_false(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    plain, legacy = tmp_path / "plain.state.pth", tmp_path / "legacy.state.pth"
    with open(plain, "wb") as f:
        pickle.dump({"format": 2, "optimizer": Boom()}, f)
    torch.save({"format": 2, "optimizer": Boom()}, legacy, _use_new_zipfile_serialization=False)
    for path in (plain, legacy):
        with pytest.raises(CheckpointRefused) as e:
            load_training_state(path)
        msg = str(e.value)
        assert msg == (f"{path} is a plain pickle or legacy-format torch file holding Python objects "
                       f"({os.system.__module__}.system), not a training state kd-detr writes (torch's zip format): "
                       "refused, nothing of it was run; use a checkpoint kd-detr wrote (this one may have been "
                       "tampered with)")
        assert "weights_only" not in msg and "\n" not in msg


def test_a_full_disk_under_the_training_log_is_one_line_naming_it(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    logger._f = FullDisk()
    with pytest.raises(OSError) as e:
        logger.log({"iteration": 3, "loss": 1.0})
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"could not append to the training log {tmp_path / 'log.jsonl'}: no space left on "
                            "device? free some space, then resume the run with --resume auto (the checkpoints "
                            "written so far are kept)")


@pytest.mark.parametrize("field,value,what", [
    ("view", "1", "shard entry 1 (shard-00001.safetensors): view"),
    ("images", [0.5], "shard entry 1 (shard-00001.safetensors): images"),
    ("image_ids", ["100"], "shard entry 1 (shard-00001.safetensors): image_ids"),
    ("bytes", 1.0e3, "shard entry 1 (shard-00001.safetensors): bytes"),
    ("num_views", "2", "plan.num_views"),
])
def test_a_manifest_entry_that_is_not_an_integer_is_one_line(tmp_path, field, value, what):
    root = tmp_path / "c"
    build_small(root)[0].close()
    m = _manifest(root)
    (m["plan"] if field == "num_views" else m["shards"][1])[field] = value
    (root / "manifest.json").write_text(json.dumps(m))
    shown = value[0] if isinstance(value, list) else value
    expected = (f"{root / 'manifest.json'}: {what} must be an integer, got {shown!r}: the manifest was edited or "
                "damaged; rebuild the cache with `kd-detr cache`")
    with pytest.raises(CacheError) as e:
        CacheReader(root)
    assert str(e.value) == expected
    assert verify_report(root).problems == [expected]


# --------------------------------------------------------------------- 5. stream build: no Ray ERROR


def test_a_stream_build_prints_no_ray_error_about_constructor_arguments(tmp_path, ray_session, capfd):
    from kd_detr.data import CocoDetection, generate_synthetic, make_policy
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher.cache.build import build_cache
    from kd_detr.teacher.loading import resolve_teacher
    from tests.support.runs import save_teacher

    data = tmp_path / "data"
    generate_synthetic(data, num_train=4, num_val=1, image_size=64, seed=3)  # 4 image views: start-up is the cost
    teacher = save_teacher(tmp_path, data)
    ds = CocoDetection(data / "train2017", data / "annotations" / "instances_train2017.json",
                       transforms=make_policy(True, 64), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=1, seed=0)
    s = build_cache(resolve_teacher("cond_detr_r10_tiny", str(teacher)), ds, plan, tmp_path / "cache", "none",
                    actors=1, images_per_shard=4, progress=False, image_size=64, num_threads=1, pipeline="stream")
    assert s["pipeline"] == "stream" and s["images"] == 4
    err = capfd.readouterr().err
    assert "constructor arguments in the object store" not in err, err[-2000:]
    assert " E " not in "".join(line for line in err.splitlines() if "core_worker" in line), err[-2000:]


class _DiesOnce(pipeline.TeacherStage):
    """A teacher stage whose first call (in any process) kills its actor; later ones compute normally."""

    marker = ""  # set by the test: a path every worker process sees

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("died\n")
            os._exit(1)
        return super().__call__(batch)


def test_a_stream_teacher_actor_that_dies_is_replaced_by_the_driver(tmp_path, ray_session, monkeypatch):
    """Ray does not restart the stream's teacher actors (they hold ObjectRefs): the driver runs a new pipeline on
    the views not received yet, and the cache is complete with the same numbers as without the death."""
    import sys

    from ray import cloudpickle

    from kd_detr.data import CocoDetection, generate_synthetic, make_policy
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher.cache.build import build_cache
    from kd_detr.teacher.loading import resolve_teacher
    from tests.support.runs import save_teacher

    data = tmp_path / "data"
    generate_synthetic(data, num_train=4, num_val=1, image_size=64, seed=3)
    teacher = save_teacher(tmp_path, data)
    ds = CocoDetection(data / "train2017", data / "annotations" / "instances_train2017.json",
                       transforms=make_policy(True, 64), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=1, seed=0)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(_DiesOnce, "marker", str(tmp_path / "died"))
    monkeypatch.setattr(pipeline, "TeacherStage", _DiesOnce)
    s = build_cache(resolve_teacher("cond_detr_r10_tiny", str(teacher)), ds, plan, tmp_path / "cache", "none",
                    actors=1, images_per_shard=2, progress=False, image_size=64, num_threads=1, pipeline="stream",
                    teacher_batch_size=2)
    assert (tmp_path / "died").exists() and s["images"] == 4 and s["shards_written"] == 2
    report = verify_report(tmp_path / "cache")
    assert report.problems == [] and report.complete
    monkeypatch.undo()
    ref = build_cache(resolve_teacher("cond_detr_r10_tiny", str(teacher)), ds, plan, tmp_path / "ref", "none",
                      actors=1, images_per_shard=2, progress=False, image_size=64, num_threads=1,
                      pipeline="actor_pool")
    assert ref["images"] == 4
    a, b = CacheReader(tmp_path / "cache"), CacheReader(tmp_path / "ref")
    for i, k in a.keys():
        ea, eb = a.entry(i, k), b.entry(i, k)
        assert ea.keys() == eb.keys() and all(torch.equal(ea[n], eb[n]) for n in ea)
