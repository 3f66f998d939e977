"""The streaming cache build: a Ray Data pipeline of a CPU stage and a teacher stage, the driver the one writer.

``from_items`` (one row per pending image view: ``shard``, ``view``, ``index``) -> :func:`decode_views` (Ray
tasks: decode + replay each view with the plan, :func:`~kd_detr.teacher.ray_actor.replay_view`) ->
:class:`TeacherStage` (an actor pool, ``actors`` actors of one GPU each when the cluster has GPUs, batches of
``teacher_batch_size`` views; each view still runs alone, :meth:`~kd_detr.teacher.ray_actor.TeacherWorker.view_entry`)
-> the driver (:func:`run_stream`), which groups the rows per shard and writes a shard once all its views are in.

So decoding overlaps the teacher, and the teacher actors never wait for a JPEG; the numbers are the actor
pool's (same replay, same entry function, same thread count). The driver writes every shard whole, so the
build stays resumable and a killed driver loses nothing written. A teacher actor that dies is replaced by the
driver, not by Ray (Ray Data passes its actors ObjectRefs, with which Ray warns against restarts): a new
pipeline computes the views not received yet, up to :data:`~kd_detr.teacher.ray_actor.MAX_RESTARTS` times; after
that the build raises the one-line :class:`~kd_detr.teacher.ray_actor.TeacherActorError`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import numpy as np
import ray

from ..ray_actor import (ACTOR_OPTIONS, TeacherActorError, TeacherWorker, load_plan_data, node_id, replay_view,
                         teacher_actor_error)
from ..ray_session import from_numpy

__all__ = ["decode_views", "TeacherStage", "run_stream", "quiet_ray_data", "DECODE_CPUS", "TEACHER_CPUS"]

# Logical CPUs (Ray's bookkeeping; the real threads are set by num_threads): a decode task takes a quarter,
# a teacher actor the rest of one CPU, so a 1-CPU node holds one actor and a decode task beside it (with
# whole CPUs the actors would take every CPU of a small cluster and the decode tasks would never start),
# and two actors never share a 1-CPU node (as with the actor pool's one CPU each).
DECODE_CPUS = 0.25
TEACHER_CPUS = 1.0 - DECODE_CPUS
WAIT_FOR_ACTORS_S = 600  # every teacher actor must have loaded its teacher within this, else the build fails

_TARGET = "target."  # column prefix of a view's target tensors
_ENTRY = "entry."  # column prefix of a view's stored tensors

# Ray Data's actors take ObjectRefs as constructor arguments: restarting one is the driver's job (run_stream)
_NO_RAY_RESTARTS = {"max_restarts": 0, "max_task_retries": 0}

log = logging.getLogger("kd_detr.teacher.cache")

_plan_data: dict[str, Any] = {}  # plan fingerprint -> (dataset, plan), per worker process (tasks reuse workers)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of possibly different shapes (Ray Data stores it as a variable-shaped tensor column)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    col = np.empty(len(arrays), dtype=object)
    col[:] = arrays
    return col


def decode_views(batch: dict[str, np.ndarray], data: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU stage: replay each row's view. In: ``shard``, ``view``, ``index`` ``[B]``; out: those and ``image``
    (``[3,H,W]`` float32 per row) and ``target.<key>`` (the view's target tensors, e.g. ``boxes [n,4]``)."""
    key = data["plan"]["fingerprint"]
    if key not in _plan_data:  # rebuilt once per worker process, not per batch
        _plan_data.clear()
        _plan_data[key] = load_plan_data(data)
    dataset, plan = _plan_data[key]
    images, targets = [], []
    for i, k in zip(batch["index"], batch["view"]):
        image, target = replay_view(dataset, plan, int(i), int(k))
        images.append(image.numpy())
        targets.append({name: t.numpy() for name, t in target.items()})
    out = {"shard": batch["shard"], "view": batch["view"], "index": batch["index"], "image": _ragged(images)}
    for name in targets[0] if targets else ():
        out[_TARGET + name] = _ragged([t[name] for t in targets])
    return out


