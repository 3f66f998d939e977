"""Cost of a distillation recipe's training step against the baseline, measured side by side in one run.

    python benchmarks/distill_step.py --teacher cond_detr_r18_tiny --student cond_detr_r10_tiny --size 128x128 --batch 8
    python benchmarks/distill_step.py --teacher cond_detr_r101 --student cond_detr_r50 --size 800x1066 --batch 8   # GPU
    python benchmarks/distill_step.py --recipe d3etr_teach --no-memory     # any recipe that uses a teacher

Per round, in this order: a baseline step (student alone: forward + GT loss + backward + AdamW),
a teacher forward (eval, no grad, attention maps as the recipe needs them) and the recipe's step (teacher
forward + student with what the recipe's methods ask, e.g. D3ETR's auxiliary group, + GT and method losses
+ backward + AdamW over the student and the methods' own modules). ``--recipe`` is any recipe name or
``.toml`` path whose methods use a teacher (default ``d3etr``; ``d3etr_teach`` adds Teach-DETR's teacher-box
targets); its enabled methods are built as the trainer builds them (``build_methods``). Teach-DETR's
targets are the teacher's ``--teach-targets`` (default 7) most confident boxes per image, as in
``benchmarks/hf_distill_step.py`` (a random teacher passes no score threshold). The figures keep the
``d3etr`` names whatever the recipe. A ``[distill]`` recipe with the identity layer map between a teacher and
a student of different depths (the default tiny pair has 3 and 2 decoder layers) runs with
``distill.layer_map = "uniform"`` (said on stderr; the same cost), unless ``--set`` gives the layer map.
Medians over the rounds. Reported:

* ``d3etr / (baseline + teacher)`` step-time ratio (target <= 1.35);
* the share of the d3etr step spent in D3ETR's matchings when the recipe has ``[distill]`` (adaptive
  teacher-student Hungarian, and all extra matchings: adaptive + the auxiliary group's GT and the teacher's
  GT assignment), target < 5%;
* peak memory ratio ``d3etr / (baseline + teacher)`` (target <= 1.35). On CUDA: peak allocated
  memory of each phase (``max_memory_allocated`` after a reset; the teacher's includes its weights).
  On the CPU: each phase runs in a fresh subprocess and reports its peak RSS minus the RSS after
  imports, so the interpreter and libraries are not counted twice.

Random weights and random ground truth: timing does not depend on the values. 300x300 matchings at
R50 scale: batch 8 x 6 layers x 2 = 96 Hungarian solves per step on the adaptive side alone... (48
adaptive + the GT ones; see methods.md 2.6).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings (train_step, hf_distill_step) by name

from kd_detr.criterion import SetCriterion, weighted_total
from kd_detr.engine.recipe import load_recipe
from kd_detr.engine.step import batch_losses
from kd_detr.engine.optim import param_groups
from kd_detr.methods import build_methods
from kd_detr.teacher import InProcessTeacher
from kd_detr.models import build_model

from train_step import random_targets  # the same random ground truth as the plain step benchmark
from hf_distill_step import TEACH_TARGETS, timing_overrides  # Teach-DETR's targets from a random teacher

ATTN_ORDER = ("none", "mean", "per_head")  # a forward with more maps serves a method that asks for fewer


def load_bench_recipe(args, student_layers: int, teacher_layers: int):
    """The recipe, with the timing overrides (:func:`hf_distill_step.timing_overrides`) under ``--set``.

    A recipe with ``[distill]``'s identity layer map between a teacher and a student of different depths (the
    default tiny pair: 3 -> 2 decoder layers) gets ``distill.layer_map = "uniform"`` (said on stderr) unless
    ``--set`` gives the layer map: the step costs the same, and the D3ETR recipes run on any pair."""
    sets = [f"{k}={v}" for k, v in timing_overrides(getattr(args, "teach_targets", TEACH_TARGETS)).items()]
    recipe = load_recipe(args.recipe, [*sets, *args.set])
    if not recipe.distils:
        raise SystemExit(f"recipe {args.recipe}: none of its methods uses a teacher; nothing to measure here "
                         "(benchmarks/train_step.py times the student alone)")
    d = recipe.sections.get("distill")
    if (d is not None and d.enabled and d.layer_map == "identity" and student_layers != teacher_layers
            and not any(x.startswith("distill.layer_map=") for x in args.set)):
        print(f"distill_step.py: {args.recipe}: teacher {teacher_layers} and student {student_layers} decoder "
              "layers: distill.layer_map = \"uniform\" for this run", file=sys.stderr)
        recipe = load_recipe(args.recipe, [*sets, *args.set, 'distill.layer_map="uniform"'])
    return recipe


def recipe_methods(recipe, student_cfg, teacher_cfg, criterion) -> list:
    """The recipe's enabled methods, as the trainer builds them."""
    return build_methods(recipe.sections, student_cfg, criterion, teacher=lambda: teacher_cfg)


