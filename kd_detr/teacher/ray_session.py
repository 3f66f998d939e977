"""The one Ray start-up of kd-detr and the helpers every Ray user shares (cache build, serving, compare).

Placement: a teacher actor takes one GPU when the driver sees CUDA and the cluster has GPUs, else
one CPU; its torch intra-op threads are the node's CPUs shared among the actors. Tensors cross the
object store as numpy arrays (zero-copy), never pickled torch tensors.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np
import ray
import torch

__all__ = ["ensure_ray", "shutdown_ray", "use_gpus", "actor_options", "torch_threads", "to_numpy", "from_numpy",
           "wire_to_numpy", "wire_from_numpy"]


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Connect to Ray unless the caller already did: the one Ray start-up of kd-detr (cache builds,
    teacher serving, compare). Returns ``True`` if this call started it (the caller then shuts it down
    with :func:`shutdown_ray` when done; a session someone else opened is left alone).

    ``address`` (or ``$RAY_ADDRESS``) joins an existing cluster; otherwise a local one with ``num_cpus``
    CPUs (default: this machine's) and no dashboard is started (it costs seconds and memory for nothing
    here). Ray's own logging is kept at warnings.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=int(num_cpus or os.cpu_count() or 1), include_dashboard=False,
                 logging_level=logging.WARNING)
    return True


def shutdown_ray(started: bool) -> None:
    """Shut Ray down if :func:`ensure_ray` started it (``started``)."""
    if started and ray.is_initialized():
        ray.shutdown()


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


def wire_to_numpy(wire: dict[str, Any]) -> dict[str, np.ndarray]:
    """A :meth:`TeacherOutputs.to_wire` dict as numpy arrays for the object store."""
    return {k: to_numpy(v) for k, v in wire.items()}


def wire_from_numpy(wire: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`wire_to_numpy`."""
    return {k: from_numpy(v) for k, v in wire.items()}