class TeacherStage:
    """Teacher stage (one per actor of the pool): each view of a batch run alone through
    :meth:`TeacherWorker.view_entry`. Out per row: ``shard``, ``view``, ``index``, ``entry.<key>`` (the stored
    tensors), ``node`` (Ray node id, hex), ``busy_s`` (seconds in ``view_entry``) and ``ready_at`` (wall-clock
    time this actor had its teacher loaded: where the driver starts counting compute time).

    Args:
        job: :func:`~kd_detr.teacher.ray_actor.teacher_job`.
        store: the cache's :meth:`StoreConfig.to_dict`.
    """

    def __init__(self, job: dict[str, Any], store: dict[str, Any]):
        self.worker = TeacherWorker(job, None, store)
        self.node = node_id()
        self.ready_at = time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        targets = [k for k in batch if k.startswith(_TARGET)]
        entries, busy = [], []
        for j, i in enumerate(batch["index"]):
            image = from_numpy(np.asarray(batch["image"][j]))
            target = {k[len(_TARGET):]: from_numpy(np.asarray(batch[k][j])) for k in targets}
            t0 = time.perf_counter()
            entries.append(self.worker.view_entry(image, target, int(i)))
            busy.append(time.perf_counter() - t0)
        n = len(entries)
        out = {"shard": batch["shard"], "view": batch["view"], "index": batch["index"],
               "node": np.array([self.node] * n), "busy_s": np.array(busy, dtype=np.float64),
               "ready_at": np.full(n, self.ready_at, dtype=np.float64)}
        for name in entries[0] if entries else ():
            out[_ENTRY + name] = _ragged([e[name] for e in entries])
        return out


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data without its progress bars and console lines for the block (the build's own bar reports
    images/s and actor busy); the driver's previous settings are put back afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("enable_progress_bars", "enable_operator_progress_bars", "verbose_progress",
             "print_on_execution_start", "enable_rich_progress_bars", "use_ray_tqdm")
    old = {n: getattr(ctx, n) for n in names if hasattr(ctx, n)}
    for n in old:
        setattr(ctx, n, False)
    if hasattr(ctx, "wait_for_min_actors_s"):
        # Ray Data's default starts the pool asynchronously: the first actor up takes every view while the
        # others still load (on a cluster, a slower node's actor may never get work). Start once all are up;
        # a pool the cluster cannot place fails after this instead of waiting forever.
        old["wait_for_min_actors_s"] = ctx.wait_for_min_actors_s
        ctx.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    logger = logging.getLogger("ray.data")
    level = logger.level
    # CRITICAL: also its notice that the progress bars are off and its tracebacks of a failed stage (the build
    # raises that failure itself, as one line for a teacher actor that keeps dying)
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(ctx, n, v)
        logger.setLevel(level)


def run_stream(rows: list[dict[str, Any]], data: dict[str, Any], job: dict[str, Any], store: dict[str, Any], *,
               actors: int, teacher_batch_size: int, num_gpus: float,
               on_row: Callable[[dict[str, Any]], None]) -> tuple[float, float]:
    """Run the pipeline on ``rows`` (``{"shard", "view", "index"}``, in shard order) and hand every computed
    row to ``on_row`` (in the driver, as it arrives): ``{"shard", "view", "index", "node", "busy_s", "ready_at",
    "entry": {key: array}}``.

    Restarts are the driver's: Ray Data creates its actors with its own ``ObjectRef`` s as constructor
    arguments, and Ray logs an ERROR line for every such actor that may restart (a restart needs those objects
    again). So the teacher actors get ``max_restarts=0`` and, when one dies, the driver runs a new pipeline (new
    actors, which reload the teacher) on the rows not yet received, up to ``ACTOR_OPTIONS["max_restarts"]`` times;
    every row is a pure function of (plan, teacher, view, image), so nothing is lost or changed.

    Args:
        data: :func:`~kd_detr.teacher.ray_actor.plan_job`; job: :func:`~kd_detr.teacher.ray_actor.teacher_job`.
        num_gpus: GPUs per teacher actor (0: CPU).

    Returns:
        ``(first_ready, busy_s)``: the wall-clock time (``time.time()``) the first teacher actor was ready,
        ``nan`` if no row came back, and the seconds all actors spent computing entries.

    Raises:
        TeacherActorError: a teacher actor died more often than its restarts allow (or could not load).
    """
    first_ready, busy = math.inf, 0.0
    received: set[tuple[str, int]] = set()
    restarts = int(ACTOR_OPTIONS.get("max_restarts", 0))
    for attempt in range(restarts + 1):
        todo = [r for r in rows if (str(r["shard"]), int(r["index"])) not in received]
        if not todo:
            break
        try:
            for row in _run_once(todo, data, job, store, actors=actors, teacher_batch_size=teacher_batch_size,
                                 num_gpus=num_gpus):
                first_ready = min(first_ready, row["ready_at"])
                busy += row["busy_s"]
                received.add((row["shard"], row["index"]))
                on_row(row)
        except ray.exceptions.RayActorError as e:
            if getattr(e, "actor_init_failed", False) or attempt == restarts:
                raise teacher_actor_error(e) from None
            log.warning("teacher cache build: a teacher actor died (%s); restarting the pipeline on the %d image "
                        "views not computed yet (restart %d of %d)", type(e).__name__,
                        len(rows) - len(received), attempt + 1, restarts)
    return (first_ready if first_ready < math.inf else math.nan), busy


