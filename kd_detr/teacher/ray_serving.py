"""Teacher outputs from Ray actors, computed ahead of the student (bounded prefetch).

:class:`RayTeacherServer` starts ``N`` :data:`~kd_detr.teacher.ray_actor.TeacherActor` s (one frozen
teacher each, on a GPU when the Ray cluster has them) and hands them the student's padded batches through
the object store. ``prefetching(batches)`` keeps the next ``prefetch`` batches in flight (round-robin
over the actors) while the student trains on the current one, and yields :class:`~kd_detr.data.Batch` es
with their teacher outputs, in the original order.

An actor that dies is restarted a few times (:data:`~kd_detr.teacher.ray_actor.MAX_RESTARTS`) and its call
retried; one that keeps dying ends the run with :class:`~kd_detr.teacher.ray_actor.TeacherActorError`.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterable, Iterator, Optional

import ray
import torch
from ray.exceptions import RayActorError

from kd_detr.data import Batch, LabelMap

from .loading import TeacherSpec
from .outputs import ATTN_MODES, TeacherOutputs
from .ray_actor import TeacherActor, teacher_actor_error, teacher_job
from .ray_session import actor_options, ensure_ray, from_numpy, shutdown_ray, to_numpy, wire_from_numpy

log = logging.getLogger("kd_detr.teacher")

__all__ = ["RayTeacherServer"]


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
        features: the actors also return the teacher's encoder output maps (feature distillation).

    Usage::

        server = RayTeacherServer(spec, "per_head", actors=2, prefetch=2)
        for batch in server.prefetching(loader):
            ...  # batch.teacher: TeacherOutputs on the CPU, float32
        server.close()
    """

    def __init__(self, spec: TeacherSpec, attn_mode: str = "per_head", actors: int = 1, prefetch: int = 2,
                 address: Optional[str] = None, *, label_map: Optional[LabelMap] = None,
                 num_gpus: Optional[float] = None, num_threads: Optional[int] = None, features: bool = False):
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.spec, self.attn_mode, self.prefetch = spec, attn_mode, int(prefetch)
        self._started_ray = ensure_ray(address, num_cpus=max(2, actors))
        opts, self.device = actor_options(num_gpus)
        job = teacher_job(spec, attn_mode, label_map, self.device, actors, num_threads, features=features)
        self.actors = [TeacherActor.options(**opts).remote(job) for _ in range(actors)]
        self._next = 0
        try:
            # wait for every actor to load its teacher: a bad checkpoint fails here, not mid-epoch
            ray.get([a.ping.remote() for a in self.actors])
            self.query_embed = from_numpy(ray.get(self.actors[0].queries.remote()))
            self.config = ray.get(self.actors[0].config.remote())
        except RayActorError as e:
            self.close()
            raise teacher_actor_error(e) from None
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
        """Wait for a :meth:`submit` -> :class:`TeacherOutputs` (torch, float32; on ``device`` if given).

        Raises :class:`~kd_detr.teacher.ray_actor.TeacherActorError` when the actor died for good."""
        try:
            wire = ray.get(ref)
        except RayActorError as e:
            raise teacher_actor_error(e) from None
        out = TeacherOutputs.from_wire(wire_from_numpy(wire), self.query_embed)
        return out if device is None else out.to(device)

    def __call__(self, images: torch.Tensor, mask: torch.Tensor) -> TeacherOutputs:
        """Synchronous, like :class:`InProcessTeacher` (outputs on the device of ``images``)."""
        return self.get(self.submit(images, mask), device=images.device)

    # -- a stream of batches
    def prefetching(self, batches: Iterable) -> Iterator[Batch]:
        """Yield a :class:`Batch` with its :class:`TeacherOutputs` for each ``(images, mask, targets, ...)`` of
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
            yield Batch(images, mask, targets, self.get(ref))

    # -- lifetime
    def close(self) -> None:
        """Kill the actors (no restart); shut Ray down if this server started it."""
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        shutdown_ray(self._started_ray)
        self._started_ray = False

    def __enter__(self) -> "RayTeacherServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
