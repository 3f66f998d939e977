"""A tqdm progress bar on the main process (training, cache builds, evaluation); a no-op elsewhere."""

from __future__ import annotations

import time

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """A tqdm bar on the main process showing the main loss terms; a no-op elsewhere."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not enabled, mininterval=1.0)
        self.t0 = time.perf_counter()

    def update(self, n: int = 1, **postfix: float) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
