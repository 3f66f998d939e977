"""``torch_threads(n)``: run a block with ``n`` torch intra-op threads. Bit-identity between the in-process
teacher and Ray actors needs the same thread count on both sides (reductions split over other thread counts
round differently)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
