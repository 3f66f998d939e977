"""``kd-detr cache``: compute a teacher's outputs on a view plan with Ray actors and store them.

The driver splits the plan's image views into shards (``images_per_shard`` consecutive images of one view,
``shard-00000.safetensors``, ... in a fixed order: view 0 of every image first) and computes the shards that
the manifest does not list yet with one of two pipelines (``pipeline=``, :data:`PIPELINES`):

* ``actor_pool``: a :class:`ray.util.ActorPool` of :data:`~kd_detr.teacher.ray_actor.TeacherActor` s, each
  replaying and running whole shards;
* ``stream``: :mod:`~kd_detr.teacher.cache.pipeline`, a Ray Data pipeline of decode tasks feeding a pool of
  teacher actors (``teacher_batch_size`` views per call); the driver collects each shard's views.

Either way the driver writes each shard, whole, with the one :class:`~kd_detr.teacher.cache.writer.CacheWriter`
(actors only compute; a single writer keeps the manifest consistent), and both compute every entry with the
same :func:`~kd_detr.teacher.ray_actor.replay_view` and :meth:`~kd_detr.teacher.ray_actor.TeacherWorker.view_entry`.

* **Resumable**: a shard is listed in the manifest only once complete; a rerun verifies the listed
  shards (SHA-256), skips the good ones and computes the rest (an interrupted build loses at most the
  shards in flight; a corrupt shard is rebuilt).
* **One build per folder**: the build holds the folder's lock (:class:`~kd_detr.teacher.cache.lock.CacheLock`)
  from its start; a second build into the same folder fails at once, before starting Ray.
* **Fault tolerant**: actors are created with a few restarts (:data:`~kd_detr.teacher.ray_actor.MAX_RESTARTS`),
  so an actor process that dies is restarted (reloading data and teacher) and its pending shard (or teacher
  batch) is computed again; results are pure functions of (plan, teacher, view, images), so nothing is lost or
  duplicated.
  An actor that keeps dying ends the build with :class:`~kd_detr.teacher.ray_actor.TeacherActorError`.
* **Identical to the in-process teacher**: an actor replays view ``k`` of image ``i`` with the plan and runs
  :meth:`~kd_detr.teacher.inprocess.InProcessTeacher.view` on it alone, as the in-process and Ray teachers
  do for each image of a batch; a ``full`` float32 cache holds exactly those numbers (on CPU, with the same
  intra-op thread count: see ``num_threads``). No entry depends on a batch: any batch size reads the cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import ray
from ray.exceptions import RayActorError
from ray.util import ActorPool

from kd_detr.data import CocoDetection, LabelMap
from kd_detr.data.view_plan import ViewPlan
from kd_detr.progress import Progress

from ..loading import (TeacherSpec, describe_teacher, load_teacher, teacher_config, teacher_family_record,
                       teacher_weights_sha256)
from ..ray_actor import TeacherActor, plan_job, teacher_actor_error, teacher_job
from ..ray_session import actor_options, ensure_ray, from_numpy, shutdown_ray

from .attention_codec import StoreConfig
from .fingerprint import dataset_fingerprint, images_problem
from .lock import CacheLock
from .manifest import IMAGES_FINGERPRINT, MANIFEST, QUERIES, CacheError
from .writer import CacheWriter

log = logging.getLogger("kd_detr.teacher.cache")

__all__ = ["cache_header", "plan_shards", "ShardTask", "build_cache", "PIPELINES"]


# ---------------------------------------------------------------------------------------- header


def cache_header(spec: TeacherSpec, dataset: CocoDetection, plan: ViewPlan, store: StoreConfig,
                 label_map: LabelMap, image_size: Optional[int] = None,
                 model_sizes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """The manifest header (everything but ``shards``) of a cache of ``spec`` on ``plan``.

    Args:
        image_size: the image-size preset of the augmentation policy (``None``: official sizes).
        model_sizes: ``{"layers", "queries", "classes"}`` of the teacher, added to ``store`` once known.

    A resumed build must produce the same header (the writer compares them field by field), so it
    holds only what decides the stored numbers: teacher file (by SHA-256), annotations (by SHA-256),
    images (by :func:`~kd_detr.teacher.cache.fingerprint.dataset_fingerprint`: names, sizes, modification
    times), plan and store config.
    """
    return {
        "teacher": {"name": spec.name, "model": spec.model, "checkpoint": str(spec.checkpoint),
                    "checkpoint_sha256": teacher_weights_sha256(spec), "card": spec.card,
                    "precision": spec.precision,
                    "config": teacher_config(spec, label_map), **teacher_family_record(spec)},
        "dataset": {"annotations": str(dataset.ann_file), "annotations_sha256": dataset.annotations_sha256(),
                    "image_dir": str(dataset.img_dir), IMAGES_FINGERPRINT: dataset_fingerprint(dataset),
                    "images": len(dataset), "image_size": image_size, "label_map": label_map.to_dict()},
        "plan": plan.to_dict(),
        "store": {**store.to_dict(), **(model_sizes or {})},
    }


# ---------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class ShardTask:
    """One shard: view ``view`` of the images ``images`` (dataset indices), stored in file ``name``."""

    name: str
    view: int
    images: tuple[int, ...]


def plan_shards(plan: ViewPlan, images_per_shard: int) -> list[ShardTask]:
    """Every shard of ``plan``, in a fixed order: views in order, each view's images (in data set order) cut
    into groups of ``images_per_shard``; shard ``n`` is ``shard-{n:05d}.safetensors``. A rerun with the same
    plan and ``images_per_shard`` names the same image views the same way (what resuming relies on)."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    tasks = []
    n = plan.num_images
    for k in range(plan.num_views):
        for start in range(0, n, images_per_shard):
            tasks.append(ShardTask(f"shard-{len(tasks):05d}.safetensors", k,
                                   tuple(range(start, min(start + images_per_shard, n)))))
    return tasks


