"""The official distillation pairs on ONE GPU, each in at most 8 minutes of wall time.

    python benchmarks/gpu_official.py --json gpu_official.json                        # on a GPU machine
    python benchmarks/gpu_official.py --pair realtime --json gpu_realtime.json        # the real-time pair
    python benchmarks/gpu_official.py --smoke --device cpu --rounds 2 --warmup 1      # pipeline check, CPU
    python benchmarks/gpu_official.py --pair realtime --smoke --device cpu --rounds 2 --warmup 1

``--pair official`` (the default) is the Conditional DETR pair below; ``--pair realtime`` the RT-DETR pair
(section "The real-time pair" at the end).

Teacher ``cond_detr_r101`` -> student ``cond_detr_r50``, random weights, ``800x1066`` inputs, AMP (float16
autocast + GradScaler, as ``kd-detr`` trains with ``--amp``), the official optimiser (AdamW, lr 1e-4 / backbone
1e-5, weight decay 1e-4, grad clip 0.1), recipe ``d3etr``; at each batch size of ``--batches`` (2 and 8):

* baseline step: the student alone (forward + GT loss + backward + AdamW);
* teacher forward: eval, no grad, attention maps as the recipe needs them (``d3etr``: head-averaged);
* d3etr step with the teacher in process (teacher forward + student with the auxiliary group + GT and KD
  losses + backward + AdamW);
* d3etr step from a teacher cache: the teacher's outputs (with its last-layer GT assignment) are computed
  once outside the timer and encoded on the CPU with the cache codec as ``kd-detr cache`` stores them by
  default (``--attention topk:14 --classes topk:4``); inside the timer they are decoded (on the CPU, as the loader does), moved to the device and
  used by the step. The decode alone is also reported (real runs overlap it in loader workers);
* peak GPU memory of each (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, 2 runs of
  the phase): d3etr in process with everything resident; baseline and from-cache with the teacher moved off
  the GPU (those processes hold no teacher); teacher = its weights + the input batch + what its forward
  allocates on top of everything resident (exact: a no-grad forward touches nothing else);
* ratios ``d3etr / (baseline + teacher)`` and ``from cache / baseline`` (times; memory too).

Then the real cache builder (``kd_detr/teacher/cache/build.py``, as ``kd-detr cache`` calls it) with 1 Ray
actor on the GPU, on a generated data set (``--cache-images`` square 800 px images at the official-size
preset, ``--cache-views`` views each, the default storage, ``--pipeline`` (default ``auto``: the streaming
Ray Data pipeline when Ray sees a GPU) with ``--cache-batch`` views per teacher call), in a subprocess with a
hard timeout; its images/s (image views per second of compute + write, Ray and actor start-up excluded) and
the teacher actor's busy fraction come from the builder's return value. **Ray Data must be installed** for this part (``pip install "ray[data]"``); without it the script
stops at once unless ``--cache-images 0``.

Budget: everything (imports, CUDA start-up, model builds, warm-up, memory, cache build) fits in
``--time-budget-s`` (default 450 s, i.e. under 8 minutes): timed rounds stop being added when the budget is
near (at least one round is always timed), ``--cache-reserve-s`` is kept for the cache build, whose
subprocess is killed at the budget's end. Medians over the timed rounds; phases are interleaved per round so
drift hits them alike. Random weights and ground truth: timing does not depend on the values.

``--smoke`` switches to ``cond_detr_r10_tiny`` teacher and student at 128x128, batch 2, a 16-image cache at
the 128 px preset, so the whole pipeline can be checked on a CPU in a few minutes.
Reuses :class:`distill_step.Bench` (models, recipe, optimiser, random batch) and the cache codec.

The real-time pair (``--pair realtime``): an RT-DETR R50-sized teacher -> an RT-DETR R18-sized student, both
transformers ``RTDetrForObjectDetection`` with random weights, 80 classes, ``640x640`` inputs, AMP (float16
autocast + GradScaler), the same optimiser; at each batch size of ``--batches`` (default 4, RT-DETR's per-GPU
batch, and 16, its total batch):

* teacher: ``RTDetrConfig()``'s defaults, which are RT-DETR-R50's (ResNet-50-vd backbone, hybrid encoder 256
  wide, 6 decoder layers, 300 queries, 100 denoising queries; 42.9 M parameters);
* student: the same with RT-DETR-R18's backbone and neck (:data:`R18_OVERRIDES`: basic-block ResNet-18, depths
  ``[2, 2, 2, 2]``, widths 64/128/256/512, encoder input channels 128/256/512, CSP expansion 0.5) and 3
  decoder layers (20.2 M parameters, as the paper's 20 M);
* recipes: ``--recipes`` (default: every listed recipe whose methods use a teacher that the pair can run,
  ``d3etr_cross_family``, ``teach_detr`` and ``d3etr_cross_family_teach`` first; the others, e.g. D3ETR's
  Fixed Matching or attention KD, which an RT-DETR student cannot run, are listed as skipped with the reason);
* per round: the baseline step, the teacher forward, then each recipe's step with the teacher in process and
  its step from a cache entry (encoded outside the timer with ``--classes``, default ``topk:4``, attention
  none for recipes that need none; decoded inside the timer), recipes in a rotating order: exactly
  :class:`hf_distill_step.PairBench`, whose module docstring has the details (Teach-DETR's targets: the
  teacher's 7 most confident boxes per image, ``--teach-targets``);
* peak GPU memory: each recipe's step in process (everything resident), the teacher forward (its weights + the
  batch + what its forward allocates), then, the teacher moved off the GPU, the baseline and each recipe's
  from-cache step;
* ratios ``step / (baseline + teacher)`` (target <= 1.35) and ``from cache / baseline`` per recipe.

No cache build for this pair (``--cache-images`` must stay 0). The same time budget applies: timed rounds
stop being added when it is near, a batch size that would not fit is skipped. ``--smoke`` runs the RT-DETR
quickstart's pair instead (the shipped RT-DETR teacher's architecture, random weights, ->
``hf_rt_detr_tiny``, 5 classes) at 128x128, batch 2, and first builds the full-size teacher and student once
on the CPU (their parameter counts are reported), so the whole path is checked on a CPU in about a minute.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here (imports included)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_step import Bench, needs_features  # noqa: E402  (models, recipe, optimiser, random batch of the step benchmark)
import hf_distill_step as hfd  # noqa: E402  (the per-recipe pair bench of the real-time pair)

from kd_detr.engine.step import batch_losses  # noqa: E402
from kd_detr.matcher import HungarianMatcher, indices_to_assignment  # noqa: E402
from kd_detr.teacher import TeacherOutputs  # noqa: E402
from kd_detr.teacher.cache.attention_codec import (DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC,  # noqa: E402
                                                   StoreConfig, decode_batch, encode_batch)

OFFICIAL = {"teacher": "cond_detr_r101", "student": "cond_detr_r50", "size": "800x1066", "batches": "2,8",
            "cache_images": 64, "cache_image_size": 0}
SMOKE = {"teacher": "cond_detr_r10_tiny", "student": "cond_detr_r10_tiny", "size": "128x128", "batches": "2",
         "cache_images": 16, "cache_image_size": 128}
PHASES = ("baseline", "teacher", "d3etr", "cache", "decode")
REALTIME = {"size": "640x640", "batches": "4,16", "cache_images": 0}
REALTIME_SMOKE = {"size": "128x128", "batches": "2", "cache_images": 0}
REALTIME_CLASSES = 80  # COCO's
# RT-DETR-R18 (rtdetr_r18vd): basic-block ResNet-18-vd, its neck's input widths and CSP expansion, 3 decoder layers
R18_OVERRIDES = {"backbone_config.layer_type": "basic", "backbone_config.depths": [2, 2, 2, 2],
                 "backbone_config.hidden_sizes": [64, 128, 256, 512], "encoder_in_channels": [128, 256, 512],
                 "hidden_expansion": 0.5, "decoder_layers": 3}


def elapsed() -> float:
    return time.perf_counter() - T0


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- steps


class OfficialBench(Bench):
    """:class:`distill_step.Bench` with the trainer's AMP update (GradScaler) and a from-cache step."""

    def __init__(self, args):
        super().__init__(args)
        self.scaler = torch.amp.GradScaler("cuda") if args.amp else None
        feats = {"features": True} if needs_features(self.methods) else {}  # kd-detr cache --features
        self.store = StoreConfig.parse(args.attention, classes=args.classes, **feats)
        self.stored: dict[str, torch.Tensor] = {}
        self.query_embed: torch.Tensor | None = None

    def _update(self, loss):  # as Trainer.step: scale, unscale, clip 0.1, step, update
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
            self.opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
        self.scaler.step(self.opt)
        self.scaler.update()

    def prepare_cache(self) -> int:
        """Outside the timer: the teacher's outputs of each image of the batch alone and its last-layer GT
        assignment, encoded as a cache stores them (one entry per image view; float32 teacher, as the cache
        actors run it), kept on the CPU. Returns bytes."""
        from kd_detr.teacher.inprocess import image_regions

        self.stored, total = [], 0
        for b, image in enumerate(image_regions(self.images, self.mask)):
            out = self.teacher.view(image)
            idx = HungarianMatcher()({"pred_logits": out.logits[-1], "pred_boxes": out.boxes[-1]},
                                     self.targets[b:b + 1])
            out.gt_assignment = indices_to_assignment(idx, out.num_queries)
            entry = {k: v.cpu() for k, v in encode_batch(out, torch.tensor([b]), self.store).items()}
            self.stored.append(entry)
            total += sum(v.numel() * v.element_size() for v in entry.values())
            self.query_embed = out.query_embed.detach().float().cpu()  # stored once per cache
        return total

    def decode(self):
        """What the step pays for a cached batch: decode each image's entry on the CPU, stack (the loader
        workers do both in a run), then the move to the device."""
        return TeacherOutputs.stack_views([decode_batch(e, self.store, self.query_embed)
                                           for e in self.stored]).to(self.args.device)

    def cache_step(self):
        teacher_out = self.decode()
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.args.amp):
            total, _, _, _ = batch_losses(self.student, self.criterion, self.images, self.mask, self.targets,
                                          self.methods, teacher_out)
        self._update(total)


