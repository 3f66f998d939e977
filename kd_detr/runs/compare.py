"""``kd-detr compare``: several recipes (and seeds) on one budget, side by side.

Every run is a ``kd-detr distill`` job with the same student, data, budget and seed (so the same
student initialisation and data order), evaluated with pycocotools at regular points. Runs are Ray
tasks (one GPU each when GPUs exist), so a multi-GPU machine or a Ray cluster runs them in parallel;
on a single CPU machine they run one after another. The table and plots are built from what the runs
wrote (``metrics.json``, ``log.jsonl``), never recomputed. A finished run (``result.json``) is not
redone on a rerun; an interrupted one resumes; a failed one is reported as failed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kd_detr.atomic import atomic_write, write_json_atomic, write_text_atomic
from kd_detr.data import DataSpec

log = logging.getLogger("kd_detr.compare")

__all__ = ["CompareConfig", "RunSpec", "compare", "run_one", "summarise", "write_outputs"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class CompareConfig:
    """Everything ``kd-detr compare`` needs (paths as strings: it crosses process boundaries)."""

    student: str
    recipes: list[str]
    out: str
    budget: int
    teacher: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    teacher_cache: Optional[str] = None
    student_overrides: dict[str, Any] = field(default_factory=dict)
    allow_partial_weights: bool = False  # the transformers teacher (the student's is in student_overrides)
    teacher_precision: str = "float32"  # --teacher-precision, every run's teacher (a cache's must match)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)  # --set, applied to every recipe
    data: DataSpec = field(default_factory=DataSpec)  # paths, image-size preset, label map
    eval_points: int = 4  # evaluations per run (at budget / eval_points intervals)
    num_workers: int = 2
    device: str = "auto"
    views: Optional[int] = None
    use_ray: bool = True
    command: list[str] = field(default_factory=lambda: list(sys.argv))  # the user's, for the runs' config.json
    parallel: Optional[int] = None  # CPU machines: runs side by side, the cores shared (default 1: one at a time)
    threads: Optional[int] = None  # torch threads per run (set by run_all from the cores each run gets)
    address: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # from asdict() across a process boundary
            self.data = DataSpec(**self.data)
        # Ray workers run in the directory of `ray start` (on a cluster, not the user's): every path absolute
        self.out = _absolute(self.out)
        self.teacher_checkpoint = _absolute(self.teacher_checkpoint)
        self.teacher_cache = _absolute(self.teacher_cache)
        self.data = dataclasses.replace(self.data, **{k: _absolute(v) for k, v in self.data.paths().items()})
        if not self.recipes:
            raise ValueError("--recipes: give at least one recipe")
        if len(set(self.recipes)) != len(self.recipes):
            raise ValueError(f"--recipes lists a recipe twice: {self.recipes}")
        if self.budget < 1:
            raise ValueError(f"--budget must be >= 1 iteration, got {self.budget}")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.eval_points < 1:
            raise ValueError("eval_points must be >= 1")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {self.parallel}")


@dataclass
class RunSpec:
    recipe: str
    seed: int
    out: str


def run_dir(cfg: CompareConfig, recipe: str, seed: int) -> Path:
    return Path(cfg.out) / "runs" / f"{Path(recipe).stem}" / f"seed{seed}"


def run_one(cfg_dict: dict[str, Any], recipe: str, seed: int) -> dict[str, Any]:
    """One distillation run; returns (and writes ``result.json``) its status and final metrics.

    Never raises for a failing recipe: the failure (error and traceback tail) is the result.
    """
    from .assemble import TeacherSourceSpec, assemble_run

    from kd_detr.engine.run_record import COMMAND_ENV
    from kd_detr.progress import RUN_NAME_ENV

    cfg = CompareConfig(**cfg_dict)
    out = run_dir(cfg, recipe, seed)
    out.mkdir(parents=True, exist_ok=True)
    run_env = {RUN_NAME_ENV: f"{Path(recipe).stem} seed {seed}",  # the run's progress bar label
               COMMAND_ENV: json.dumps(cfg.command)}  # config.json: the user's command, not Ray's worker's
    saved_env = {k: os.environ.get(k) for k in run_env}
    os.environ.update(run_env)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        every = max(1, math.ceil(cfg.budget / cfg.eval_points))
        run = assemble_run(
            cfg.student, recipe, cfg.data,
            TeacherSourceSpec(teacher=cfg.teacher, checkpoint=cfg.teacher_checkpoint, cache=cfg.teacher_cache,
                              allow_partial_weights=cfg.allow_partial_weights, precision=cfg.teacher_precision),
            str(out), student_overrides=cfg.student_overrides,
            overrides=[*cfg.overrides, f"train.max_iters={cfg.budget}", f"train.eval_every_iters={every}",
                       f"train.seed={seed}"],
            train_options={"num_workers": cfg.num_workers, "device": cfg.device, "progress": cfg.progress},
            resume="auto", views=None if cfg.teacher_cache else cfg.views)
        r = run.recipe
        metrics = run.run()
        result = {"recipe": r.name, "seed": seed, "status": "ok", "seconds": time.perf_counter() - t0,
                  "metrics": {k: metrics.get(k) for k in METRICS}, "iteration": metrics.get("iteration")}
    except Exception as e:  # noqa: BLE001 - a failed recipe is a row in the table, not a crash
        log.error("run %s seed %d failed: %s", recipe, seed, e)
        result = {"recipe": Path(recipe).stem, "seed": seed, "status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:], "seconds": time.perf_counter() - t0}
    finally:  # a run in this process (--no-ray) must not label what comes after it
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    write_json_atomic(out / "result.json", result)
    return result


def _load_result(cfg: CompareConfig, recipe: str, seed: int) -> Optional[dict[str, Any]]:
    p = run_dir(cfg, recipe, seed) / "result.json"
    if p.exists():
        r = json.loads(p.read_text())
        if r.get("status") == "ok":
            return r
    return None


def _gpus_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def run_all(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run (or reuse) every recipe x seed; Ray tasks when ``cfg.use_ray``."""
    todo, done = [], []
    for recipe in cfg.recipes:
        for seed in cfg.seeds:
            prev = _load_result(cfg, recipe, seed)
            if prev is not None:
                log.info("run %s seed %d finished earlier: not redone", recipe, seed)
                done.append(prev)
            else:
                todo.append((recipe, seed))
    cfg_dict = asdict(cfg)
    if not todo:
        return done
    if not cfg.use_ray:
        return done + [run_one(cfg_dict, r, s) for r, s in todo]
    import ray

    from kd_detr.teacher.ray_session import ensure_ray, shutdown_ray

    started = ensure_ray(cfg.address)
    try:
        resources = ray.cluster_resources()
        gpu = _gpus_available() and resources.get("GPU", 0) >= 1
        if gpu:  # one GPU per run: as many at once as the cluster has GPUs
            cpus = 1
        else:  # a CPU machine: `parallel` runs at once, sharing the cores (default: one at a time, all cores)
            total = max(1, int(resources.get("CPU", 1)))
            parallel = max(1, min(cfg.parallel or 1, len(todo), total))
            # a run is one task on one node: never ask for more CPUs than the largest node has (a cluster
            # of small nodes would leave the task pending forever)
            largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=total)
            cpus = max(1, min(total // parallel, largest))
            cfg_dict = {**cfg_dict, "threads": cpus}
            log.info("%d run(s) at a time, %d CPU thread(s) each", parallel, cpus)
        task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=cpus, max_retries=0)(run_one)
        refs = [task.remote(cfg_dict, r, s) for r, s in todo]
        return done + ray.get(refs)
    finally:
        shutdown_ray(started)


def _absolute(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute against this process's working directory (``None`` stays ``None``)."""
    return None if path is None else str(Path(path).expanduser().absolute())


# --------------------------------------------------------------------------- reading the runs
def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(cfg: CompareConfig, results: list[dict[str, Any]], teacher_ap: Optional[dict[str, float]] = None
              ) -> list[dict[str, Any]]:
    """One row per recipe from the runs' own files: metrics (mean, std over seeds), step time, memory."""
    rows = []
    for recipe in cfg.recipes:
        name = Path(recipe).stem
        runs = [r for r in results if r["recipe"] == name or r["recipe"] == recipe]
        ok = [r for r in runs if r["status"] == "ok"]
        row: dict[str, Any] = {"recipe": name, "runs": len(runs), "ok": len(ok),
                               "failed": [f"seed {r['seed']}: {r.get('error')}" for r in runs if r["status"] != "ok"]}
        per_seed: dict[int, dict[str, Any]] = {}
        for r in ok:
            per_seed[r["seed"]] = json.loads((run_dir(cfg, recipe, r["seed"]) / "metrics.json").read_text())
        for m in METRICS:
            # COCOeval reports -1 when the validation set has no object of an area range (APl without large
            # objects): no value, not -100
            vals = [100 * mt[m] for mt in per_seed.values() if mt.get(m) is not None and mt[m] >= 0]
            row[m], row[m + "_std"] = _mean_std(vals)
        row["AP_by_seed"] = {seed: 100 * mt["AP"] for seed, mt in per_seed.items() if mt.get("AP", -1) >= 0}
        step, mem = [], []
        for r in ok:
            logs = [x for x in _read_log(run_dir(cfg, recipe, r["seed"]) / "log.jsonl") if "iter_time" in x]
            if logs:
                step.append(statistics.fmean(x["iter_time"] for x in logs))
                mem.append(max(x["peak_mem_mb"] for x in logs))
        row["step_s"], _ = _mean_std(step)
        row["peak_mem_mb"] = max(mem) if mem else None
        rows.append(row)
    base = next((r for r in rows if r["recipe"] == "baseline" and r["AP"] is not None), None)
    for row in rows:
        # paired gains: each seed against the baseline of the same seed (same initialisation, data order, views)
        gains = {seed: ap - base["AP_by_seed"][seed] for seed, ap in row["AP_by_seed"].items()
                 if base and seed in base["AP_by_seed"]}
        row["gain_by_seed"] = gains
        row["gain_AP"], row["gain_AP_std"] = _mean_std(list(gains.values()))
        row["teacher_AP"] = (100 * teacher_ap["AP"]) if teacher_ap else None
    return rows


def _fmt(v: Any, std: Any = None, digits: int = 1, none: str = "-", sign: bool = False) -> str:
    if v is None:
        return none
    s = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    if std is not None:
        s += f" ± {std:.{digits}f}"
    return s


def format_table(rows: list[dict[str, Any]], seeds: int) -> str:
    head = ["recipe", *METRICS, "gain AP vs baseline", "s / step", "peak mem (MB)", "teacher AP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['recipe']} | failed: {'; '.join(r['failed'])[:200]} |" + " |" * (len(head) - 2))
            continue
        multi = seeds > 1
        gain = _fmt(r["gain_AP"], r["gain_AP_std"] if multi else None, sign=True)
        cells = [r["recipe"], *(_fmt(r[m], r[m + "_std"] if multi else None, none="n/a") for m in METRICS), gain,
                 _fmt(r["step_s"], digits=3), _fmt(r["peak_mem_mb"], digits=0), _fmt(r["teacher_AP"])]
        if r["failed"]:
            cells[0] += f" ({len(r['failed'])} failed)"
        lines.append("| " + " | ".join(cells) + " |")
    if seeds > 1:
        lines += ["", format_paired_gains(rows)]
    return "\n".join(lines)


def format_paired_gains(rows: list[dict[str, Any]]) -> str:
    """AP gain over ``baseline`` per seed (each run against the baseline run of the same seed)."""
    seeds = sorted({s for r in rows for s in r.get("gain_by_seed", {})})
    head = ["paired AP gain vs baseline", *[f"seed {s}" for s in seeds], "mean ± std"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["recipe"] == "baseline" or not r.get("gain_by_seed"):
            continue
        g = r["gain_by_seed"]
        cells = [r["recipe"], *(_fmt(g.get(s), sign=True) for s in seeds), _fmt(r["gain_AP"], r["gain_AP_std"], sign=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method_totals(cfg: CompareConfig) -> list[str]:
    """The methods' whole objectives (``<group>.total``: ``distill.total``, ``teach_detr.total`` ...) that some
    run of the comparison logged, in registration order (``distill.total`` when none did)."""
    from kd_detr.methods import list_methods

    logged = set()
    for recipe in cfg.recipes:
        for seed in cfg.seeds:
            for rec in _read_log(run_dir(cfg, recipe, seed) / "log.jsonl"):
                logged.update(k for k in rec if k.endswith(".total"))
    totals = list(dict.fromkeys(f"{cls.group()}.total" for cls in list_methods().values()))
    return [k for k in totals if k in logged] or ["distill.total"]


def _plot(cfg: CompareConfig, path: Path, keys: list[str], ylabel: str, title: str, scale: float = 1.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for recipe in cfg.recipes:
            curves = []  # one {iteration: value} per seed
            for seed in cfg.seeds:
                recs = [x for x in _read_log(run_dir(cfg, recipe, seed) / "log.jsonl") if x.get(key) is not None]
                if recs:
                    curves.append({x["iteration"]: scale * x[key] for x in recs})
            if not curves:
                continue
            # mean over seeds, and the band from the lowest to the highest seed where all seeds logged
            its = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.fmean(c[i] for c in curves) for i in its]
            line, = ax.plot(its, mean, label=Path(recipe).stem + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""),
                            marker="o" if key.startswith("eval/") else None, markersize=3)
            if len(curves) > 1:
                ax.fill_between(its, [min(c[i] for c in curves) for i in its], [max(c[i] for c in curves) for i in its],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel if len(keys) == 1 else key)
        ax.set_title(title if len(keys) == 1 else key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel no run logged stays empty, without a legend warning
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_outputs(cfg: CompareConfig, rows: list[dict[str, Any]]) -> dict[str, Path]:
    out = Path(cfg.out)
    table = format_table(rows, len(cfg.seeds))
    md = (f"# kd-detr compare: {cfg.student}, budget {cfg.budget} iterations, seeds {cfg.seeds}\n\n{table}\n\n"
          "AP in %, COCOeval bbox on the validation set at the end of the budget (mean ± std over seeds; n/a: "
          "the validation set has no object of that size). Gains are paired: each seed against the baseline "
          "of the same seed. s / step: mean iteration time from the run logs; peak mem: process peak. "
          "Plots: mean over seeds, the band spans the lowest to the highest seed.\n")
    write_text_atomic(out / "comparison.md", md)
    buf = io.StringIO()
    fields = ["recipe", "runs", "ok", *[x for m in METRICS for x in (m, m + "_std")], "gain_AP", "gain_AP_std",
              *[f"gain_AP_seed{s}" for s in cfg.seeds], "step_s", "peak_mem_mb", "teacher_AP", "failed"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, **{f"gain_AP_seed{s}": g for s, g in r.get("gain_by_seed", {}).items()},
                    "failed": "; ".join(r["failed"])})
    write_text_atomic(out / "comparison.csv", buf.getvalue())
    _plot(cfg, out / "ap_curve.png", ["eval/AP"], "AP (%)", "AP during training", scale=100)
    _plot(cfg, out / "losses.png", ["loss", "student.total", *_method_totals(cfg)], "loss", "loss terms")
    return {"markdown": out / "comparison.md", "csv": out / "comparison.csv", "ap_plot": out / "ap_curve.png",
            "loss_plot": out / "losses.png"}


def evaluate_teacher(cfg: CompareConfig) -> Optional[dict[str, float]]:
    """The teacher's own AP on the comparison's validation set (None without teacher weights)."""
    if not cfg.teacher:
        return None
    from kd_detr.engine.trainer import resolve_device
    from kd_detr.evaluation import eval_loader, evaluate_model
    from kd_detr.teacher import load_teacher, resolve_teacher

    data = cfg.data
    lm = data.train_label_map()
    val = data.val_set(lm, log_report=False)
    model, _, _ = load_teacher(resolve_teacher(cfg.teacher, cfg.teacher_checkpoint, cfg.allow_partial_weights,
                                               cfg.teacher_precision), lm)
    result, _ = evaluate_model(model, eval_loader(val, batch_size=2), val.coco, lm, resolve_device(cfg.device),
                               progress=False)
    return result.metrics


GALLERY_SCORE_THRESHOLD = 0.3  # detections drawn in gallery.png


def write_gallery(cfg: CompareConfig) -> Optional[Path]:
    """``OUT/gallery.png``: the first validation images (image-id order), one row each; columns ground truth |
    teacher | each recipe's model at the end of the budget (the first seed's run), detections scoring at least
    :data:`GALLERY_SCORE_THRESHOLD`. A recipe whose run has no final model shows n/a. ``None`` without
    validation data."""
    from kd_detr.data.images import read_image
    from kd_detr.engine.trainer import resolve_device
    from kd_detr.runs.inference import load_detector
    from kd_detr.teacher import load_teacher, resolve_teacher

    from .pictures import GALLERY_IMAGES, ground_truth, predict_items
    from .pictures import write_gallery as draw_gallery

    data, device = cfg.data, resolve_device(cfg.device)
    lm = data.train_label_map()
    val = data.val_set(lm, log_report=False)
    if len(val) == 0:
        return None
    order = sorted(range(len(val)), key=lambda i: val._records[i].image_id)[:GALLERY_IMAGES]
    images = [read_image(val.img_dir / val._records[i].file_name) for i in order]
    columns = [("ground truth", ground_truth(val, order, lm))]
    if cfg.teacher:
        teacher, _, _ = load_teacher(resolve_teacher(cfg.teacher, cfg.teacher_checkpoint, cfg.allow_partial_weights,
                                                     cfg.teacher_precision), lm)
        columns.append((f"teacher ({cfg.teacher})", predict_items(teacher.to(device).eval(), val, order, lm, device)))
    seed = cfg.seeds[0]
    for recipe in cfg.recipes:
        final = run_dir(cfg, recipe, seed) / "model_final.safetensors"
        if final.is_file():
            model, _, _ = load_detector(final, device=device)
            columns.append((Path(recipe).stem, predict_items(model, val, order, lm, device)))
        else:
            columns.append((Path(recipe).stem, [None] * len(order)))
    return draw_gallery(Path(cfg.out) / "gallery.png", images, columns, GALLERY_SCORE_THRESHOLD,
                        title=f"{cfg.student}, seed {seed}, {cfg.budget} iterations: detections scoring >= "
                              f"{GALLERY_SCORE_THRESHOLD}")


def compare(cfg: CompareConfig) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run everything, then write ``comparison.md``/``.csv``, the plots and the gallery into ``cfg.out``."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(cfg.out) / "compare_config.json", asdict(cfg))
    results = run_all(cfg)
    teacher_file = Path(cfg.out) / "teacher_eval.json"
    if teacher_file.exists():
        teacher_ap = json.loads(teacher_file.read_text())
    else:
        teacher_ap = evaluate_teacher(cfg)
        if teacher_ap is not None:
            write_json_atomic(teacher_file, teacher_ap)
    rows = summarise(cfg, results, teacher_ap)
    files = write_outputs(cfg, rows)
    gallery = write_gallery(cfg)
    if gallery is not None:
        files["gallery"] = gallery
    return rows, files