# ----------------------------------------------------------------------------------------- build

PIPELINES = ("auto", "stream", "actor_pool")
"""``build_cache(pipeline=...)``: ``stream`` (:mod:`~kd_detr.teacher.cache.pipeline`: Ray Data, decode tasks
beside a teacher actor pool), ``actor_pool`` (each actor decodes and runs its own shards), ``auto`` (``stream``
when the cluster has GPUs, else ``actor_pool``: on CPUs the decode tasks compete with the teacher for the
cores and Ray Data's start-up costs seconds, see docs/teacher_cache.md)."""


def build_cache(spec: TeacherSpec, dataset: CocoDetection, plan: ViewPlan, out: Union[str, os.PathLike],
                store: Union[StoreConfig, str], *, actors: int = 1, images_per_shard: int = 32,
                address: Optional[str] = None, progress: bool = True, image_size: Optional[int] = None,
                num_gpus: Optional[float] = None, num_threads: Optional[int] = None,
                pipeline: str = "auto", teacher_batch_size: int = 8,
                on_actors: Optional[Callable[[list], None]] = None) -> dict[str, Any]:
    """Compute and store the teacher outputs of every image view of ``plan`` not yet in the cache ``out``.

    Args:
        spec: the teacher.
        dataset: the training data set (with the plan's augmentation policy).
        plan: the view plan (every view of every image is stored).
        out: the cache folder (created; an existing cache of the same header is resumed).
        store: a :class:`StoreConfig` or an ``--attention`` spec (``none`` | ``full`` | ``topk:k``; dense
            class logits). Its fields (``class_topk`` and ``class_rest`` included) go into the manifest's
            ``store`` section, so resuming with another store config is refused naming the field.
        actors: teacher actors (each holds a model; one GPU each when the cluster has GPUs).
        images_per_shard: image views per shard file (keep it fixed across resumes).
        address: Ray cluster (default ``$RAY_ADDRESS``, else a local Ray with ``max(2, actors)`` CPUs);
            ignored when Ray is already initialised (then Ray is also left running).
        progress: show a progress bar with images/s and the teacher actors' busy fraction.
        image_size: the image-size preset of the policy, recorded in the manifest.
        num_gpus: GPUs per actor (default 1 when the driver sees CUDA and the cluster has GPUs, else CPU).
        num_threads: torch threads per actor (default: the node's CPUs // actors).
        pipeline: one of :data:`PIPELINES` (``auto``: ``stream`` on a cluster with GPUs, else ``actor_pool``).
        teacher_batch_size: image views per call of a stream build's teacher stage (each still runs alone,
            so the numbers do not depend on it; unused by ``actor_pool``, whose unit is a shard).
        on_actors: called with the actor handles once they are up (monitoring; tests kill one);
            ``actor_pool`` only (``auto`` then picks it; the stream's actors belong to Ray Data).

    Returns:
        ``{"out", "pipeline" (the one used; ``None`` when nothing ran), "shards_total", "shards_written",
        "shards_skipped", "images" (image views computed now), "images_skipped", "seconds" (compute + write,
        from the first teacher actor ready), "images_per_s", "startup_s", "actors", "actor_busy" (seconds the
        actors spent computing entries / (seconds x actors)), "device", "images_by_node" ({Ray node id
        (hex): image views it computed now})}`` (``device`` ``None`` when the cache was already complete:
        then neither Ray nor an actor is started).
    """
    t_start = time.perf_counter()
    store = StoreConfig.parse(store) if isinstance(store, str) else store
    if len(dataset) != plan.num_images:
        raise ValueError(f"the view plan covers {plan.num_images} images but the data set has {len(dataset)}")
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)} (--pipeline), got {pipeline!r}")
    if isinstance(teacher_batch_size, bool) or not isinstance(teacher_batch_size, int) or teacher_batch_size < 1:
        raise ValueError(f"teacher_batch_size must be an integer >= 1 (--teacher-batch-size), "
                         f"got {teacher_batch_size!r}")
    if on_actors is not None and pipeline == "stream":
        raise ValueError("on_actors needs pipeline='actor_pool': the stream pipeline's teacher actors are Ray "
                         "Data's, there are no actor handles to give")
    tasks = plan_shards(plan, images_per_shard)

    if store.features and "features" not in describe_teacher(spec, dataset.label_map)[0].supports:
        raise CacheError(f"teacher {spec.name} gives no encoder feature maps to store (--features): build its cache "
                         "without --features")
    if store.attention != "none":
        # a deformable-attention teacher (RT-DETR, D-FINE, ...) has no maps to store: say so before any actor
        teacher_model = describe_teacher(spec, dataset.label_map)[0]
        if "attention" not in teacher_model.supports:
            raise CacheError(f"teacher {spec.name} ({teacher_model.name}) has no dense decoder attention maps "
                             f"to store (attention {store.attention!r}); build its cache with --attention none")
    # the folder's lock first: a second build into the same folder fails here, before any work
    lock = CacheLock(out)
    target: Optional[_Target] = None
    try:
        header = cache_header(spec, dataset, plan, store, dataset.label_map, image_size)
        existing = _existing_manifest(Path(out))
        if existing is not None:
            problem = images_problem(existing, dataset, fingerprint=header["dataset"][IMAGES_FINGERPRINT],
                                     fix="delete the folder to rebuild the cache, or use another --out")
            if problem:
                raise CacheError(f"cannot resume the teacher cache {out}: {problem}")
        # Resuming: the model sizes are those the cache recorded (its header pins the checkpoint by SHA-256),
        # so the header is checked, and a finished cache recognised, before any actor starts.
        target = _Target(out, header, tasks, _stored_sizes(existing), dataset.image_ids)
        run = _Run(actors=actors, startup=time.perf_counter() - t_start)
        if target.todo or not (Path(out) / QUERIES).is_file():
            started_ray = ensure_ray(address, num_cpus=max(2, actors))
            try:
                opts, run.device = actor_options(num_gpus)
                run.pipeline = pipeline if pipeline != "auto" else (
                    "stream" if "num_gpus" in opts and on_actors is None else "actor_pool")
                job = teacher_job(spec, store.attn_mode, dataset.label_map, run.device, actors, num_threads,
                                  features=store.features)
                data = plan_job(dataset, plan)
                if run.pipeline == "stream":
                    _build_stream(target, run, spec, dataset, job, data, store, opts.get("num_gpus", 0),
                                  teacher_batch_size, progress, plan, t_start)
                else:
                    _build_actor_pool(target, run, job, data, store, opts, on_actors, progress, plan, t_start)
            finally:
                shutdown_ray(started_ray)
    finally:
        if target is not None and target.writer is not None:
            target.writer.close()
        lock.release()
    computed = run.computed
    done_images = plan.num_views * plan.num_images - computed
    summary = {"out": str(out), "pipeline": run.pipeline, "shards_total": len(tasks),
               "shards_written": len(target.todo), "shards_skipped": target.skipped, "images": computed,
               "images_skipped": done_images, "seconds": run.seconds,
               "images_per_s": computed / run.seconds if run.seconds > 0 else math.nan, "startup_s": run.startup,
               "actors": actors, "actor_busy": run.busy_fraction(), "device": run.device,
               "images_by_node": run.by_node}
    if computed:
        log.info("teacher cache %s (%s): %d shards written, %d already there, %d image views in %.1f s (%.2f img/s, "
                 "start-up %.1f s, teacher actors %.0f%% busy)", out, run.pipeline, len(target.todo), target.skipped,
                 computed, run.seconds, summary["images_per_s"], run.startup, 100 * summary["actor_busy"])
    else:
        log.info("teacher cache %s: complete (%d shards already there, nothing to compute)", out, target.skipped)
    return summary


