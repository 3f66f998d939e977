"""Quickstart student runs one after another (all cores each) vs side by side (one core each), in one run.

Builds the quickstart's data and teacher cache (or reuses them in --work), then runs ``kd-detr compare`` of
``baseline`` and ``d3etr`` at the quickstart's settings for ``--iters`` iterations twice: ``--parallel 1``
(today's default) and ``--parallel 2``, and prints the wall times, their ratio, the mean step time of each
mode and whether the two modes logged the same losses (torch's reductions depend on the thread count).

    python benchmarks/compare_parallel.py --iters 150 --work runs/bench_parallel
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--work", default="runs/bench_parallel")
    args = ap.parse_args()

    from kd_detr.data import DataSpec, generate_synthetic
    from kd_detr.runs import quickstart as qs
    from kd_detr.runs.compare import CompareConfig, compare
    from kd_detr.teacher.card import load_card

    work = Path(args.work)
    data = work / "data"
    generate_synthetic(data, progress=False, **qs.QUICKSTART_DATA)
    teacher = load_card(str(qs.shipped_card())).checkpoint_path()
    cache = work / "cache"
    qs.build_quickstart_cache(teacher, data, cache, views=2, actors=2, seed=0, progress=False)
    results = {}
    for parallel in (1, 2):
        out = work / f"parallel{parallel}_{args.iters}"
        cfg = CompareConfig(student=qs.STUDENT, student_overrides=dict(qs.STUDENT_OPTS), recipes=["baseline", "d3etr"],
                            out=str(out), budget=args.iters, teacher=qs.TEACHER, teacher_checkpoint=str(teacher),
                            teacher_cache=str(cache), seeds=[0],
                            data=DataSpec(str(data), image_size=qs.QUICKSTART_DATA["image_size"]), num_workers=1,
                            eval_points=1,
                            overrides=qs.student_overrides(args.iters), progress=False, parallel=parallel)
        t0 = time.perf_counter()
        rows, _ = compare(cfg)
        wall = time.perf_counter() - t0
        logs = {r: [json.loads(x) for x in (out / "runs" / r / "seed0" / "log.jsonl").read_text().splitlines()]
                for r in ("baseline", "d3etr")}
        results[parallel] = {"wall_s": wall, "AP": {r["recipe"]: r["AP"] for r in rows},
                             "step_s": {r: statistics.fmean(x["iter_time"] for x in lg if "iter_time" in x)
                                        for r, lg in logs.items()},
                             "loss": {r: [x["loss"] for x in lg if "loss" in x] for r, lg in logs.items()}}
    one, two = results[1], results[2]
    print(f"iterations per run: {args.iters}; 2 runs (baseline, d3etr from the cache)")
    for p, r in results.items():
        print(f"--parallel {p}: wall {r['wall_s']:.1f} s; step s: {r['step_s']}; AP: {r['AP']}")
    print(f"wall ratio parallel 2 / parallel 1: {two['wall_s'] / one['wall_s']:.2f}")
    same = all(one["loss"][r] == two["loss"][r] for r in one["loss"])
    diff = max(abs(a - b) / max(abs(a), 1e-9) for r in one["loss"] for a, b in zip(one["loss"][r], two["loss"][r]))
    print(f"losses identical across modes: {same} (largest relative difference {diff:.2e})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