def teacher_attn(methods) -> str:
    """The teacher attention maps the methods need (the most any of them asks)."""
    modes = {m.teacher_attention() for m in methods if m.uses_teacher}
    return max(modes or {"none"}, key=ATTN_ORDER.index)


def needs_features(methods) -> bool:
    """Whether a method needs the teacher's encoder feature maps (feature distillation)."""
    return any(getattr(m, "teacher_features", lambda: False)() for m in methods if m.uses_teacher)


def teacher_kwargs(methods) -> dict:
    """``InProcessTeacher`` keywords for the methods: attention maps, and encoder maps only when asked."""
    return {"attn": teacher_attn(methods), **({"features": True} if needs_features(methods) else {})}


class Bench:
    def __init__(self, args):
        self.args, dev = args, args.device
        torch.manual_seed(0)
        self.student = build_model(args.student).to(dev).train()
        self.teacher_model = build_model(args.teacher).to(dev)
        nc = self.student.config.num_classes
        self.recipe = load_bench_recipe(args, self.student.config.dec_layers, self.teacher_model.config.dec_layers)
        self.criterion = SetCriterion(nc, num_dec_layers=self.student.config.dec_layers)
        self.methods = [m.to(dev) for m in recipe_methods(self.recipe, self.student.config,
                                                          self.teacher_model.config, self.criterion)]
        self.kd = next((m for m in self.methods if hasattr(m, "match_seconds")), None)  # D3ETR, if any
        self.teacher = InProcessTeacher(self.teacher_model, **teacher_kwargs(self.methods))
        params = param_groups(self.student, 1e-4, 1e-5, 1e-4)
        for m in self.methods:  # as the trainer does: the methods' own modules beside the student
            for name, mod in m.trainable_modules().items():
                trainable = [p for p in mod.parameters() if p.requires_grad]
                if trainable:
                    params.append({"params": trainable, "lr": 1e-4, "weight_decay": 1e-4, "name": name})
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(0)
        h, w = args.hw
        self.images = torch.randn(args.batch, 3, h, w, generator=gen).to(dev)
        self.mask = torch.zeros(args.batch, h, w, dtype=torch.bool, device=dev)
        self.targets = [{k: v.to(dev) for k, v in t.items()} for t in random_targets(args.batch, nc, gen)]

    def sync(self):
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
        self.opt.step()

    def baseline_step(self):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.args.amp):
            out = self.student(self.images, self.mask)
            loss = weighted_total(self.criterion(out, self.targets), self.criterion.weight_dict)
        self._update(loss)

    def teacher_forward(self):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.args.amp):
            self.teacher(self.images, self.mask)

    def d3etr_step(self):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.args.amp):
            teacher_out = self.teacher(self.images, self.mask)
            total, _, _, _ = batch_losses(self.student, self.criterion, self.images, self.mask, self.targets,
                                          self.methods, teacher_out)
        self._update(total)

    def reset_matching(self):
        if self.kd is not None:
            self.kd.match_seconds = {"adaptive": 0.0, "gt": 0.0}

    def matching(self) -> dict[str, float]:
        return dict(self.kd.match_seconds) if self.kd is not None else {"adaptive": 0.0, "gt": 0.0}

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def time_phases(args) -> dict:
    b = Bench(args)
    times = {"baseline": [], "teacher": [], "d3etr": [], "adaptive_match": [], "all_match": []}
    for i in range(args.warmup + args.rounds):
        tb = b.timed(b.baseline_step)
        tt = b.timed(b.teacher_forward)
        b.reset_matching()
        td = b.timed(b.d3etr_step)
        if i >= args.warmup:
            match = b.matching()
            times["baseline"].append(tb)
            times["teacher"].append(tt)
            times["d3etr"].append(td)
            times["adaptive_match"].append(match["adaptive"])
            times["all_match"].append(sum(match.values()))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["rounds"] = args.rounds
    med["has_matching"] = b.kd is not None
    return med