class _Target:
    """The cache being written: its single writer (opened once the teacher's sizes are known) and the shards
    still to compute."""

    def __init__(self, out, header: dict[str, Any], tasks: list[ShardTask], known: Optional[dict[str, int]],
                 coco_ids: list[int]):
        self.out, self.header, self.tasks, self.known, self.coco_ids = out, header, tasks, known, coco_ids
        self.writer: Optional[CacheWriter] = None
        self.todo, self.skipped = list(tasks), 0
        if known is not None:
            self.writer = CacheWriter(out, {**header, "store": {**header["store"], **known}})
            self.todo, self.skipped = _pending(tasks, self.writer)

    def open(self, sizes: dict[str, int], queries) -> None:
        """Open the writer for a teacher of ``sizes`` (a resumed cache must record the same) and store its
        ``queries [Nt, d]`` (a tensor, or a function giving one)."""
        if self.writer is None:
            self.writer = CacheWriter(self.out, {**self.header, "store": {**self.header["store"], **sizes}})
            self.todo, self.skipped = _pending(self.tasks, self.writer)
        elif sizes != self.known:
            raise CacheError(f"{self.out}: the cache records a teacher with {self.known}, this checkpoint has {sizes}")
        self.writer.write_queries(queries() if callable(queries) else queries)

    def write(self, t: ShardTask, entries: dict[int, dict[str, Any]]) -> None:
        """Write shard ``t`` whole: ``entries[i]`` the stored arrays of image ``i`` (numpy)."""
        self.writer.write_shard(t.name, t.view, {i: {k: from_numpy(a) for k, a in entries[i].items()}
                                                 for i in t.images}, [self.coco_ids[i] for i in t.images])


