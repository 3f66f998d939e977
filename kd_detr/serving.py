"""Teacher outputs from Ray actors, computed ahead of the student (bounded prefetch).

:class:`RayTeacherServer` starts ``N`` teacher actors (:class:`TeacherServeActor`, one frozen teacher
each, on a GPU when the Ray cluster has them) and hands them the student's padded batches through
the object store. ``prefetching(batches)`` keeps the next ``prefetch`` batches in flight (round-robin
over the actors) while the student trains on the current one, and yields
``(images, mask, targets, TeacherOutputs)`` in the original order.

The actors run the same weights (:func:`~kd_detr.distill.teacher_loading.load_teacher`) on the same
float32 inputs as :class:`~kd_detr.distill.teacher.InProcessTeacher`, so the outputs are the same
numbers. On CPU, bit-identity also needs the same intra-op thread count on both sides (``num_threads``):
reductions split over a different number of threads round differently (~1e-6).

Actors are created with ``max_restarts=-1, max_task_retries=-1``: an actor process that dies (OOM
killer, preempted node) is restarted (it reloads the teacher) and its pending calls are retried, and
since a forward pass has no side effects a retry returns the same result.

The helpers here (:func:`ensure_ray`, :func:`spec_to_dict`, :func:`actor_options`, ...) are shared
with the cache builder (:mod:`kd_detr.teacher_cache.build`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import ray
import torch

from kd_detr.data import LabelMap
from kd_detr.distill.teacher import ATTN_MODES, InProcessTeacher, TeacherOutputs
from kd_detr.distill.teacher_loading import TeacherSpec, load_teacher

log = logging.getLogger("kd_detr.serving")

__all__ = ["RayTeacherServer", "TeacherServeActor", "ensure_ray", "spec_to_dict", "spec_from_dict",
           "actor_options", "torch_threads", "to_numpy", "from_numpy"]


# --------------------------------------------------------------------------------------- helpers


def ensure_ray(address: Optional[str] = None, num_cpus: int = 2) -> bool:
    """Connect to Ray unless the caller already did. Returns ``True`` if this call started it (the
    caller then shuts it down when done; a session someone else opened is left alone).

    ``address`` (or ``$RAY_ADDRESS``) joins an existing cluster; otherwise a local one with
    ``num_cpus`` CPUs and no dashboard is started (the dashboard costs seconds and memory for nothing here).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=int(num_cpus), include_dashboard=False, logging_level=logging.WARNING)
    return True


def spec_to_dict(spec: TeacherSpec) -> dict[str, Any]:
    """Every field of a :class:`TeacherSpec` as plain data (``TeacherSpec.to_dict`` is a lossy summary)."""
    d = dataclasses.asdict(spec)
    d["checkpoint"] = str(spec.checkpoint)
    return d


def spec_from_dict(d: dict[str, Any]) -> TeacherSpec:
    """Inverse of :func:`spec_to_dict`."""
    return TeacherSpec(**{**d, "checkpoint": Path(d["checkpoint"])})


def use_gpus() -> bool:
    """Put teacher actors on GPUs: the driver sees CUDA and the cluster has GPUs to hand out."""
    return torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1


def actor_options(num_gpus: Optional[float] = None) -> tuple[dict[str, Any], str]:
    """``(ray .options(...), device)`` of a teacher actor: one GPU each when :func:`use_gpus` (or
    ``num_gpus`` of one, e.g. ``0.5`` to share a GPU), else one CPU."""
    if num_gpus is None:
        num_gpus = 1 if use_gpus() else 0
    if num_gpus > 0:
        return {"num_gpus": num_gpus}, "cuda"
    return {"num_cpus": 1}, "cpu"


def torch_threads(num_actors: int, num_threads: Optional[int] = None) -> int:
    """Intra-op threads of one actor: the CPUs this process may use shared among the actors (Ray itself
    sets ``OMP_NUM_THREADS=1`` in workers, which would leave a CPU teacher on one core).

    Keep ``actors * threads`` at most the free cores: OpenMP threads spin at barriers, and an
    oversubscribed machine makes a 2-thread forward many times slower than a 1-thread one.
    """
    if num_threads:
        return int(num_threads)
    try:
        cpus = len(os.sched_getaffinity(0))  # the container's / taskset's CPUs, not the host's
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(num_actors)))


