"""The real-time students' baseline table: each family's tiny student trained by its own preset against the
``official`` (Conditional DETR) preset, at the quickstart's budget, over seeds.

Every run is one ``kd-detr train`` of ``hf_<family>_tiny`` on the quickstart's data (generated into
``--work`` if absent): batch 8, ``--iters`` iterations, 128-px images, evaluated once at the end (COCOeval on
the 100 validation images). Nothing else is set, so a run gets exactly its preset's values (learning rates,
parameter groups, warm-up, schedule, clipping, EMA); ``official`` is ``--preset official``. Runs are resumable
(``--resume auto``); a finished one is read back, not redone. The two presets of a seed run side by side
(``--parallel 2``, one core each), so a pair shares the host's load.

Prints, and writes to ``WORK/preset_baselines.md``, per family: AP mean ± std over seeds for each preset (and of
the preset run's raw weights beside its EMA), the
paired gain (preset - official, per seed and mean ± std) and the mean step time of each preset.

    python benchmarks/preset_baselines.py --work runs/preset_baselines --seeds 0,1,2
    python benchmarks/preset_baselines.py --families rt_detr --seeds 0,1,2 --iters 2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REALTIME_FAMILIES = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr")


def run_dir(work: Path, family: str, preset: str, seed: int) -> Path:
    return work / "runs" / family / preset / f"seed{seed}"


def train_command(data: Path, out: Path, family: str, preset: str, seed: int, iters: int) -> list[str]:
    """The ``kd-detr train`` command line of one run (``preset``: ``auto`` = the family's own)."""
    return [sys.executable, "-m", "kd_detr", "train", "--model", f"hf_{family}_tiny", "--preset", preset,
            "--data", str(data), "--image-size", "128", "--batch-size", "8", "--max-iters", str(iters),
            "--seed", str(seed), "--num-workers", "1", "--eval-every-epochs", "0", "--eval-every-iters", str(iters),
            "--eval-batch-size", "16", "--checkpoint-every", "500", "--output-dir", str(out), "--resume", "auto",
            "--no-progress"]


def finished(out: Path, iters: int) -> dict | None:
    """The final metrics of a finished run (``metrics.json`` at ``iters``), else ``None``."""
    f = out / "metrics.json"
    if not f.exists():
        return None
    m = json.loads(f.read_text())
    return m if m.get("iteration") == iters else None


def step_time(out: Path) -> float | None:
    """Mean logged iteration time (s) of a run, from its ``log.jsonl``."""
    times = []
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "iter_time" in rec:
            times.append(rec["iter_time"])
    return statistics.mean(times) if times else None


def run_one(data: Path, work: Path, family: str, preset: str, seed: int, iters: int, threads: int) -> dict:
    out = run_dir(work, family, preset, seed)
    if finished(out, iters) is None:
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(out.parent / f"seed{seed}.log", "a") as log:
            rc = subprocess.run(train_command(data, out, family, preset, seed, iters), env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{family} {preset} seed {seed} failed (rc {rc}); see {out.parent}/seed{seed}.log")
    m = finished(out, iters)
    return {"family": family, "preset": preset, "seed": seed, "AP": 100 * m["AP"], "raw_AP": raw_ap(out),
            "step_s": step_time(out)}


def raw_ap(out: Path) -> float | None:
    """AP (%) of the raw weights at the run's last evaluation (``eval_raw/AP``: logged when the run keeps an EMA,
    whose AP is the run's), else ``None``."""
    value = None
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("eval_raw/AP") is not None:
            value = 100 * rec["eval_raw/AP"]
    return value


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def table(rows: list[dict], seeds: list[int]) -> str:
    lines = ["| family | preset AP | preset raw-weights AP | official AP | gain (preset - official) per seed | "
             "gain mean ± std | s / step (preset / official) |", "|---|---|---|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        ap = {(r["preset"], r["seed"]): r for r in rows if r["family"] == family}
        own = [ap[("auto", s)]["AP"] for s in seeds if ("auto", s) in ap]
        raw = [ap[("auto", s)]["raw_AP"] for s in seeds if ("auto", s) in ap and ap[("auto", s)]["raw_AP"] is not None]
        off = [ap[("official", s)]["AP"] for s in seeds if ("official", s) in ap]
        gains = [ap[("auto", s)]["AP"] - ap[("official", s)]["AP"] for s in seeds
                 if ("auto", s) in ap and ("official", s) in ap]
        steps = [statistics.mean([r["step_s"] for (p, _), r in ap.items() if p == preset and r["step_s"]] or [0])
                 for preset in ("auto", "official")]
        lines.append(f"| {family} | {mean_std(own)} | {mean_std(raw)} | {mean_std(off)} | "
                     f"{' / '.join(f'{g:+.1f}' for g in gains)} | "
                     f"{mean_std(gains) if len(gains) > 1 else (f'{gains[0]:+.1f}' if gains else 'n/a')} | "
                     f"{steps[0]:.3f} / {steps[1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/preset_baselines")
    ap.add_argument("--data", default=None, help="the quickstart's data (default: generated into WORK/data)")
    ap.add_argument("--families", default=",".join(REALTIME_FAMILIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time, cores / N threads each")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / parallel)")
    args = ap.parse_args()

    from kd_detr.atomic import write_text_atomic
    from kd_detr.data import generate_synthetic
    from kd_detr.runs.quickstart import QUICKSTART_DATA

    work = Path(args.work)
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        generate_synthetic(data, progress=False, **QUICKSTART_DATA)
    seeds = [int(s) for s in args.seeds.split(",")]
    families = [f for f in args.families.split(",") if f]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    # seed by seed, so a table cut short still pairs every family on the first seeds
    jobs = [(f, p, s) for s in seeds for f in families for p in ("auto", "official")]
    rows = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for row in pool.map(lambda j: run_one(data, work, *j, args.iters, threads), jobs):
            rows.append(row)
            print(f"{row['family']} {row['preset']} seed {row['seed']}: AP {row['AP']:.1f}, "
                  f"{row['step_s']:.3f} s/step", flush=True)
    md = (f"# Real-time tiny students: own preset vs official, {args.iters} iterations, batch 8, seeds {seeds}\n\n"
          f"{table(rows, seeds)}\n\nAP in % (COCOeval bbox, the quickstart's 100 validation images) of the run's "
          "model (the EMA where the preset keeps one; the raw weights' AP beside it); `preset` = `kd-detr train --preset "
          "auto` (the family's "
          f"own), `official` = `--preset official`; {threads} torch thread(s) per run, {args.parallel} at a time.\n")
    write_text_atomic(work / "preset_baselines.md", md)
    print(md)


if __name__ == "__main__":
    main()
