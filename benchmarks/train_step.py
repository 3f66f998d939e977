"""Time per training iteration (forward + loss + backward + AdamW step) of registered models.

Measured side by side in one run, so ratios between models are meaningful on a noisy machine.

    python benchmarks/train_step.py --models cond_detr_r50,cond_detr_r101 --size 800x1066 --batch 2
    python benchmarks/train_step.py --models cond_detr_r10_tiny,cond_detr_r18_tiny --size 128x128 --batch 8

Random weights and random ground truth (timing does not depend on the values); the official
optimiser settings (AdamW, clip 0.1) and the official criterion with auxiliary losses.
Prints a Markdown table and, with ``--json``, writes the figures to a file. On the CPU the memory
column is the process's peak resident set so far (it can only grow from row to row); on CUDA it is
the peak allocated memory of that row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kd_detr.criterion import SetCriterion, weighted_total
from kd_detr.engine.optim import param_groups
from kd_detr.engine.runtime import peak_memory_mb
from kd_detr.matcher import HungarianMatcher
from kd_detr.models import build_model


def random_targets(batch: int, num_classes: int, gen: torch.Generator, n_obj: int = 7) -> list[dict]:
    out = []
    for _ in range(batch):
        cxcy = torch.rand(n_obj, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n_obj, 2, generator=gen) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, num_classes, (n_obj,), generator=gen),
                    "boxes": torch.cat([cxcy, wh], 1)})
    return out


def time_model(name: str, hw: tuple[int, int], batch: int, iters: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = build_model(name).to(device).train()
    nc = model.config.num_classes
    criterion = SetCriterion(nc, HungarianMatcher())
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 1e-5, 1e-4), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *hw, generator=gen).to(device)
    mask = torch.zeros(batch, *hw, dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(batch, nc, gen)]
    times = []
    for i in range(warmup + iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "size": f"{hw[0]}x{hw[1]}", "batch": batch, "params_M": params / 1e6,
            "step_s": statistics.median(times), "step_s_min": min(times), "iters": iters,
            "peak_mem_mb": peak_memory_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cond_detr_r50,cond_detr_r101")
    ap.add_argument("--size", default="800x1066", help="HxW of the input batch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(x) for x in args.size.lower().split("x"))
    rows = [time_model(m, (h, w), args.batch, args.iters, args.warmup, args.device)
            for m in args.models.split(",")]
    base = rows[0]["step_s"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"\ndevice: {device_name}; torch {torch.__version__}")
    print("| model | input | batch | params (M) | s / iter (median) | ratio | peak mem (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['params_M']:.1f} | {r['step_s']:.3f} | "
              f"{r['step_s'] / base:.2f} | {r['peak_mem_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