@dataclass
class _Run:
    """What one build computed, and how fast."""

    actors: int
    startup: float
    pipeline: Optional[str] = None
    device: Optional[str] = None
    computed: int = 0
    seconds: float = 0.0
    busy: float = 0.0  # seconds the teacher actors spent computing entries
    by_node: dict = None

    def __post_init__(self):
        self.by_node = {}

    def busy_fraction(self, seconds: Optional[float] = None) -> float:
        wall = self.seconds if seconds is None else seconds
        return self.busy / (wall * self.actors) if wall > 0 else math.nan

    def postfix(self, t0: float) -> dict[str, float]:
        """The progress bar's ``img/s`` and ``busy`` (the actors' busy fraction) since ``t0``."""
        wall = max(time.perf_counter() - t0, 1e-9)
        return {"img/s": self.computed / wall, "busy": self.busy_fraction(wall)}


def _build_actor_pool(target: _Target, run: _Run, job, data, store: StoreConfig, opts, on_actors, progress: bool,
                      plan: ViewPlan, t_start: float) -> None:
    """``actor_pool``: a :class:`ray.util.ActorPool` of teacher actors, each replaying and running whole shards."""
    handles: list = []
    try:
        handles = [TeacherActor.options(**opts).remote(job, data, store.to_dict()) for _ in range(run.actors)]
        try:
            ray.get([h.ping.remote() for h in handles])  # every actor loaded: fail early on a bad teacher
            sizes = ray.get(handles[0].describe.remote())
            target.open(sizes, lambda: from_numpy(ray.get(handles[0].queries.remote())))
        except RayActorError as e:
            raise teacher_actor_error(e) from None
        if on_actors is not None:
            on_actors(handles)
        bar = _bar(target, plan, progress)
        t0 = time.perf_counter()
        run.startup = t0 - t_start
        try:
            pool = ActorPool(handles)
            by_name = {t.name: t for t in target.todo}
            for t in target.todo:  # the pool queues them and hands one to each idle actor
                pool.submit(lambda a, t: a.run_shard.remote(t.name, t.view, list(t.images)), t)
            while pool.has_next():
                try:
                    name, entries, node, busy = pool.get_next_unordered()
                except RayActorError as e:  # restarts used up: the actor is gone for good
                    raise teacher_actor_error(e) from None
                t = by_name[name]
                target.write(t, entries)
                run.computed += len(t.images)
                run.busy += busy
                run.by_node[node] = run.by_node.get(node, 0) + len(t.images)
                bar.update(len(t.images), **run.postfix(t0))
        finally:
            bar.close()
        run.seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            ray.kill(h, no_restart=True)


