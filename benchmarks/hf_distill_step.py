"""Cost of each teacher-using recipe's step with a transformers student, side by side in one run.

    python benchmarks/hf_distill_step.py --size 128x128 --batch 8
    python benchmarks/hf_distill_step.py --size 128x128 --batch 8 --rounds 5 --warmup 2 --json hf_distill.json
    python benchmarks/hf_distill_step.py --recipes teach_detr,d3etr_cross_family   # a chosen few

Two teacher -> student pairs:

* ``rt_detr -> rt_detr``, the RT-DETR quickstart's pair: the shipped RT-DETR teacher's architecture
  (``teachers/rt_detr_quickstart_teacher.toml``: ``hf_rt_detr_tiny`` with the card's ``[model_overrides]``,
  d_model 128, ResNet-18-shaped backbone 32..256 wide, 3 decoder layers, 30 queries) with **random weights**
  -> ``hf_rt_detr_tiny`` student (d_model 32, 3 decoder layers, 30 queries);
* ``cond_detr -> rt_detr``: kd-detr's ``cond_detr_r10_tiny`` (2 decoder layers, 30 queries) -> the same
  ``hf_rt_detr_tiny`` student.

Both models of a pair share one label map (``NUM_CLASSES``; the card's own class count is not used).

Recipes (``--recipes``, a comma list; default: every recipe ``kd-detr recipes`` lists whose methods use a
teacher, ``d3etr_cross_family``, ``teach_detr`` and ``d3etr_cross_family_teach`` first). A recipe added
later is picked up when it loads; one a pair cannot run (its methods refuse the student or the teacher when
they are built, or its first step fails, e.g. D3ETR's Fixed Matching or attention KD with a transformers
student) is skipped for that pair with the reason printed under the table. ``--set KEY=VALUE`` overrides
apply to every recipe.

Per round and per pair, in this order (every variant on the same images, mask and targets; the recipes'
order rotates from round to round):

* ``baseline``: the student alone: training forward with ``targets=`` (its ground-truth loss is the
  family's own, computed by transformers inside the forward: :class:`FamilyLossCriterion`) + backward +
  clip 0.1 + AdamW over kd-detr's ``param_groups`` (the official preset's);
* ``teacher``: the teacher forward (eval, no grad, ``InProcessTeacher``, attention maps and encoder feature
  maps as the recipes ask: one forward per kind asked, each recipe's ratio uses its own);
* for each recipe, ``step``: teacher forward in process + the student step with GT and the recipe's method
  losses (``batch_losses``; the methods' own modules in the optimiser, as the trainer does);
* and its ``from_cache`` step: the same step, its teacher outputs decoded from the batch's cache entries. The
  entries are made outside the timer, one per image view as a cache stores them (the teacher on the image
  alone, float32 as the cache actors run it, its last-layer Hungarian GT assignment, as the cache builder
  computes it, and ``encode_batch``: float16, attention none for the recipes that need none, else
  ``--attention``'s codec (default topk:14), classes ``--classes`` (default dense), the encoder maps for a
  recipe whose methods need them (``kd-detr cache --features``)); inside the timer: ``decode_batch`` of each
  view + ``TeacherOutputs.stack_views`` (what the loader workers do) + moving it to the device + the step.

Teach-DETR takes the teacher's boxes above a score threshold as targets; a random-init teacher passes none
(its class prior is 0.01), which would time a Teach-DETR step doing no work. So, unless
``--teach-targets 0``, every recipe is loaded with ``teach_detr.score_threshold=0`` and
``teach_detr.max_targets=7``: each image gets the teacher's 7 most confident boxes, as many as its ground
truth objects (``train_step.random_targets``), what a trained teacher that finds the objects hands over.

Medians over the rounds (after ``--warmup`` rounds; ``--stat min``: the fastest round of each phase, steadier
when other jobs share the machine). Reported per pair and recipe:

* ``step / (baseline + teacher)`` (target <= 1.35);
* ``from_cache / baseline`` (target <= 1.25);
* the share of the step spent in D3ETR's matchings (adaptive teacher-student Hungarian + teacher GT), for
  recipes with a ``[distill]`` section.

The JSON (``--json``) keeps the single-recipe layout of earlier versions for ``d3etr_cross_family``
(``pairs[PAIR]["d3etr_s"]``, ``["d3etr_over_baseline_plus_teacher"]`` ...) and adds every recipe's figures
under ``pairs[PAIR]["recipes"][RECIPE]`` and the skips under ``pairs[PAIR]["skipped_recipes"]``.

Random weights and ``random_targets`` ground truth (timing does not depend on the values);
``torch.manual_seed`` fixed. :class:`PairBench` is also what ``benchmarks/gpu_official.py --pair realtime``
runs (with AMP and a GradScaler, on full-size RT-DETR models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))

from kd_detr.criterion import FamilyLossCriterion, SetCriterion  # noqa: E402
from kd_detr.engine.recipe import list_recipes, load_recipe  # noqa: E402
from kd_detr.engine.step import batch_losses  # noqa: E402
from kd_detr.engine.optim import param_groups  # noqa: E402
from kd_detr.matcher import HungarianMatcher, indices_to_assignment  # noqa: E402
from kd_detr.methods import build_methods, list_methods  # noqa: E402
from kd_detr.models import build_model  # noqa: E402
from kd_detr.models.hf.config import HFModelConfig  # noqa: E402
from kd_detr.models.hf.registry import is_hf_name  # noqa: E402
from kd_detr.teacher import InProcessTeacher, TeacherOutputs  # noqa: E402
from kd_detr.teacher.cache.attention_codec import (DEFAULT_ATTENTION_SPEC, StoreConfig, decode_batch,  # noqa: E402
                                                   encode_batch)

from train_step import random_targets  # noqa: E402  - the same random ground truth as the plain step benchmark

NUM_CLASSES = 5  # the tiny transformers configs' label count; teacher and student share one label map
RECIPE = "d3etr_cross_family"  # the recipe of the single-recipe JSON keys of earlier versions
FIRST_RECIPES = ("d3etr_cross_family", "teach_detr", "d3etr_cross_family_teach")  # listed first when present
RT_TEACHER_CARD = "rt_detr_quickstart_teacher"  # the RT-DETR quickstart's shipped teacher: its architecture
TEACH_TARGETS = 7  # teacher boxes per image for Teach-DETR (= random_targets' objects per image)
STUDENT = ("hf_rt_detr_tiny", {"num_queries": 30})
TARGETS = {"step": 1.35, "from_cache": 1.25}
ATTN_ORDER = ("none", "mean", "per_head")  # a forward with more maps serves a recipe that asks for fewer


def card_architecture(card: str) -> tuple[str, dict]:
    """``(model name, overrides)`` of a shipped teacher card, without its weights and its class count (the
    benchmark's pairs share :data:`NUM_CLASSES`)."""
    from kd_detr.teacher.loading import resolve_teacher

    spec = resolve_teacher(card)
    return spec.model, {k: v for k, v in spec.model_overrides.items() if k != "num_classes"}


def default_pairs() -> dict[str, tuple[tuple[Any, dict], tuple[Any, dict]]]:
    """Pair name -> ``(teacher, teacher overrides), (student, student overrides)``."""
    return {
        "rt_detr -> rt_detr": (card_architecture(RT_TEACHER_CARD), STUDENT),
        "cond_detr -> rt_detr": (("cond_detr_r10_tiny", {}), STUDENT),
    }


def model_label(model: Any) -> str:
    return model.name if isinstance(model, HFModelConfig) else str(model)


def _build(name: Any, overrides: dict, hw: tuple[int, int], num_classes: int = NUM_CLASSES):
    hf = isinstance(name, HFModelConfig) or is_hf_name(name)
    extra = {"input_size": max(hw)} if hf else {}  # fixed-size families: the square input side
    return build_model(name, num_classes=num_classes, **extra, **overrides)


def _criterion(model, num_classes: int = NUM_CLASSES):
    if getattr(model, "own_loss", False):  # transformers families: their own loss, inside their forward
        return FamilyLossCriterion(num_classes, model.family_loss_weights, matcher=HungarianMatcher())
    return SetCriterion(num_classes, HungarianMatcher(), num_dec_layers=model.config.dec_layers)


def teacher_key(attn: str, features: bool) -> str:
    """The name of a teacher forward: its attention mode, ``+features`` when it also returns encoder maps."""
    return f"{attn}+features" if features else attn


def _key_order(key: str) -> tuple[int, bool]:
    attn, _, feats = key.partition("+")
    return ATTN_ORDER.index(attn), bool(feats)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------------- recipes


def timing_overrides(teach_targets: int) -> dict[str, Any]:
    """The ``--set`` overrides every recipe is loaded with for timing (see the module docstring)."""
    if not teach_targets or "teach_detr" not in list_methods():
        return {}
    return {"teach_detr.score_threshold": 0.0, "teach_detr.max_targets": int(teach_targets)}


def teacher_recipes(names: Optional[list[str]], overrides: list[str], teach_targets: int = TEACH_TARGETS
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """``(recipes to measure, skipped name -> reason)``: the named ones, or every listed recipe that distils
    from a teacher (:data:`FIRST_RECIPES` first, then by name)."""
    extra = timing_overrides(teach_targets)
    asked = names is not None
    if names is None:
        listed = list(list_recipes())
        names = [n for n in FIRST_RECIPES if n in listed] + sorted(n for n in listed if n not in FIRST_RECIPES)
    out, skipped = {}, {}
    for name in names:
        try:
            recipe = load_recipe(name, [*(f"{k}={v}" for k, v in extra.items()), *overrides])
        except Exception as e:  # noqa: BLE001 - a recipe that does not load is skipped, with its reason
            skipped[name] = f"does not load: {_one_line(e)}"
            continue
        if not recipe.distils:
            if asked:
                skipped[name] = "no method of it uses a teacher"
            else:
                skipped[name] = "no teacher"
            continue
        out[name] = recipe
    return out, skipped


# ------------------------------------------------------------------------------------------- benches


class RecipeRun:
    """One recipe's methods and optimiser on a :class:`PairBench`'s student and teacher."""

    def __init__(self, bench: "PairBench", name: str, recipe):
        self.bench, self.name, self.recipe = bench, name, recipe
        dev = bench.device
        self.methods = [m.to(dev) for m in build_methods(recipe.sections, bench.student.config, bench.criterion,
                                                         teacher=lambda: bench.teacher_model.config)]
        self.sections = [m.section for m in self.methods]
        modes = {m.teacher_attention() for m in self.methods if m.uses_teacher}
        attn = max(modes or {"none"}, key=ATTN_ORDER.index)
        features = any(getattr(m, "teacher_features", lambda: False)() for m in self.methods if m.uses_teacher)
        self.attn = teacher_key(attn, features)  # which teacher forward the recipe needs
        self.kd = next((m for m in self.methods if hasattr(m, "match_seconds")), None)
        groups = bench.student_groups()
        for m in self.methods:  # as the trainer does: the methods' own modules beside the student
            for mod_name, mod in m.trainable_modules().items():
                params = [p for p in mod.parameters() if p.requires_grad]
                if params:
                    groups.append({"params": params, "lr": 1e-4, "weight_decay": 1e-4, "name": mod_name})
        self.opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
        self.store = bench.store_for(attn, features)
        self.cache_error: Optional[str] = None
        self.entry = self.query_embed = None

    def reset_matching(self):
        if self.kd is not None:
            self.kd.match_seconds = {"adaptive": 0.0, "gt": 0.0}

    def matching_seconds(self) -> Optional[float]:
        return None if self.kd is None else sum(self.kd.match_seconds.values())

    def step(self):
        """Teacher forward in process + the student step with the recipe's methods."""
        b = self.bench
        with b.autocast():
            teacher_out = b.teachers[self.attn](b.images, b.mask)
        b.step(self.opt, self.methods, teacher_out)

    def decode(self) -> TeacherOutputs:
        """What the step pays for a cached batch: decode each view's entry on the CPU and stack them (loader
        workers do both in a run), then the move to the device."""
        views = [decode_batch(e, self.store, self.query_embed) for e in self.entry]
        return TeacherOutputs.stack_views(views).to(self.bench.device)

    def from_cache(self):
        self.bench.step(self.opt, self.methods, self.decode())

    @torch.no_grad()
    def make_entry(self):
        """Untimed: the cache entries of this batch as the cache builder writes them: one per image view (the
        teacher on the image alone, float32 as the cache actors run it, its last-layer GT assignment)."""
        b = self.bench
        entries = []
        for i in range(b.images.shape[0]):  # the batch has no padding: each image is a whole view
            res = b.teachers[self.attn].view(b.images[i])
            idx = b.gt_matcher({"pred_logits": res.logits[-1].float(), "pred_boxes": res.boxes[-1].float()},
                               b.targets[i:i + 1])
            res.gt_assignment = indices_to_assignment(idx, res.num_queries)
            entries.append({k: v.cpu() for k, v in encode_batch(res, torch.tensor([i]), self.store).items()})
            self.query_embed = None if res.query_embed is None else res.query_embed.float().cpu()  # stored once
        self.entry = entries


class PairBench:
    """Baseline / teacher / every recipe's step (teacher in process and from a cache) of one teacher ->
    student pair on one batch.

    ``amp``: float16 autocast and a GradScaler (as ``kd-detr train --amp``), CUDA only. ``attention`` /
    ``classes``: the cache codec of the recipes that need teacher attention maps / the class storage."""

    def __init__(self, teacher: tuple[Any, dict], student: tuple[Any, dict], batch, recipes: dict[str, Any],
                 device: str = "cpu", amp: bool = False, hw: tuple[int, int] = (128, 128),
                 num_classes: int = NUM_CLASSES, attention: str = DEFAULT_ATTENTION_SPEC, classes: str = "dense",
                 log=None):
        self.device, self.amp, self.attention, self.classes = device, amp, attention, classes
        self.log = log or (lambda msg: None)
        torch.manual_seed(0)
        self.student = _build(*student, hw, num_classes).to(device).train()
        torch.manual_seed(1)
        self.teacher_model = _build(*teacher, hw, num_classes).to(device)
        self.criterion = _criterion(self.student, num_classes)
        self.opt = torch.optim.AdamW(self.student_groups(), lr=1e-4, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.images, self.mask, self.targets = batch
        self.gt_matcher = HungarianMatcher()  # the cache builder's teacher GT matching (default costs)
        self.runs: dict[str, RecipeRun] = {}
        self.skipped: dict[str, str] = {}
        for name, recipe in recipes.items():
            try:
                self.runs[name] = RecipeRun(self, name, recipe)
            except Exception as e:  # noqa: BLE001 - the pair cannot run this recipe: skipped, with the reason
                self.skipped[name] = f"not built: {_one_line(e)}"
        modes = {r.attn for r in self.runs.values()} | {"none"}
        self.teachers: dict[str, InProcessTeacher] = {}
        for mode in sorted(modes, key=_key_order):
            attn, _, feats = mode.partition("+")
            try:  # features=: only asked when a method needs the encoder maps
                self.teachers[mode] = InProcessTeacher(self.teacher_model, attn=attn,
                                                       **({"features": True} if feats else {}))
            except Exception as e:  # noqa: BLE001
                for name in [n for n, r in self.runs.items() if r.attn == mode]:
                    self.skipped[name] = f"teacher attention {mode}: {_one_line(e)}"
                    del self.runs[name]
        self.probe()

    # ---- set-up
    def student_groups(self) -> list[dict]:
        return param_groups(self.student, 1e-4, 1e-5, 1e-4)

    def store_for(self, attn: str, features: bool = False) -> StoreConfig:
        feats = {"features": True} if features else {}  # encoder maps stored only for a method that needs them
        if attn == "none":
            return StoreConfig.parse("none", classes=self.classes, **feats)
        spec = self.attention if self.attention != "none" else DEFAULT_ATTENTION_SPEC
        return StoreConfig.parse(spec, heads="per_head" if attn == "per_head" else "mean", classes=self.classes,
                                 **feats)

    def probe(self):
        """One untimed step of each recipe, in process and from a cache: a recipe whose step fails is skipped,
        a cache it cannot run from is reported (its from-cache figure is then missing)."""
        for name, run in list(self.runs.items()):
            try:
                run.step()
            except Exception as e:  # noqa: BLE001
                self.skipped[name] = f"step fails: {_one_line(e)}"
                del self.runs[name]
                continue
            try:
                run.make_entry()
                run.from_cache()
            except Exception as e:  # noqa: BLE001
                run.cache_error = _one_line(e)
        for name, why in self.skipped.items():
            self.log(f"skipped {name}: {why}")

    # ---- steps
    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def update(self, opt, loss):  # as Trainer.step: (scale, unscale,) clip 0.1, step (, update)
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
        self.scaler.step(opt)
        self.scaler.update()

    def step(self, opt, methods=(), teacher_out=None):
        with self.autocast():
            total, *_ = batch_losses(self.student, self.criterion, self.images, self.mask, self.targets,
                                     methods, teacher_out)
        self.update(opt, total)

    def baseline(self):
        self.step(self.opt)

    def teacher_forward(self, mode: str = "none"):
        with self.autocast():
            self.teachers[mode](self.images, self.mask)

    def timed(self, fn, *a) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn(*a)
        self.sync()
        return time.perf_counter() - t0

    # ---- rounds
    def new_times(self) -> dict[str, list[float]]:
        keys = ["baseline", *(f"teacher:{m}" for m in self.teachers)]
        for name in self.runs:
            keys += [f"{name}:step", f"{name}:from_cache", f"{name}:matching"]
        return {k: [] for k in keys}

    def round(self, times: Optional[dict[str, list[float]]], rotate: int = 0) -> None:
        """One round of every phase; appended to ``times`` unless it is ``None`` (warm-up)."""
        got = {"baseline": self.timed(self.baseline)}
        for mode in self.teachers:
            got[f"teacher:{mode}"] = self.timed(self.teacher_forward, mode)
        names = list(self.runs)
        k = rotate % len(names) if names else 0
        for name in names[k:] + names[:k]:  # the recipes' order rotates: drift hits them alike
            run = self.runs[name]
            run.reset_matching()
            got[f"{name}:step"] = self.timed(run.step)
            m = run.matching_seconds()
            if m is not None:
                got[f"{name}:matching"] = m
            if run.cache_error is None:
                run.make_entry()  # outside the timer
                got[f"{name}:from_cache"] = self.timed(run.from_cache)
        if times is not None:
            for key, v in got.items():
                times[key].append(v)

    def summary(self, times: dict[str, list[float]], stat: str = "median") -> dict:
        """Per phase, the ``stat`` (``median`` or ``min``) of its timed rounds, and the ratios."""
        agg = {"median": statistics.median, "min": min}[stat]
        med = {k: agg(v) for k, v in times.items() if v}
        base = med["baseline"]
        recipes = {}
        for name, run in self.runs.items():
            teacher = med[f"teacher:{run.attn}"]
            step = med[f"{name}:step"]
            r = {"methods": run.sections, "teacher_attention": run.attn, "step_s": step, "teacher_s": teacher,
                 "step_over_baseline_plus_teacher": step / (base + teacher)}
            r["step_target_met"] = r["step_over_baseline_plus_teacher"] <= TARGETS["step"]
            if f"{name}:from_cache" in med:
                r["from_cache_s"] = med[f"{name}:from_cache"]
                r["from_cache_over_baseline"] = r["from_cache_s"] / base
                r["from_cache_target_met"] = r["from_cache_over_baseline"] <= TARGETS["from_cache"]
                r["store"] = run.store.describe()
            else:
                r["from_cache_error"] = run.cache_error
            if f"{name}:matching" in med:
                r["matching_s"] = med[f"{name}:matching"]
                r["matching_share_of_step"] = r["matching_s"] / step
            recipes[name] = r
        return {"baseline_s": base, "teacher_s": med["teacher:none"],
                **{f"teacher_{m.replace('+', '_')}_s": med[f"teacher:{m}"] for m in self.teachers if m != "none"},
                "rounds": len(times["baseline"]), "recipes": recipes, "skipped_recipes": dict(self.skipped)}


# ------------------------------------------------------------------------------------------- run


def random_batch(batch: int, hw: tuple[int, int], device: str, num_classes: int = NUM_CLASSES):
    gen = torch.Generator().manual_seed(0)
    h, w = hw
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(batch, num_classes, gen)]
    return images, mask, targets


def legacy_keys(row: dict) -> dict:
    """The single-recipe keys of earlier versions (recipe ``d3etr_cross_family``)."""
    r = row["recipes"].get(RECIPE)
    if r is None:
        return {}
    out = {"d3etr_s": r["step_s"], "d3etr_over_baseline_plus_teacher": r["step_over_baseline_plus_teacher"],
           "d3etr_target_met": r["step_target_met"]}
    if "from_cache_s" in r:
        out.update(from_cache_s=r["from_cache_s"], from_cache_over_baseline=r["from_cache_over_baseline"],
                   from_cache_target_met=r["from_cache_target_met"])
    if "matching_s" in r:
        out.update(matching_s=r["matching_s"], matching_share_of_d3etr=r["matching_share_of_step"])
    return out


def run(args) -> dict:
    pairs = default_pairs()
    recipes, not_measured = teacher_recipes(args.recipes, args.set, args.teach_targets)
    batch = random_batch(args.batch, args.hw, args.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    benches = {}
    for name, (t, s) in pairs.items():
        benches[name] = PairBench(t, s, batch, recipes, device=args.device, amp=args.amp, hw=args.hw,
                                  attention=args.attention, classes=args.classes,
                                  log=lambda msg, name=name: log(f"{name}: {msg}"))
    times = {name: b.new_times() for name, b in benches.items()}
    for i in range(args.warmup + args.rounds):
        for name, b in benches.items():  # rounds outside, pairs inside: drift hits both pairs alike
            b.round(times[name] if i >= args.warmup else None, rotate=i)
    res = {"recipe": RECIPE, "recipes": list(recipes), "not_measured": not_measured, "size": args.size,
           "batch": args.batch, "device": args.device, "amp": args.amp, "threads": torch.get_num_threads(),
           "rounds": args.rounds, "warmup": args.warmup, "stat": args.stat, "recipe_overrides": [*(
               f"{k}={v}" for k, v in timing_overrides(args.teach_targets).items()), *args.set],
           "store": StoreConfig.parse("none", classes=args.classes).describe(), "pairs": {}}
    for name, b in benches.items():
        (tn, to), (sn, so) = pairs[name]
        tc, sc = b.teacher_model.config, b.student.config
        row = {"teacher": model_label(tn), "teacher_overrides": to, "student": model_label(sn),
               "student_overrides": so, "teacher_layers": tc.dec_layers, "teacher_queries": tc.num_queries,
               "student_layers": sc.dec_layers, "student_queries": sc.num_queries,
               **b.summary(times[name], args.stat)}
        row.update(legacy_keys(row))
        res["pairs"][name] = row
    return res


def fmt_ms(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def table(pairs: dict[str, dict], first: str = "teacher -> student") -> list[str]:
    """The Markdown table of :func:`run`'s (or ``gpu_official.py --pair realtime``'s) pairs, and the skips."""
    lines = [f"| {first} | recipe | baseline step | teacher fwd | step (teacher in process) | "
             f"step / (baseline + teacher) (<= {TARGETS['step']}) | from-cache step | "
             f"from-cache / baseline (<= {TARGETS['from_cache']}) | matching share of step |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for label, p in pairs.items():
        for name, r in p["recipes"].items():
            over = "" if r["step_target_met"] else " (over)"
            if "from_cache_s" in r:
                cache = (fmt_ms(r["from_cache_s"]), f"{r['from_cache_over_baseline']:.2f}x"
                         + ("" if r["from_cache_target_met"] else " (over)"))
            else:
                cache = ("n/a", "n/a")
                notes.append(f"{label}, {name}: no from-cache step ({r.get('from_cache_error')})")
            share = f"{100 * r['matching_share_of_step']:.1f}%" if "matching_share_of_step" in r else "-"
            lines.append(f"| {label} | {name} | {fmt_ms(p['baseline_s'])} | {fmt_ms(r['teacher_s'])} | "
                         f"{fmt_ms(r['step_s'])} | {r['step_over_baseline_plus_teacher']:.2f}x{over} | "
                         f"{cache[0]} | {cache[1]} | {share} |")
        for name, why in p.get("skipped_recipes", {}).items():
            notes.append(f"{label}, {name}: skipped ({why})")
    return lines + ([""] + [f"* {n}" for n in notes] if notes else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128x128", help="HxW of the input batch (transformers fixed-size "
                                                      "families get a square input of the larger side)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recipes", default=None,
                    help="comma list of recipe names or .toml paths (default: every listed recipe that uses a "
                         "teacher)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, applied to every recipe")
    ap.add_argument("--teach-targets", type=int, default=TEACH_TARGETS,
                    help="teacher boxes per image for Teach-DETR (score threshold 0, max_targets N); 0 keeps the "
                         f"recipes' threshold (default {TEACH_TARGETS})")
    ap.add_argument("--attention", default=DEFAULT_ATTENTION_SPEC,
                    help="cache attention codec for recipes that need teacher attention (default topk:14)")
    ap.add_argument("--classes", default="dense", help="cache class storage (dense or topk:K; default dense)")
    ap.add_argument("--stat", default="median", choices=("median", "min"),
                    help="per phase, the median (default) or the fastest of the timed rounds (min: steadier on a "
                         "machine shared with other jobs, whose noise only adds time)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler (CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    args.hw = tuple(int(x) for x in args.size.split("x"))
    args.amp = args.amp and args.device.startswith("cuda")
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()] if args.recipes else None
    if args.threads:
        torch.set_num_threads(args.threads)

    res = run(args)
    print(f"## Distillation step cost per recipe, transformers student, {args.size}, batch {args.batch}, "
          f"{args.device}{' amp' if args.amp else ''}, {res['threads']} threads, {args.stat} of {args.rounds} rounds "
          f"({args.warmup} warm-up); cache: {res['store']} (recipes without teacher attention); recipe "
          f"overrides: {', '.join(res['recipe_overrides']) or 'none'}")
    print("\n".join(table(res["pairs"])))
    if res["not_measured"]:
        print(f"\nnot measured: {', '.join(f'{k} ({v})' for k, v in res['not_measured'].items())}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
