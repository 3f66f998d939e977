"""The quickstart's d3etr AP from its compact default cache vs from a dense float32 cache of the same views.

    kd-detr quickstart --out runs/quickstart               # first: data, teacher, compact cache, both runs
    python benchmarks/quickstart_cache_ap.py --out runs/quickstart [--seeds 0,1,2]

The issue's budget for the default storage (``--attention topk:14 --classes topk:4``, float16): the quickstart
AP within 0.3 of the dense cache's. This script builds ``OUT/cache_dense`` (``--attention full --classes dense
--dtype float32``: every number the teacher produced, on the same view plan) and trains ``d3etr`` from it with
exactly the quickstart's settings (``OUT/compare_dense``), then prints the AP of both per seed, the difference,
and each cache's bytes per view. The compact runs are the quickstart's own (``OUT/compare``; a seed not run
yet is run here), or with ``--d3etr-only`` d3etr alone in ``OUT/compare_compact`` (no baseline runs). Both caches
hold the views of ``--cache-seed`` (default 0, the views of the quickstart's default cache), whatever the run
seeds. About 6 minutes per seed on 2 CPU cores (one d3etr run, plus the cache build once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_detr.runs.compare import compare  # noqa: E402
from kd_detr.runs.quickstart import QUICKSTART_PARALLEL, build_quickstart_cache, compare_config, shipped_card  # noqa: E402
from kd_detr.teacher.cache import StoreConfig  # noqa: E402
from kd_detr.teacher.card import load_card  # noqa: E402

TARGET_AP = 0.3  # the budget: |AP(compact) - AP(dense)| at most this


def bytes_per_view(cache: Path) -> float:
    """Mean bytes of shard files per image view of a finished cache (its manifest)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = manifest["shards"]
    return sum(int(s["bytes"]) for s in shards) / max(sum(len(s["images"]) for s in shards), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="the quickstart's --out folder")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the student runs")
    ap.add_argument("--cache-seed", type=int, default=0,
                    help="seed of the views in both caches: the seed the quickstart in --out was run with")
    ap.add_argument("--d3etr-only", action="store_true",
                    help="run the compact cache's d3etr alone, in OUT/compare_compact, instead of the quickstart's "
                         "baseline + d3etr comparison in OUT/compare")
    ap.add_argument("--iters", type=int, default=2000, help="the quickstart's --iters")
    ap.add_argument("--views", type=int, default=2, help="the quickstart's --views")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    compact = out / "cache"
    if not (compact / "manifest.json").is_file() or not (out / "data").is_dir():
        print(f"{out}: no quickstart there (data/, cache/): run `kd-detr quickstart --out {args.out}` first",
              file=sys.stderr)
        return 2
    compact_seed = json.loads((compact / "manifest.json").read_text())["plan"]["seed"]
    if compact_seed != args.cache_seed:
        print(f"{compact}: its views are those of seed {compact_seed}, not --cache-seed {args.cache_seed}; "
              f"pass --cache-seed {compact_seed} so that both caches hold the same views", file=sys.stderr)
        return 2
    teacher_ckpt = load_card(str(shipped_card())).checkpoint_path()
    parallel = QUICKSTART_PARALLEL if (os.cpu_count() or 1) >= QUICKSTART_PARALLEL else 1

    dense = out / "cache_dense"
    summary = build_quickstart_cache(teacher_ckpt, out / "data", dense, args.views, 2, args.cache_seed, progress=True,
                           store=StoreConfig.parse("full", dtype="float32", classes="dense"))
    print(f"dense cache {dense}: {summary['images']} views computed, {summary['images_skipped']} already there")

    runs = {}
    compact_runs = (("d3etr",), "compare_compact") if args.d3etr_only else (("baseline", "d3etr"), "compare")
    for name, cache, recipes, folder in (("compact", compact, *compact_runs),
                                         ("dense", dense, ("d3etr",), "compare_dense")):
        rows, _ = compare(compare_config(out, teacher_ckpt, cache, args.iters, seeds, parallel, recipes=recipes,
                                         compare_dir=folder))
        runs[name] = next(r for r in rows if r["recipe"] == "d3etr")["AP_by_seed"]

    print(f"\nd3etr AP, quickstart ({args.iters} iterations), compact default cache vs dense float32 cache")
    print(f"| seed | compact ({bytes_per_view(compact):,.0f} B/view) | dense ({bytes_per_view(dense):,.0f} B/view) "
          f"| compact - dense | within {TARGET_AP} |")
    print("|---|---|---|---|---|")
    within = True
    for s in seeds:
        c, d = runs["compact"][s], runs["dense"][s]
        ok = abs(c - d) <= TARGET_AP
        within &= ok
        print(f"| {s} | {c:.2f} | {d:.2f} | {c - d:+.2f} | {'yes' if ok else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps({"compact": runs["compact"], "dense": runs["dense"],
                                         "bytes_per_view": {"compact": bytes_per_view(compact),
                                                            "dense": bytes_per_view(dense)}}, indent=1))
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
