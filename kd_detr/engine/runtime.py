"""The process a run trains in: its device, its seeds, its loaders' generators, its peak memory."""

from __future__ import annotations

import random
import resource

import numpy as np
import torch

__all__ = ["resolve_device", "seed_everything", "loader_generator", "peak_memory_mb"]


def resolve_device(device: str) -> str:
    """``--device``: ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """A DataLoader's own generator. Without one it draws its workers' base seed from the global RNG; that
    draw would shift the dropout stream and break exact resume."""
    return torch.Generator().manual_seed(seed + 1000 * rank)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