def _run_once(rows: list[dict[str, Any]], data: dict[str, Any], job: dict[str, Any], store: dict[str, Any], *,
              actors: int, teacher_batch_size: int, num_gpus: float) -> Iterator[dict[str, Any]]:
    """One pipeline over ``rows``: yields the rows of :func:`run_stream`; a teacher actor's death raises its
    ``RayActorError`` (a pool that cannot start, :class:`TeacherActorError`)."""
    from ray.data import ActorPoolStrategy

    with quiet_ray_data():
        # blocks of about one teacher batch: a decode task per block, rows of the first shards first
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / teacher_batch_size)))
        ds = ds.map_batches(decode_views, fn_kwargs={"data": data}, batch_size=teacher_batch_size,
                            batch_format="numpy", num_cpus=DECODE_CPUS,
                            **_task_pool(2 * actors))  # enough to keep each actor fed, few worker processes
        res = {"num_gpus": num_gpus} if num_gpus > 0 else {}
        with warnings.catch_warnings():
            # no restarts by Ray (see run_stream; Ray Data's own default is endless restarts); Ray 2.5x deprecates
            # passing them this way but has no other (pyproject keeps Ray below 2.64)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(TeacherStage, fn_constructor_kwargs={"job": job, "store": store},
                                compute=ActorPoolStrategy(size=actors), batch_size=teacher_batch_size,
                                batch_format="numpy", num_cpus=TEACHER_CPUS, **res, **_NO_RAY_RESTARTS)
        try:
            for row in ds.iter_rows():
                yield {"shard": str(row["shard"]), "view": int(row["view"]), "index": int(row["index"]),
                       "node": str(row["node"]), "busy_s": float(row["busy_s"]), "ready_at": float(row["ready_at"]),
                       "entry": {k[len(_ENTRY):]: np.asarray(v) for k, v in row.items() if k.startswith(_ENTRY)}}
        except Exception as e:  # noqa: BLE001 - Ray Data wraps the actor's death in its own errors
            if _in_chain(e, ray.exceptions.GetTimeoutError) is not None:
                _kill_queued_teacher_actors()
                raise TeacherActorError(f"the {actors} teacher actor(s) did not all start within {WAIT_FOR_ACTORS_S}"
                                        " s: the cluster lacks the CPUs/GPUs for --actors, or loading the teacher "
                                        "hangs") from None
            actor_error = _in_chain(e, ray.exceptions.RayActorError)
            if actor_error is None:
                raise
            raise actor_error from None


def _kill_queued_teacher_actors() -> None:
    """Kill this job's teacher-stage actors still waiting for resources. Ray Data drops a pool that did not start
    without killing them, and they stay queued on the cluster (taking a GPU the moment one frees) for as long as
    this process lives: a driver that goes on (a notebook, a test session, ``compare``) keeps them. Uses Ray's
    actor table and core worker (no public call kills an actor by id); best effort."""
    try:
        from ray._private.state import actors as actor_table

        job = ray.get_runtime_context().get_job_id()
        core = ray._private.worker.global_worker.core_worker
        for info in actor_table().values():
            if (info.get("JobID") == job and info.get("State") == "PENDING_CREATION"
                    and TeacherStage.__name__ in str(info.get("ActorClassName"))):
                core.kill_actor(ray.ActorID.from_hex(info["ActorID"]), True)
    except Exception as e:  # noqa: BLE001 - the build's own error is what the user must see
        log.debug("could not cancel the queued teacher actors: %s", e)


def _task_pool(size: int) -> dict[str, Any]:
    """``map_batches`` arguments capping a task stage at ``size`` concurrent tasks (``TaskPoolStrategy(size=)``
    where this Ray has it, else the older ``concurrency=``)."""
    pool = getattr(ray.data, "TaskPoolStrategy", None)
    if pool is not None and "size" in inspect.signature(pool.__init__).parameters:
        return {"compute": pool(size=size)}
    return {"concurrency": size}


def _in_chain(e: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The exception of type ``kind`` behind ``e`` (Ray Data wraps the errors of its stages), else ``None``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None