def proc_status_mb(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident set of this process, in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_phase(args, phase: str) -> float:
    """Peak memory (MB) of one phase, in this process: 2 repetitions of the phase."""
    dev = args.device
    if dev.startswith("cuda"):
        b = Bench(args) if phase != "teacher" else None
        if phase == "teacher":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = build_model(args.teacher).to(dev)
            t = InProcessTeacher(model, **load_teacher_kwargs(args))
            gen = torch.Generator().manual_seed(0)
            images = torch.randn(args.batch, 3, *args.hw, generator=gen).to(dev)
            mask = torch.zeros(args.batch, *args.hw, dtype=torch.bool, device=dev)
            for _ in range(2):
                with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
                    t(images, mask)
            return torch.cuda.max_memory_allocated() / 2**20
        # baseline / d3etr: the student, its optimizer state and the step's activations (+ teacher for d3etr)
        if phase == "baseline":
            del b.teacher_model, b.teacher  # not part of the baseline
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            (b.baseline_step if phase == "baseline" else b.d3etr_step)()
        return torch.cuda.max_memory_allocated() / 2**20
    # CPU: a fresh process per phase; peak RSS minus the RSS after imports
    cmd = [sys.executable, __file__, "--_memory-phase", phase] + args.passthrough
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def load_teacher_kwargs(args) -> dict:
    s, t = build_model(args.student).config, build_model(args.teacher).config
    r = load_bench_recipe(args, s.dec_layers, t.dec_layers)
    return teacher_kwargs(recipe_methods(r, s, t, SetCriterion(s.num_classes, num_dec_layers=s.dec_layers)))


def cpu_memory_child(args, phase: str) -> None:
    base = proc_status_mb("VmRSS")  # after imports: the interpreter and libraries
    if phase == "teacher":
        model = build_model(args.teacher)
        t = InProcessTeacher(model, **load_teacher_kwargs(args))
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, 3, *args.hw, generator=gen)
        mask = torch.zeros(args.batch, *args.hw, dtype=torch.bool)
        for _ in range(2):
            t(images, mask)
    else:
        b = Bench(args)
        if phase == "baseline":
            del b.teacher_model, b.teacher
        for _ in range(2):
            (b.baseline_step if phase == "baseline" else b.d3etr_step)()
    print(proc_status_mb("VmHWM") - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="cond_detr_r18_tiny")
    ap.add_argument("--student", default="cond_detr_r10_tiny")
    ap.add_argument("--recipe", default="d3etr", help="any recipe name or .toml path that uses a teacher")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--teach-targets", type=int, default=TEACH_TARGETS,
                    help=f"teacher boxes per image for Teach-DETR (default {TEACH_TARGETS}; 0: the recipe's threshold)")
    ap.add_argument("--size", default="128x128", help="HxW of the input batch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--_memory-phase", dest="memory_phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.hw = tuple(int(x) for x in args.size.split("x"))
    args.amp = args.amp and args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.passthrough = [a for a in sys.argv[1:]]
    if args.memory_phase:
        cpu_memory_child(args, args.memory_phase)
        return

    t = time_phases(args)
    has_matching = t.pop("has_matching")
    res = {"teacher": args.teacher, "student": args.student, "recipe": args.recipe, "size": args.size,
           "batch": args.batch, "device": args.device, "amp": args.amp,
           "threads": torch.get_num_threads(), **{f"{k}_s": v for k, v in t.items() if k != "rounds"},
           "rounds": t["rounds"], "teach_targets": args.teach_targets}
    res["time_ratio"] = t["d3etr"] / (t["baseline"] + t["teacher"])
    res["adaptive_match_share"] = t["adaptive_match"] / t["d3etr"]
    res["all_match_share"] = t["all_match"] / t["d3etr"]
    if not args.no_memory:
        mem = {p: memory_phase(args, p) for p in ("baseline", "teacher", "d3etr")}
        res.update({f"mem_{k}_mb": v for k, v in mem.items()})
        res["mem_ratio"] = mem["d3etr"] / (mem["baseline"] + mem["teacher"])
    print(f"## Distillation step cost: {args.teacher} -> {args.student}, {args.size}, batch {args.batch}, "
          f"{args.device}{' amp' if args.amp else ''}, recipe {args.recipe}, median of {args.rounds} rounds")
    print(f"| baseline step | teacher fwd | {args.recipe} step | step/(baseline+teacher) | adaptive matching | "
          "all extra matchings |")
    print("|---|---|---|---|---|---|")
    shares = (f"{100 * res['adaptive_match_share']:.1f}% | {100 * res['all_match_share']:.1f}%" if has_matching
              else "- | -")
    print(f"| {t['baseline']:.3f} s | {t['teacher']:.3f} s | {t['d3etr']:.3f} s | {res['time_ratio']:.2f}x | "
          f"{shares} |")
    if not args.no_memory:
        print(f"\npeak memory (MB): baseline {mem['baseline']:.0f}, teacher {mem['teacher']:.0f}, "
              f"d3etr {mem['d3etr']:.0f}; d3etr/(baseline+teacher) = {res['mem_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
