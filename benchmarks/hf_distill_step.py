"""Cost of a cross-family D3ETR step with a transformers student, side by side in one run.

    python benchmarks/hf_distill_step.py --size 128x128 --batch 8
    python benchmarks/hf_distill_step.py --size 128x128 --batch 8 --rounds 5 --warmup 2 --json hf_distill.json

Two teacher -> student pairs, both distilled with ``recipes/d3etr_cross_family.toml`` (Adaptive Matching +
prediction KD, uniform layer map, no Fixed Matching, no attention KD):

* ``rt_detr -> rt_detr``: a bigger random-init ``hf_rt_detr_tiny`` teacher (:data:`RT_TEACHER`: d_model 64,
  6 decoder layers, 60 queries) -> ``hf_rt_detr_tiny`` student (3 decoder layers, 30 queries);
* ``cond_detr -> rt_detr``: kd-detr's ``cond_detr_r10_tiny`` (2 decoder layers, 30 queries) -> the same
  ``hf_rt_detr_tiny`` student.

Per round and per pair, in this order (every variant on the same images, mask and targets):

* ``baseline``: the student alone: training forward with ``targets=`` (its ground-truth loss is the
  family's own, computed by transformers inside the forward: :class:`FamilyLossCriterion`) + backward +
  clip 0.1 + AdamW over kd-detr's ``param_groups`` (the official preset's);
* ``teacher``: the teacher forward (eval, no grad, ``InProcessTeacher(teacher, attn="none")``);
* ``d3etr``: teacher forward in process + the student step with GT and D3ETR losses (``batch_losses``);
* ``from_cache``: the same d3etr step, its teacher outputs decoded from a cache entry. The entry is made
  outside the timer (a teacher forward, the teacher's last-layer Hungarian GT assignment, as the cache
  builder computes it, and ``encode_batch`` with the default ``StoreConfig``: float16, attention none);
  inside the timer: ``decode_batch`` + moving it to the device + the step.

Medians over the rounds (after ``--warmup`` rounds). Reported per pair:

* ``d3etr / (baseline + teacher)`` (target <= 1.35);
* ``from_cache / baseline`` (target <= 1.25);
* the share of the d3etr step spent in matchings (adaptive teacher-student Hungarian + teacher GT).

Random weights and ``random_targets`` ground truth (timing does not depend on the values);
``torch.manual_seed`` fixed. Prints a Markdown table and, with ``--json``, writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from kd_detr.criterion import FamilyLossCriterion, SetCriterion  # noqa: E402
from kd_detr.engine.recipe import load_recipe  # noqa: E402
from kd_detr.engine.step import batch_losses  # noqa: E402
from kd_detr.engine.optim import param_groups  # noqa: E402
from kd_detr.matcher import HungarianMatcher, indices_to_assignment  # noqa: E402
from kd_detr.methods import build_methods  # noqa: E402
from kd_detr.models import build_model  # noqa: E402
from kd_detr.models.hf.registry import is_hf_name  # noqa: E402
from kd_detr.teacher import InProcessTeacher  # noqa: E402
from kd_detr.teacher.cache.attention_codec import StoreConfig, decode_batch, encode_batch  # noqa: E402

from train_step import random_targets  # noqa: E402  - the same random ground truth as the plain step benchmark

NUM_CLASSES = 5  # the tiny transformers configs' label count; teacher and student share one label map
RECIPE = "d3etr_cross_family"
RT_TEACHER = {"d_model": 64, "encoder_hidden_dim": 64, "decoder_in_channels": [64, 64, 64],
              "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "decoder_layers": 6, "num_queries": 60}
STUDENT = ("hf_rt_detr_tiny", {"num_queries": 30})
PAIRS = {  # name -> (teacher, teacher overrides), (student, student overrides)
    "rt_detr -> rt_detr": (("hf_rt_detr_tiny", RT_TEACHER), STUDENT),
    "cond_detr -> rt_detr": (("cond_detr_r10_tiny", {}), STUDENT),
}
PHASES = ("baseline", "teacher", "d3etr", "from_cache")


def _build(name: str, overrides: dict, hw: tuple[int, int]):
    extra = {"input_size": max(hw)} if is_hf_name(name) else {}  # fixed-size families: the square input side
    return build_model(name, num_classes=NUM_CLASSES, **extra, **overrides)


def _criterion(model):
    if getattr(model, "own_loss", False):  # transformers families: their own loss, inside their forward
        return FamilyLossCriterion(NUM_CLASSES, model.family_loss_weights, matcher=HungarianMatcher())
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), num_dec_layers=model.config.dec_layers)


class PairBench:
    """Baseline / teacher / d3etr / from-cache steps of one teacher -> student pair on one batch."""

    def __init__(self, args, teacher: tuple[str, dict], student: tuple[str, dict], batch):
        self.args, dev = args, args.device
        torch.manual_seed(0)
        self.student = _build(*student, args.hw).to(dev).train()
        torch.manual_seed(1)
        self.teacher_model = _build(*teacher, args.hw).to(dev)
        self.criterion = _criterion(self.student)
        recipe = load_recipe(RECIPE)
        self.methods = [m.to(dev) for m in build_methods(recipe.sections, self.student.config, self.criterion,
                                                         teacher=lambda: self.teacher_model.config)]
        modes = {m.teacher_attention() for m in self.methods if m.uses_teacher}
        assert modes == {"none"}, f"{RECIPE} should need no teacher attention, its methods ask {modes}"
        self.kd = next(m for m in self.methods if hasattr(m, "match_seconds"))
        self.teacher = InProcessTeacher(self.teacher_model, attn="none")
        groups = param_groups(self.student, 1e-4, 1e-5, 1e-4)
        for m in self.methods:  # as the trainer does: the methods' own modules beside the student
            for name, mod in m.trainable_modules().items():
                params = [p for p in mod.parameters() if p.requires_grad]
                if params:
                    groups.append({"params": params, "lr": 1e-4, "weight_decay": 1e-4, "name": name})
        self.opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
        self.images, self.mask, self.targets = batch
        self.store = StoreConfig()  # the cache's default: float16, attention none
        self.gt_matcher = HungarianMatcher()  # the cache builder's teacher GT matching (default costs)
        self.index = torch.arange(args.batch, dtype=torch.int64)
        self.entry = self.query_embed = None

    def sync(self):
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.args.amp)

    def _update(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
        self.opt.step()

    def _step(self, methods=(), teacher_out=None):
        with self._autocast():
            total, *_ = batch_losses(self.student, self.criterion, self.images, self.mask, self.targets,
                                     methods, teacher_out)
        self._update(total)

    # ---- the timed phases
    def baseline(self):
        self._step()

    def teacher_forward(self):
        with self._autocast():
            self.teacher(self.images, self.mask)

    def d3etr(self):
        with self._autocast():
            teacher_out = self.teacher(self.images, self.mask)
        self._step(self.methods, teacher_out)

    def from_cache(self):
        teacher_out = decode_batch(self.entry, self.store, self.query_embed).to(self.args.device)
        self._step(self.methods, teacher_out)

    # ---- untimed: the cache entry of this batch, as the cache builder writes it
    @torch.no_grad()
    def make_entry(self):
        with self._autocast():
            res = self.teacher(self.images, self.mask)
        idx = self.gt_matcher({"pred_logits": res.logits[-1].float(), "pred_boxes": res.boxes[-1].float()},
                              self.targets)
        res.gt_assignment = indices_to_assignment(idx, res.num_queries)
        self.entry = {k: v.cpu() for k, v in encode_batch(res, self.index, self.store).items()}
        self.query_embed = res.query_embed.float().cpu()  # stored once per cache (queries.safetensors)

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def run(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, w = args.hw
    images = torch.randn(args.batch, 3, h, w, generator=gen).to(args.device)
    mask = torch.zeros(args.batch, h, w, dtype=torch.bool, device=args.device)
    targets = [{k: v.to(args.device) for k, v in t.items()} for t in random_targets(args.batch, NUM_CLASSES, gen)]
    benches = {name: PairBench(args, t, s, (images, mask, targets)) for name, (t, s) in PAIRS.items()}
    times = {name: {k: [] for k in (*PHASES, "matching")} for name in benches}
    for i in range(args.warmup + args.rounds):
        for name, b in benches.items():  # rounds outside, pairs inside: drift hits both pairs alike
            tb = b.timed(b.baseline)
            tt = b.timed(b.teacher_forward)
            b.kd.match_seconds = {"adaptive": 0.0, "gt": 0.0}
            td = b.timed(b.d3etr)
            tm = sum(b.kd.match_seconds.values())
            b.make_entry()  # outside the timer
            tc = b.timed(b.from_cache)
            if i >= args.warmup:
                for k, v in zip((*PHASES, "matching"), (tb, tt, td, tc, tm)):
                    times[name][k].append(v)
    res = {"recipe": RECIPE, "size": args.size, "batch": args.batch, "device": args.device, "amp": args.amp,
           "threads": torch.get_num_threads(), "rounds": args.rounds, "warmup": args.warmup,
           "store": StoreConfig().describe(), "pairs": {}}
    for name, b in benches.items():
        med = {k: statistics.median(v) for k, v in times[name].items()}
        (tn, to), (sn, so) = PAIRS[name]
        tc, sc = b.teacher_model.config, b.student.config
        res["pairs"][name] = {
            "teacher": tn, "teacher_overrides": to, "student": sn, "student_overrides": so,
            "teacher_layers": tc.dec_layers, "teacher_queries": tc.num_queries,
            "student_layers": sc.dec_layers, "student_queries": sc.num_queries,
            **{f"{k}_s": v for k, v in med.items()},
            "d3etr_over_baseline_plus_teacher": med["d3etr"] / (med["baseline"] + med["teacher"]),
            "from_cache_over_baseline": med["from_cache"] / med["baseline"],
            "matching_share_of_d3etr": med["matching"] / med["d3etr"],
        }
        r = res["pairs"][name]
        r["d3etr_target_met"] = r["d3etr_over_baseline_plus_teacher"] <= 1.35
        r["from_cache_target_met"] = r["from_cache_over_baseline"] <= 1.25
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128x128", help="HxW of the input batch (transformers fixed-size "
                                                      "families get a square input of the larger side)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    args.hw = tuple(int(x) for x in args.size.split("x"))
    args.amp = args.amp and args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)

    res = run(args)
    print(f"## Cross-family D3ETR step cost ({RECIPE}), {args.size}, batch {args.batch}, {args.device}"
          f"{' amp' if args.amp else ''}, {res['threads']} threads, median of {args.rounds} rounds "
          f"({args.warmup} warm-up); cache: {res['store']}")
    print("| teacher -> student | baseline step | teacher fwd | d3etr step | from-cache step | "
          "d3etr/(baseline+teacher) (<= 1.35) | from-cache/baseline (<= 1.25) | matching share of d3etr |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res["pairs"].items():
        label = (f"{r['teacher']} ({r['teacher_layers']}L/{r['teacher_queries']}q) -> "
                 f"{r['student']} ({r['student_layers']}L/{r['student_queries']}q)")
        print(f"| {label} | {r['baseline_s']:.3f} s | {r['teacher_s']:.3f} s | {r['d3etr_s']:.3f} s | "
              f"{r['from_cache_s']:.3f} s | {r['d3etr_over_baseline_plus_teacher']:.2f}x"
              f"{'' if r['d3etr_target_met'] else ' (over)'} | {r['from_cache_over_baseline']:.2f}x"
              f"{'' if r['from_cache_target_met'] else ' (over)'} | {100 * r['matching_share_of_d3etr']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