def to_numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """CPU numpy view (Ray serialises numpy arrays zero-copy; torch tensors are pickled)."""
    return None if t is None else t.detach().cpu().numpy()


def from_numpy(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """Tensor from an array out of the object store; those are read-only, so copy them then (torch
    refuses to wrap a read-only buffer without a warning, and a later in-place op would fail)."""
    if a is None:
        return None
    return torch.from_numpy(a if a.flags.writeable else a.copy())


# ----------------------------------------------------------------------------------------- actor


@ray.remote(max_restarts=-1, max_task_retries=-1)
class TeacherServeActor:
    """One frozen teacher in a Ray worker, serving padded batches.

    Args:
        spec: :func:`spec_to_dict` of the teacher.
        attn_mode: ``per_head`` | ``mean`` | ``none`` (:class:`InProcessTeacher`).
        label_map: the data's :meth:`LabelMap.to_dict` (only needed for an official checkpoint whose
            card says ``label_map = "contiguous"``), or ``None``.
        device: ``cpu`` | ``cuda``.
        actors, num_threads: torch intra-op threads in this worker: ``num_threads``, or (``None``) the
            node's CPUs // ``actors``.
    """

    def __init__(self, spec: dict[str, Any], attn_mode: str, label_map: Optional[dict[str, Any]],
                 device: str, actors: int = 1, num_threads: Optional[int] = None):
        torch.set_num_threads(torch_threads(actors, num_threads))
        lm = LabelMap.from_dict(label_map) if label_map is not None else None
        model, _, _ = load_teacher(spec_from_dict(spec), lm)
        self.device = torch.device(device)
        self.teacher = InProcessTeacher(model.to(self.device), attn=attn_mode)

    def ping(self) -> int:
        """The worker's process id (a restarted actor answers with a new one)."""
        return os.getpid()

    def config(self):
        """The teacher's :class:`ModelConfig`."""
        return self.teacher.config

    def queries(self) -> np.ndarray:
        """``[Nt, d]`` the teacher's query_embed."""
        return to_numpy(self.teacher.model.query_embed.weight)

    def forward(self, images: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """``images [B,3,H,W]`` float32, ``mask [B,H,W]`` bool -> the :class:`TeacherOutputs` fields as
        numpy (``query_embed`` omitted: constant, fetched once with :meth:`queries`)."""
        out = self.teacher(from_numpy(images).to(self.device), from_numpy(mask).to(self.device))
        return {"logits": to_numpy(out.logits), "boxes": to_numpy(out.boxes),
                "self_attn": to_numpy(out.self_attn), "cross_attn": to_numpy(out.cross_attn),
                "reference_points": to_numpy(out.reference_points),
                "feature_size": tuple(int(x) for x in out.feature_size)}


# ---------------------------------------------------------------------------------------- server


class RayTeacherServer:
    """Teacher outputs from ``actors`` Ray actors, a bounded number of batches ahead of the student.

    Args:
        spec: the teacher.
        attn_mode: ``per_head`` | ``mean`` | ``none``: attention maps returned (as :class:`InProcessTeacher`).
        actors: number of teacher actors (each holds a copy of the model).
        prefetch: batches submitted ahead of the one being consumed by :meth:`prefetching`.
        address: Ray cluster address (default ``$RAY_ADDRESS``, else a local Ray); ignored when Ray is
            already initialised.
        label_map: the data's label map (only for an official checkpoint with a ``contiguous`` card).
        num_gpus: GPUs per actor (default: 1 when the cluster has GPUs and the driver sees CUDA, else CPU).
        num_threads: torch threads per CPU actor (default: CPUs // actors).

    Usage::

        server = RayTeacherServer(spec, "per_head", actors=2, prefetch=2)
        for images, mask, targets, teacher_out in server.prefetching(loader):
            ...  # teacher_out: TeacherOutputs on the CPU, float32
        server.close()
    """

    def __init__(self, spec: TeacherSpec, attn_mode: str = "per_head", actors: int = 1, prefetch: int = 2,
                 address: Optional[str] = None, *, label_map: Optional[LabelMap] = None,
                 num_gpus: Optional[float] = None, num_threads: Optional[int] = None):
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.spec, self.attn_mode, self.prefetch = spec, attn_mode, int(prefetch)
        self._started_ray = ensure_ray(address, num_cpus=max(2, actors))
        opts, self.device = actor_options(num_gpus)
        lm = label_map.to_dict() if label_map is not None else None
        self.actors = [TeacherServeActor.options(**opts).remote(spec_to_dict(spec), attn_mode, lm, self.device,
                                                                actors, num_threads) for _ in range(actors)]
        self._next = 0
        try:
            # wait for every actor to load its teacher: a bad checkpoint fails here, not mid-epoch
            ray.get([a.ping.remote() for a in self.actors])
            self.query_embed = from_numpy(ray.get(self.actors[0].queries.remote()))
            self.config = ray.get(self.actors[0].config.remote())
        except BaseException:
            self.close()
            raise

    # -- single batches
    def submit(self, images: torch.Tensor, mask: torch.Tensor) -> ray.ObjectRef:
        """Queue ``images [B,3,H,W]`` / ``mask [B,H,W]`` on the next actor (round-robin); returns the ref
        for :meth:`get`. The inputs go through ``ray.put``: the driver owns them, so a call retried
        after an actor restart can read them again."""
        actor = self.actors[self._next]
        self._next = (self._next + 1) % len(self.actors)
        img = ray.put(to_numpy(images.float().contiguous()))
        msk = ray.put(to_numpy(mask.bool().contiguous()))
        return actor.forward.remote(img, msk)

    def get(self, ref: ray.ObjectRef, device: Any = None) -> TeacherOutputs:
        """Wait for a :meth:`submit` -> :class:`TeacherOutputs` (torch, float32; on ``device`` if given)."""
        d = ray.get(ref)
        out = TeacherOutputs(logits=from_numpy(d["logits"]), boxes=from_numpy(d["boxes"]),
                             self_attn=from_numpy(d["self_attn"]), cross_attn=from_numpy(d["cross_attn"]),
                             query_embed=self.query_embed, reference_points=from_numpy(d["reference_points"]),
                             feature_size=tuple(d["feature_size"]))
        return out if device is None else out.to(device)

    def __call__(self, images: torch.Tensor, mask: torch.Tensor) -> TeacherOutputs:
        """Synchronous, like :class:`InProcessTeacher` (outputs on the device of ``images``)."""
        return self.get(self.submit(images, mask), device=images.device)

    # -- a stream of batches
    def prefetching(self, batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any, TeacherOutputs]]:
        """Yield ``(images, mask, targets, TeacherOutputs)`` for each ``(images, mask, targets, ...)`` of
        ``batches``, in order, with up to ``prefetch`` later batches already submitted.

        At most ``prefetch + 1`` batches (and their results) are held at a time, so a fast teacher
        cannot run away from a slow student and fill memory.
        """
        it = iter(batches)
        pending: deque = deque()  # (images, mask, targets, ref), oldest first
        exhausted = False

        def fill(n: int) -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < n:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    return
                images, mask, targets = item[0], item[1], item[2]
                pending.append((images, mask, targets, self.submit(images, mask)))

        while True:
            # the current batch plus `prefetch` later ones in flight, all submitted before blocking on
            # the current one so the actors stay busy while the student works
            fill(self.prefetch + 1)
            if not pending:
                return
            images, mask, targets, ref = pending.popleft()
            yield images, mask, targets, self.get(ref)

    # -- lifetime
    def close(self) -> None:
        """Kill the actors (no restart); shut Ray down if this server started it."""
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayTeacherServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