def cuda_peak(fn, reps: int = 2) -> tuple[float, float]:
    """``(peak allocated MB, allocated MB before)`` over ``reps`` calls of ``fn``."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20, before / 2**20


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def bench_batch(args, batch: int, deadline: float) -> dict:
    """Every step phase at one batch size; timed rounds are added while they fit before ``deadline``."""
    t_start = elapsed()
    a = argparse.Namespace(**vars(args))
    a.batch = batch
    b = OfficialBench(a)
    phases = {"baseline": b.baseline_step, "teacher": b.teacher_forward, "d3etr": b.d3etr_step,
              "cache": b.cache_step, "decode": b.decode}
    cache_bytes = b.prepare_cache()
    say(f"batch {batch}: models built, teacher outputs encoded ({cache_bytes / 2**10:.0f} KiB as --attention {args.attention} --classes {args.classes})")
    for _ in range(args.warmup):
        for fn in phases.values():
            b.timed(fn)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    match: list[float] = []
    t_setup = elapsed() - t_start
    while len(times["baseline"]) < args.rounds:
        t_round = elapsed()
        for name, fn in phases.items():
            if name == "d3etr":
                b.reset_matching()
            times[name].append(b.timed(fn))
            if name == "d3etr":
                match.append(sum(b.matching().values()))
        t_round = elapsed() - t_round
        # the memory pass runs every phase about twice more: keep room for it and one more round
        mem_est = 2.2 * t_round if args.device.startswith("cuda") else 0.0
        if T0 + elapsed() + t_round + mem_est > deadline:
            break
    med = {p: statistics.median(v) for p, v in times.items()}
    row = {"batch": batch, "rounds": len(times["baseline"]), "setup_s": t_setup,
           **{f"{p}_s": med[p] for p in PHASES}, "d3etr_matching_s": statistics.median(match),
           "cache_bytes_per_batch": cache_bytes,
           "ratio_d3etr_over_baseline_plus_teacher": med["d3etr"] / (med["baseline"] + med["teacher"]),
           "ratio_cache_over_baseline": med["cache"] / med["baseline"],
           "ratio_cache_without_decode_over_baseline": (med["cache"] - med["decode"]) / med["baseline"]}
    if b.scaler is not None:
        row["grad_scale_end"] = float(b.scaler.get_scale())
    if args.device.startswith("cuda"):
        inputs = tensor_mb([b.images, b.mask])
        teacher_w = tensor_mb([*b.teacher_model.parameters(), *b.teacher_model.buffers()])
        mem = {}
        mem["d3etr"], _ = cuda_peak(b.d3etr_step)  # everything resident: the in-process training process
        peak, before = cuda_peak(b.teacher_forward)
        mem["teacher"] = peak - before + teacher_w + inputs
        b.teacher_model.to("cpu")  # a baseline or from-cache process holds no teacher
        mem["baseline"], _ = cuda_peak(b.baseline_step)
        mem["cache"], _ = cuda_peak(b.cache_step)
        row.update({f"mem_{p}_mb": v for p, v in mem.items()})
        row["mem_ratio_d3etr_over_baseline_plus_teacher"] = mem["d3etr"] / (mem["baseline"] + mem["teacher"])
        row["mem_ratio_cache_over_baseline"] = mem["cache"] / mem["baseline"]
    row["total_s"] = elapsed() - t_start
    del b, phases
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    say(f"batch {batch}: {row['rounds']} rounds, {row['total_s']:.1f} s")
    return row


# ------------------------------------------------------------------------------------- real-time pair


def realtime_configs(input_size: int = 640):
    """``(teacher, student)`` :class:`HFModelConfig` of the full-size pair: RT-DETR-R50 (``RTDetrConfig()``'s
    defaults) and RT-DETR-R18 (:data:`R18_OVERRIDES`), random initialisation."""
    import dataclasses

    from transformers import RTDetrConfig

    from kd_detr.models.hf.config import HFModelConfig

    teacher = HFModelConfig(name="rt_detr_r50 (random init)", family="rt_detr",
                            hf_config=RTDetrConfig(num_labels=REALTIME_CLASSES).to_dict(),
                            input_size=input_size,
                            description="transformers RTDetrForObjectDetection, RT-DETR-R50 sized").validate()
    student = dataclasses.replace(teacher, name="rt_detr_r18 (random init)",
                                  description="transformers RTDetrForObjectDetection, RT-DETR-R18 sized")
    return teacher, student.replace(**R18_OVERRIDES)


def realtime_pair(args) -> tuple[tuple, tuple, int]:
    """``(teacher, overrides), (student, overrides), classes`` of ``--pair realtime`` (``--smoke``: the RT-DETR
    quickstart's tiny pair)."""
    if args.smoke:
        return hfd.card_architecture(hfd.RT_TEACHER_CARD), hfd.STUDENT, hfd.NUM_CLASSES
    teacher, student = realtime_configs(max(args.hw))
    return (teacher, {}), (student, {}), REALTIME_CLASSES


def count_full_size() -> dict:
    """Build the full-size real-time teacher and student once on the CPU (a --smoke check of their configs)."""
    from kd_detr.models import build_model

    out = {}
    for role, cfg in zip(("teacher", "student"), realtime_configs()):
        m = build_model(cfg, num_classes=REALTIME_CLASSES)
        out[role] = {"name": cfg.name, "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
                     "decoder_layers": m.config.dec_layers, "queries": m.config.num_queries}
        del m
    return out


def realtime_memory(b) -> dict:
    """Peak GPU MB of each phase (see the module docstring); the teacher ends up off the GPU."""
    mem = {}
    for name, run in b.runs.items():
        mem[f"{name}:step"], _ = cuda_peak(run.step)  # everything resident: the in-process training process
    inputs = tensor_mb([b.images, b.mask])
    teacher_w = tensor_mb([*b.teacher_model.parameters(), *b.teacher_model.buffers()])
    peak, before = cuda_peak(b.teacher_forward)
    mem["teacher"] = peak - before + teacher_w + inputs
    b.teacher_model.to("cpu")  # a baseline or from-cache process holds no teacher
    mem["baseline"], _ = cuda_peak(b.baseline)
    for name, run in b.runs.items():
        if run.cache_error is None and run.entry is not None:
            mem[f"{name}:from_cache"], _ = cuda_peak(run.from_cache)
    return mem


def bench_realtime_batch(args, batch: int, deadline: float, recipes: dict) -> dict:
    """Every phase of the real-time pair at one batch size; timed rounds are added while they fit."""
    t_start = elapsed()
    teacher, student, classes = realtime_pair(args)
    data = hfd.random_batch(batch, args.hw, args.device, classes)
    b = hfd.PairBench(teacher, student, data, recipes, device=args.device, amp=args.amp, hw=args.hw,
                      num_classes=classes, attention=args.attention, classes=args.classes,
                      log=lambda msg: say(f"batch {batch}: {msg}"))
    say(f"batch {batch}: models built, {len(b.runs)} recipes run ({', '.join(b.runs)}), "
        f"{len(b.skipped)} skipped")
    for i in range(args.warmup):
        b.round(None, rotate=i)
    times = b.new_times()
    t_setup = elapsed() - t_start
    while len(times["baseline"]) < args.rounds:
        t_round = elapsed()
        b.round(times, rotate=len(times["baseline"]))
        t_round = elapsed() - t_round
        mem_est = 2.2 * t_round if args.device.startswith("cuda") else 0.0  # the memory pass: 2 runs of each phase
        if T0 + elapsed() + t_round + mem_est > deadline:
            break
    row = {"batch": batch, "setup_s": t_setup, **b.summary(times)}
    if b.scaler is not None:
        row["grad_scale_end"] = float(b.scaler.get_scale())
    if args.device.startswith("cuda"):
        try:
            mem = realtime_memory(b)
        except Exception as e:  # noqa: BLE001 - the times stand without the memory figures
            row["memory_error"] = hfd._one_line(e)
        else:
            row["mem_baseline_mb"], row["mem_teacher_mb"] = mem["baseline"], mem["teacher"]
            for name, r in row["recipes"].items():
                if f"{name}:step" in mem:
                    r["mem_step_mb"] = mem[f"{name}:step"]
                    r["mem_ratio_step_over_baseline_plus_teacher"] = r["mem_step_mb"] / (mem["baseline"]
                                                                                         + mem["teacher"])
                if f"{name}:from_cache" in mem:
                    r["mem_from_cache_mb"] = mem[f"{name}:from_cache"]
                    r["mem_ratio_from_cache_over_baseline"] = r["mem_from_cache_mb"] / mem["baseline"]
    row["total_s"] = elapsed() - t_start
    del b
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    say(f"batch {batch}: {row['rounds']} rounds, {row['total_s']:.1f} s")
    return row


def report_realtime(res: dict) -> str:
    c = res["config"]
    lines = [f"## {c['teacher']} -> {c['student']}, {c['size']}, {res['device_name']}{', AMP' if c['amp'] else ''}; "
             f"torch {res['torch']}; medians of the timed rounds; recipe overrides: "
             f"{', '.join(res['recipe_overrides']) or 'none'}", ""]
    if "full_size_models" in res:
        lines += ["full-size models built on the CPU: " + "; ".join(
            f"{r} {m['name']}: {m['params_m']:.1f} M parameters, {m['decoder_layers']} decoder layers, "
            f"{m['queries']} queries" for r, m in res["full_size_models"].items()), ""]
    pairs = {}
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"batch {r['batch']}: skipped ({r['skipped']})")
        else:
            pairs[f"{r['batch']} ({r['rounds']} rounds)"] = r
    lines += hfd.table(pairs, first="batch")
    mem_rows = [r for r in res["rows"] if "mem_baseline_mb" in r]
    if mem_rows:
        lines += ["", "| batch | recipe | peak GPU MB: baseline | teacher fwd | step (in process) | from cache | "
                  "step / (baseline + teacher) | from cache / baseline |", "|---|---|---|---|---|---|---|---|"]
        for r in mem_rows:
            for name, x in r["recipes"].items():
                fc = (f"{x['mem_from_cache_mb']:.0f} | {x['mem_ratio_from_cache_over_baseline']:.2f}x"
                      if "mem_from_cache_mb" in x else "n/a | n/a")
                lines.append(f"| {r['batch']} | {name} | {r['mem_baseline_mb']:.0f} | {r['mem_teacher_mb']:.0f} | "
                             f"{x.get('mem_step_mb', float('nan')):.0f} | {fc.split(' | ')[0]} | "
                             f"{x.get('mem_ratio_step_over_baseline_plus_teacher', float('nan')):.2f}x | "
                             f"{fc.split(' | ')[1]} |")
    elif any("memory_error" in r for r in res["rows"]):
        lines += ["", "peak GPU memory: " + "; ".join(f"batch {r['batch']}: {r['memory_error']}"
                                                      for r in res["rows"] if "memory_error" in r)]
    else:
        lines += ["", "peak GPU memory: not measured (not a CUDA device)"]
    if res.get("not_measured"):
        lines += ["", "not measured: " + ", ".join(f"{k} ({v})" for k, v in res["not_measured"].items())]
    lines += ["", f"wall time {res['wall_s']:.0f} s of a {c['time_budget_s']:.0f} s budget"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- cache build


def cache_child(cfg: dict) -> dict:
    """In a subprocess: generate the data set, save a random teacher, build its cache with 1 Ray actor."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    from kd_detr import data as kd_data
    from kd_detr.data import DataSpec
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.models import build_model, save_model
    from kd_detr.teacher import check_teacher_fits, describe_teacher, resolve_teacher
    from kd_detr.teacher.cache.build import build_cache
    from kd_detr.teacher.ray_session import ensure_ray, shutdown_ray
    import ray

    work = Path(cfg["work"])
    image_size = cfg["image_size"] or None  # None: the official 480..800 / 1333 preset
    t = time.perf_counter()
    root = kd_data.generate_synthetic(work / "data", num_train=cfg["images"], num_val=1,
                                      image_size=image_size or 800, seed=0, progress=False)
    gen_s = time.perf_counter() - t
    dataset = DataSpec(str(root), None, None, image_size=image_size, label_map="coco91").train_set(log_report=False)
    torch.manual_seed(0)
    ckpt = work / "teacher.safetensors"
    save_model(build_model(cfg["teacher"], num_classes=dataset.label_map.num_classes), ckpt,
               label_map=dataset.label_map, extra_metadata={"image_size": image_size})
    # as `kd-detr cache --teacher T --teacher-checkpoint CKPT --attention A --classes C --actors 1 --views V
    #      --pipeline P --teacher-batch-size B`
    spec = resolve_teacher(cfg["teacher"], str(ckpt))
    store = StoreConfig.parse(cfg["attention"], classes=cfg["classes"])
    config, t_label_map, t_image_size = describe_teacher(spec, dataset.label_map)
    check_teacher_fits(spec, t_label_map, t_image_size, dataset.label_map, config.num_classes, image_size)
    plan = ViewPlan.for_dataset(dataset, num_views=cfg["views"], seed=0)
    # the local Ray build_cache would start (2 CPUs), started here to fail fast when it sees no GPU (an actor
    # asking for one would wait forever); build_cache then leaves it running, so its start-up excludes Ray's
    t = time.perf_counter()
    started = ensure_ray(None, num_cpus=2)
    ray_init_s = time.perf_counter() - t
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if cfg["gpu"] and gpus < 1:
            raise SystemExit(f"cache build: Ray sees no GPU (cluster resources {ray.cluster_resources()})")
        summary = build_cache(spec, dataset, plan, work / "cache", store, actors=1, images_per_shard=16,
                              progress=False, image_size=image_size, num_gpus=1 if cfg["gpu"] else 0,
                              pipeline=cfg["pipeline"], teacher_batch_size=cfg["batch"])
    finally:
        shutdown_ray(started)
    return {"generate_s": gen_s, "ray_init_s": ray_init_s, "dataset_images": cfg["images"], "views": cfg["views"],
            "batch": cfg["batch"], "image_size": image_size or "official", "attention": f'{cfg["attention"]}, classes {cfg["classes"]}', **summary}


def run_cache_build(args, timeout: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kd_detr_gpu_official_"))
    cfg = {"work": str(work), "teacher": args.teacher, "images": args.cache_images, "views": args.cache_views,
           "batch": args.cache_batch, "image_size": args.cache_image_size, "attention": args.attention,
           "classes": args.classes, "pipeline": args.pipeline,
           "gpu": args.device.startswith("cuda")}
    env = dict(os.environ)
    if args.device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = args.device.split(":", 1)[1]  # the actor's one GPU is the one asked for
    say(f"cache build: {args.cache_images} images x {args.cache_views} views, 1 actor, timeout {timeout:.0f} s")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_cache-child", json.dumps(cfg)],
                            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started in its session (Ray)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s (time budget)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        return {"error": f"cache build subprocess failed (exit {proc.returncode}); see its messages above"}
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def fmt_s(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def report(res: dict) -> str:
    c = res["config"]
    lines = [f"## {c['teacher']} -> {c['student']}, {c['size']}, recipe {c['recipe']}, {res['device_name']}"
             f"{', AMP' if c['amp'] else ''}; torch {res['torch']}; medians of the timed rounds", "",
             "| batch | rounds | baseline step | teacher fwd | d3etr step (teacher in process) | d3etr step from cache "
             "| of which decode | d3etr / (baseline + teacher) | from cache / baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['batch']} | skipped: {r['skipped']} |||||||")
            continue
        lines.append(f"| {r['batch']} | {r['rounds']} | {fmt_s(r['baseline_s'])} | {fmt_s(r['teacher_s'])} | "
                     f"{fmt_s(r['d3etr_s'])} | {fmt_s(r['cache_s'])} | {fmt_s(r['decode_s'])} | "
                     f"{r['ratio_d3etr_over_baseline_plus_teacher']:.2f}x | {r['ratio_cache_over_baseline']:.2f}x |")
    if any("mem_d3etr_mb" in r for r in res["rows"]):
        lines += ["", "| batch | peak GPU MB: baseline | teacher fwd | d3etr (in process) | from cache | "
                  "d3etr / (baseline + teacher) | from cache / baseline |", "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if "mem_d3etr_mb" in r:
                lines.append(f"| {r['batch']} | {r['mem_baseline_mb']:.0f} | {r['mem_teacher_mb']:.0f} | "
                             f"{r['mem_d3etr_mb']:.0f} | {r['mem_cache_mb']:.0f} | "
                             f"{r['mem_ratio_d3etr_over_baseline_plus_teacher']:.2f}x | "
                             f"{r['mem_ratio_cache_over_baseline']:.2f}x |")
    else:
        lines += ["", "peak GPU memory: not measured (not a CUDA device)"]
    cb = res.get("cache_build")
    if cb is not None:
        lines += ["", "| cache build (1 actor) | image views | image size | storage | device | pipeline | images/s | "
                  "actor busy | compute + write | start-up |", "|---|---|---|---|---|---|---|---|---|---|"]
        if "error" in cb or "skipped" in cb:
            lines.append(f"| {c['teacher']} | {cb.get('error') or cb.get('skipped')} |||||||||")
        else:
            lines.append(f"| {c['teacher']}, batch {cb['batch']} | {cb['images']} ({cb['views']} views x "
                         f"{cb['dataset_images']}) | {cb['image_size']} | {cb['attention']} | {cb['device']} | "
                         f"{cb['pipeline']} | {cb['images_per_s']:.2f} | {100 * cb['actor_busy']:.0f}% | "
                         f"{cb['seconds']:.1f} s | {cb['startup_s']:.1f} s |")
    lines += ["", f"wall time {res['wall_s']:.0f} s of a {c['time_budget_s']:.0f} s budget"]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_cache-child":
        print(json.dumps(cache_child(json.loads(sys.argv[2]))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu only makes sense with --smoke)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 2,8; --pair realtime 4,16; --smoke 2)")
    ap.add_argument("--size", default=None, help="HxW of the input batch (default 800x1066; --pair realtime 640x640; --smoke 128x128)")
    ap.add_argument("--pair", default="official", choices=("official", "realtime"),
                    help="official: Conditional DETR R101 -> R50 (default); realtime: RT-DETR R50 -> R18 at 640x640")
    ap.add_argument("--recipes", default=None,
                    help="--pair realtime: comma list of recipes (default: every listed recipe that uses a teacher)")
    ap.add_argument("--teach-targets", type=int, default=hfd.TEACH_TARGETS,
                    help=f"teacher boxes per image for Teach-DETR (default {hfd.TEACH_TARGETS}; 0: the recipe's "
                         "score threshold)")
    ap.add_argument("--teacher", default=None, help="default cond_detr_r101 (--smoke cond_detr_r10_tiny)")
    ap.add_argument("--student", default=None, help="default cond_detr_r50 (--smoke cond_detr_r10_tiny)")
    ap.add_argument("--recipe", default="d3etr", help="--pair official: any recipe that uses a teacher (default d3etr)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--attention", default=DEFAULT_ATTENTION_SPEC, help="cache attention codec (kd-detr cache --attention)")
    ap.add_argument("--classes", default=DEFAULT_CLASSES_SPEC, help="cache class storage (kd-detr cache --classes)")
    ap.add_argument("--pipeline", default="auto", choices=("auto", "stream", "actor_pool"),
                    help="cache build pipeline (kd-detr cache --pipeline; auto: stream when Ray sees a GPU)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per batch size (fewer if the budget is near)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch size")
    ap.add_argument("--time-budget-s", type=float, default=450.0, help="whole run, imports included (default 450)")
    ap.add_argument("--cache-reserve-s", type=float, default=150.0,
                    help="part of the budget kept for the cache build (default 150)")
    ap.add_argument("--cache-images", type=int, default=None,
                    help="generated images for the cache build (default 64; --smoke 16); 0 skips it (and Ray)")
    ap.add_argument("--cache-views", type=int, default=2, help="recorded views per image in the cache (default 2)")
    ap.add_argument("--cache-batch", type=int, default=8,
                    help="views per teacher call in the cache build (kd-detr cache --teacher-batch-size, default 8)")
    ap.add_argument("--cache-image-size", type=int, default=None,
                    help="image-size preset of the cache data, 0 = official 800/1333 (default; --smoke 128)")
    ap.add_argument("--no-amp", action="store_true", help="float32 on CUDA too")
    ap.add_argument("--smoke", action="store_true", help="tiny models at 128x128, batch 2: a CPU check of the pipeline (either pair)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    realtime = args.pair == "realtime"
    if realtime:
        if args.teacher or args.student:
            sys.exit("gpu_official.py: --pair realtime has its own teacher and student; drop --teacher/--student")
        if args.cache_images:
            sys.exit("gpu_official.py: --pair realtime runs no cache build; drop --cache-images")
    defaults = (REALTIME_SMOKE if args.smoke else REALTIME) if realtime else (SMOKE if args.smoke else OFFICIAL)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if realtime:
        t, s = realtime_pair(argparse.Namespace(smoke=args.smoke, hw=(640, 640)))[:2]
        args.teacher, args.student = hfd.model_label(t[0]), hfd.model_label(s[0])
        if args.smoke:
            args.teacher += " (shipped card's architecture, random init)"

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"gpu_official.py: --device {args.device} but CUDA is not available here (torch "
                     f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU machine, or check "
                     "the pipeline on the CPU with: python benchmarks/gpu_official.py --smoke --device cpu")
        torch.cuda.set_device(torch.device(args.device))
    elif not args.smoke:
        print("warning: the official models on a CPU take far longer than the time budget; use --smoke",
              file=sys.stderr)
    if args.cache_images and importlib.util.find_spec("ray") is None:
        sys.exit("gpu_official.py: the cache build part needs Ray Data (pip install 'ray[data]'), or skip it with --cache-images 0")
    args.hw = tuple(int(x) for x in args.size.lower().split("x"))
    args.amp = args.device.startswith("cuda") and not args.no_amp
    batches = [int(x) for x in args.batches.split(",")]
    deadline = T0 + args.time_budget_s
    step_deadline = deadline - (args.cache_reserve_s if args.cache_images else 0.0)
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    res: dict = {"device_name": device_name, "torch": torch.__version__,
                 "config": {k: getattr(args, k) for k in ("pair", "teacher", "student", "size", "batches", "recipe",
                                                          "set", "attention", "classes", "amp", "device", "rounds",
                                                          "warmup", "time_budget_s", "cache_reserve_s", "smoke")},
                 "rows": []}
    if realtime:
        names = [r.strip() for r in args.recipes.split(",") if r.strip()] if args.recipes else None
        recipes, res["not_measured"] = hfd.teacher_recipes(names, args.set, args.teach_targets)
        res["config"]["recipes"] = list(recipes)
        res["recipe_overrides"] = [*(f"{k}={v}" for k, v in hfd.timing_overrides(args.teach_targets).items()),
                                   *args.set]
        if args.smoke:
            say("smoke: building the full-size real-time teacher and student once on the CPU")
            res["full_size_models"] = count_full_size()
    prev = None
    for i, batch in enumerate(batches):
        now = time.perf_counter()
        left = step_deadline - now
        if prev is not None:  # set-up + warm-up + one round + memory scale about with the batch
            need = (prev["setup_s"] + (prev["total_s"] - prev["setup_s"]) / prev["rounds"]) * batch / prev["batch"]
            if need > left:
                res["rows"].append({"batch": batch, "skipped": f"needs ~{need:.0f} s, {max(left, 0):.0f} s left"})
                say(f"batch {batch}: skipped (time budget)")
                continue
        share = batch / sum(batches[i:])  # bigger batches get a bigger share of what is left
        if realtime:
            row = bench_realtime_batch(args, batch, now + max(left, 0.0) * share, recipes)
        else:
            row = bench_batch(args, batch, now + max(left, 0.0) * share)
        res["rows"].append(row)
        prev = row
    if args.cache_images:
        timeout = deadline - time.perf_counter() - 5.0
        if timeout < 30:
            res["cache_build"] = {"skipped": f"only {max(timeout, 0):.0f} s of the budget left"}
        else:
            res["cache_build"] = run_cache_build(args, timeout)
    res["wall_s"] = elapsed()
    print(report_realtime(res) if realtime else report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
