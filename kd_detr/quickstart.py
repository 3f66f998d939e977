"""``kd-detr quickstart``: the whole flow on generated data, on a CPU, in a few minutes.

Generates the synthetic COCO-format data set, trains a tiny Conditional DETR on it and evaluates it
with pycocotools. (The teacher -> cache -> distill -> compare flow joins it as those features land.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

QUICKSTART_DATA = dict(num_train=512, num_val=100, image_size=128)


def run_quickstart(out: Path, iters: int = 600, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    from kd_detr.data import generate_synthetic
    from kd_detr.engine.trainer import TrainConfig, train

    out = Path(out)
    data_dir = out / "data"
    t0 = time.perf_counter()
    if not (data_dir / "annotations" / "instances_val2017.json").exists():
        echo(f"[1/3] generating synthetic data in {data_dir}")
        generate_synthetic(data_dir, seed=seed, **QUICKSTART_DATA)
    else:
        echo(f"[1/3] reusing synthetic data in {data_dir}")
    echo(f"[2/3] training cond_detr_r10_tiny for {iters} iterations on the CPU")
    cfg = TrainConfig(model="cond_detr_r10_tiny", data=str(data_dir), image_size=QUICKSTART_DATA["image_size"],
                      batch_size=8, lr=4e-4, lr_backbone=4e-4, max_iters=iters, warmup_iters=min(100, iters // 5),
                      lr_drop=None, lr_drop_iter=int(iters * 0.8), eval_every_epochs=0, num_workers=1,
                      output_dir=str(out / "train"), seed=seed, resume="auto", checkpoint_every=200)
    metrics = train(cfg)
    echo(f"[3/3] COCO evaluation on the {QUICKSTART_DATA['num_val']} validation images (pycocotools):")
    echo(metrics.get("summary", "(no evaluation: no validation data)"))
    echo(f"AP {100 * metrics.get('AP', 0.0):.1f}, AP50 {100 * metrics.get('AP50', 0.0):.1f} after {iters} iterations "
         f"in {time.perf_counter() - t0:.0f} s. Outputs: {out / 'train'} (model_final.safetensors, metrics.json, "
         f"log.jsonl)")
    return metrics