def _build_stream(target: _Target, run: _Run, spec: TeacherSpec, dataset: CocoDetection, job, data,
                  store: StoreConfig, num_gpus: float, teacher_batch_size: int, progress: bool, plan: ViewPlan,
                  t_start: float) -> None:
    """``stream``: :func:`~kd_detr.teacher.cache.pipeline.run_stream`, this process the single writer: a shard
    is written once all its image views are in."""
    from .pipeline import run_stream

    # The writer needs the teacher's sizes and queries before the first shard; the pipeline's actors belong to
    # Ray Data, so the driver reads them from the weights once (on the CPU; freed right after).
    model, _, _ = load_teacher(spec, dataset.label_map)
    c = model.config
    target.open({"layers": int(c.dec_layers), "queries": int(c.num_queries), "classes": int(c.num_classes)},
                model.learned_queries().detach().cpu().clone())
    del model
    by_name = {t.name: t for t in target.todo}
    rows = [{"shard": t.name, "view": t.view, "index": i} for t in target.todo for i in t.images]
    pending: dict[str, dict[int, dict[str, Any]]] = {}  # shard -> image -> entry, until the shard is complete
    written: set[str] = set()
    bar = _bar(target, plan, progress)
    t_iter = time.perf_counter()
    clock = time.time() - t_iter  # wall-clock time = perf_counter + clock
    t0 = [None]  # compute starts when the first teacher actor is ready (the actors report wall-clock times)

    def on_row(row: dict[str, Any]) -> None:
        if t0[0] is None:
            t0[0] = min(max(row["ready_at"] - clock, t_iter), time.perf_counter())
        run.busy += row["busy_s"]
        if row["shard"] in written:  # a retried batch's row again (a pure function: the same numbers)
            return
        got = pending.setdefault(row["shard"], {})
        if row["index"] not in got:
            run.by_node[row["node"]] = run.by_node.get(row["node"], 0) + 1
        got[row["index"]] = row["entry"]
        t = by_name[row["shard"]]
        if len(got) == len(t.images):  # the shard is complete: write it whole
            target.write(t, pending.pop(t.name))
            written.add(t.name)
            run.computed += len(t.images)
            bar.update(len(t.images), **run.postfix(t0[0] or t_iter))

    try:
        if rows:
            first_ready, _ = run_stream(rows, data, job, store.to_dict(), actors=run.actors,
                                        teacher_batch_size=teacher_batch_size, num_gpus=num_gpus, on_row=on_row)
            if not math.isnan(first_ready):  # the earliest of all actors, not only the first row's
                t0[0] = min(max(first_ready - clock, t_iter), time.perf_counter())
    finally:
        bar.close()
    if pending:  # every row came back, so no shard can be left half-way; never write one partly
        raise CacheError(f"{target.out}: the stream pipeline returned shards {sorted(pending)} incompletely")
    t0[0] = t_iter if t0[0] is None else t0[0]
    run.startup = t0[0] - t_start
    run.seconds = time.perf_counter() - t0[0]


def _bar(target: _Target, plan: ViewPlan, progress: bool) -> Progress:
    total = plan.num_views * plan.num_images
    return Progress(total=total, initial=total - sum(len(t.images) for t in target.todo), enabled=progress,
                    desc="teacher cache")


def _existing_manifest(root: Path) -> Optional[dict[str, Any]]:
    """The parsed ``manifest.json`` of an existing cache, else ``None`` (no cache yet, or an unreadable
    manifest: the writer reports that once it is opened)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _stored_sizes(manifest: Optional[dict[str, Any]]) -> Optional[dict[str, int]]:
    """``{"layers", "queries", "classes"}`` recorded in an existing cache's manifest, else ``None``."""
    try:
        stored = manifest["store"]
        return {k: int(stored[k]) for k in ("layers", "queries", "classes")}
    except (ValueError, KeyError, TypeError):
        return None


def _pending(tasks: list[ShardTask], writer: CacheWriter) -> tuple[list[ShardTask], int]:
    """``(shards still to compute, number already complete)``. A listed shard must hold exactly the
    image views this run would put in it: otherwise the cache was started with another
    ``images_per_shard`` and resuming would store some views twice."""
    entries = {e["file"]: e for e in writer.manifest["shards"]}
    done_views = writer.done_views()
    todo, skipped = [], 0
    for t in tasks:
        entry = entries.get(t.name)
        if entry is not None and int(entry["view"]) == t.view and tuple(entry["images"]) == t.images:
            skipped += 1
            continue
        if entry is not None or any((i, t.view) in done_views for i in t.images):
            raise CacheError(f"{Path(writer.root)}: shard {t.name} (view {t.view}, images {t.images[0]}.."
                             f"{t.images[-1]}) does not match the cache's shards; it was built with another "
                             "images_per_shard (--images-per-shard): resume with the same value, or use a new folder")
        todo.append(t)
    return todo, skipped
