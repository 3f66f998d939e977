"""kd-detr performance measurements, side by side in one run: ``python -m benchmarks [--quick]``.

Prints one table of ratios (these machines are noisy: only ratios measured in the same run mean
anything) and writes them to ``--json``:

* D3ETR step vs baseline step with the teacher in process, from a teacher cache, and Ray-served;
  the matching share of the d3etr step; peak memory d3etr / (baseline + teacher);
* cache bytes per image view per storage mode at the official sizes (R50/R101: 800x1066, 300 queries,
  6 layers, 91 classes) and how much of the d3etr attention loss a ``topk`` cache keeps;
* cache build images/s (also with the start-up) and teacher actor busy fraction, the stream pipeline (Ray
  Data) vs the actor pool, with 1 and 2 actors, side by side (``--cache-build-only``: just that table);
  cache read throughput (batches/s in the loader);
* MS-DETR and Co-DETR step time vs baseline.

Tiny models on generated data on the CPU (about 5-10 minutes on 2 cores); on a GPU add
``--official`` for the R101 -> R50 step at 800x1066 (``benchmarks/distill_step.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from kd_detr import data as kd_data  # noqa: E402
from kd_detr.criterion import SetCriterion, weighted_total  # noqa: E402
from kd_detr.data.view_plan import PlanViews, ViewPlan  # noqa: E402
from kd_detr.engine.recipe import load_recipe  # noqa: E402
from kd_detr.engine.step import batch_losses  # noqa: E402
from kd_detr.engine.optim import param_groups  # noqa: E402
from kd_detr.methods import build_methods  # noqa: E402
from kd_detr.methods.d3etr import D3ETRLoss  # noqa: E402
from kd_detr.models import DetectorRequest, build_model, save_model  # noqa: E402
from kd_detr.teacher import InProcessTeacher, TeacherOutputs  # noqa: E402
from kd_detr.teacher.cache.attention_codec import DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC  # noqa: E402

TEACHER = ("cond_detr_r18_tiny", {"dec_layers": 2, "num_queries": 30})  # same depth/queries as the student
STUDENT = ("cond_detr_r10_tiny", {})
DEFAULT_STORE = (DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC)  # the cache the builds write and the reads use


def _median_time(fn, rounds: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + rounds):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Steps:
    """Baseline / d3etr (in-process, cached, served) / objective steps on the same batches."""

    def __init__(self, dataset, plan, teacher_model, recipe_overrides=(), batch: int = 8):
        torch.manual_seed(0)
        self.student = build_model(STUDENT[0], num_classes=dataset.label_map.num_classes, **STUDENT[1]).train()
        self.teacher_model = teacher_model
        self.dataset, self.plan = dataset, plan
        self.criterion = SetCriterion(self.student.config.num_classes, num_dec_layers=self.student.config.dec_layers)
        self.recipe = load_recipe("d3etr", list(recipe_overrides))
        self.kd = D3ETRLoss(self.recipe.distill, self.student.config, teacher_model.config, self.criterion)
        self.teacher = InProcessTeacher(teacher_model, attn=self.kd.attn_mode)
        self.opt = torch.optim.AdamW(param_groups(self.student, 1e-4, 1e-5, 1e-4), lr=1e-4)
        views = PlanViews(dataset, plan)
        # batch j of view 0: images j*B .. (j+1)*B - 1, each with its recorded view 0
        self.batches = {(0, j): PlanViews.collate([views[(i, 0)] for i in range(j * batch, min((j + 1) * batch,
                                                                                               plan.num_images))])
                        for j in range(2)}

    def _update(self, loss, extra=()):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 0.1)
        self.opt.step()

    def baseline(self, batch):
        images, mask, targets = batch[:3]
        loss = weighted_total(self.criterion(self.student(images, mask), targets), self.criterion.weight_dict)
        self._update(loss)

    def d3etr(self, batch, teacher_out=None, teacher=None):
        images, mask, targets = batch[:3]
        if teacher_out is None:
            teacher_out = (teacher or self.teacher)(images, mask)
        total, *_ = batch_losses(self.student, self.criterion, images, mask, targets, [self.kd], teacher_out)
        self._update(total)

    def objective(self, batch, objectives):
        images, mask, targets = batch[:3]
        total, *_ = batch_losses(self.student, self.criterion, images, mask, targets, objectives,
                                 raw_model=self.student)
        self._update(total)


def _loader_loops(steps: Steps, ds, plan, reader, args) -> dict[str, list[float]]:
    """Seconds per step of the training loop's shape, side by side: a DataLoader (one worker, as the quickstart
    runs) gives batches of view 0 and the d3etr step runs on each. ``loop_d3etr_cache``: the worker also reads
    and decodes the cached teacher outputs (what ``kd-detr distill --teacher-cache`` does);
    ``loop_d3etr_given_teacher``: the same batches with the same teacher outputs decoded before the timing."""
    per = args.batch
    keys = [[(i, 0) for i in range(j * per, (j + 1) * per)] for j in range(plan.num_images // per)]
    given = [TeacherOutputs.stack_views([reader.view_outputs(i, k) for i, k in b]) for b in keys]

    def loader(source):
        return torch.utils.data.DataLoader(PlanViews(ds, plan, source), batch_sampler=keys, num_workers=1,
                                           collate_fn=PlanViews.collate, persistent_workers=True)

    from_cache, plain = loader(reader), loader(None)

    def loop_cache():
        for b in from_cache:
            steps.d3etr(b, teacher_out=b.teacher)

    def loop_given():
        for j, b in enumerate(plain):
            steps.d3etr(b, teacher_out=given[j])

    t: dict[str, list[float]] = {"loop_d3etr_cache": [], "loop_d3etr_given_teacher": []}
    for i in range(args.rounds + 1):  # round 0 starts the workers and opens the shards: not timed
        for name, fn in (("loop_d3etr_cache", loop_cache), ("loop_d3etr_given_teacher", loop_given)):
            t0 = time.perf_counter()
            fn()
            if i:
                t[name].append((time.perf_counter() - t0) / len(keys))
    return t


def section_bytes(res: dict) -> None:
    """Bytes per view at official sizes (6 layers, 300 queries, 91 classes, 800x1066) for each storage mode:
    predictions only and with attention, dense and top-k classes; the default is ``kd-detr cache``'s."""
    from kd_detr.teacher.cache import StoreConfig, bytes_per_view

    old = bytes_per_view(StoreConfig.parse("topk:32"))  # format 1's default: dense fp16 classes, topk:32
    modes = [(a, c) for c in ("dense", DEFAULT_CLASSES_SPEC) for a in ("none", "topk:8", DEFAULT_ATTENTION_SPEC,
                                                                        "topk:32", "full")]
    for attention, classes in modes:
        n = bytes_per_view(StoreConfig.parse(attention, classes=classes))
        res[f"cache_bytes_per_view[attention {attention}, classes {classes}]"] = n
    default = bytes_per_view(StoreConfig.parse(DEFAULT_ATTENTION_SPEC, classes=DEFAULT_CLASSES_SPEC))
    res["cache_bytes_per_view[default] / [topk:32 dense classes]"] = default / old
    res["cache_bytes_per_view[full per_head]"] = bytes_per_view(StoreConfig.parse("full", heads="per_head"))


def section_cache_build(res: dict, spec, ds, plan, work: Path, args) -> list[dict]:
    """Cache build throughput, the stream pipeline (Ray Data) vs the actor pool, 1 and 2 teacher actors, on the
    same plan and store: images/s of the compute (from the first actor ready), images/s with the start-up
    (Ray Data, actors loading the teacher), and how busy the teacher actors were. Rounds are interleaved (load
    from other processes hits every configuration alike) and the best round of each is kept. ``work/cache1``
    (actor pool, 1 actor) is the cache the read benchmarks use."""
    import shutil

    from kd_detr.teacher.cache import StoreConfig
    from kd_detr.teacher.cache.build import build_cache

    store = StoreConfig.parse(DEFAULT_STORE[0], classes=DEFAULT_STORE[1])  # what `kd-detr cache` stores by default
    best: dict[tuple[str, int], dict] = {}
    for r in range(args.build_rounds):
        for actors in (1, 2):
            for pipeline in ("actor_pool", "stream"):
                out = work / (f"cache{actors}" if pipeline == "actor_pool" else f"cache{actors}_{pipeline}")
                shutil.rmtree(out, ignore_errors=True)
                s = build_cache(spec, ds, plan, out, store, actors=actors,
                                images_per_shard=2 * args.batch, progress=False, image_size=args.size,
                                num_threads=max(1, 2 // actors), pipeline=pipeline, teacher_batch_size=args.batch)
                b = {"pipeline": pipeline, "actors": actors, "images_per_s": s["images_per_s"],
                     "with_startup": s["images"] / (s["startup_s"] + s["seconds"]), "startup_s": s["startup_s"],
                     "busy": s["actor_busy"]}
                if (pipeline, actors) not in best or b["images_per_s"] > best[pipeline, actors]["images_per_s"]:
                    best[pipeline, actors] = b
    for (pipeline, actors), b in best.items():
        res[f"cache_build_images_per_s[{pipeline}, {actors} actor]"] = b["images_per_s"]
        res[f"cache_build_images_per_s incl. start-up[{pipeline}, {actors} actor]"] = b["with_startup"]
        res[f"cache_build_actor_busy[{pipeline}, {actors} actor]"] = b["busy"]
    return list(best.values())


def _print_cache_builds(builds: list[dict], plan, args) -> None:
    print(f"## cache build ({plan.num_images} images x {plan.num_views} views = {plan.num_images * plan.num_views} "
          f"image views, {args.size}px, teacher {TEACHER[0]}, --attention {DEFAULT_STORE[0]} --classes {DEFAULT_STORE[1]}, CPU, {os.cpu_count()} cores; stream teacher "
          f"batch {args.batch}; best of {args.build_rounds} interleaved rounds)")
    print("| pipeline | actors | img/s | img/s incl. start-up | start-up s | actor busy |")
    print("|---|---|---|---|---|---|")
    for b in builds:
        print(f"| {b['pipeline']} | {b['actors']} | {b['images_per_s']:.1f} | {b['with_startup']:.1f} | "
              f"{b['startup_s']:.1f} | {100 * b['busy']:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=64, help="generated training images")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and images (a smoke run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache-build-only", action="store_true",
                    help="only the cache build comparison (stream vs actor_pool, 1 and 2 actors)")
    ap.add_argument("--build-rounds", type=int, default=2, help="cache builds per configuration (the best is kept)")
    ap.add_argument("--official", action="store_true",
                    help="also run benchmarks/distill_step.py for cond_detr_r101 -> cond_detr_r50 at 800x1066 "
                         "(batch 8 on a GPU, 2 on the CPU)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.images, args.build_rounds = 2, 32, 1
    torch.set_num_threads(2)
    res: dict = {"device": "cpu", "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch}
    work = Path(tempfile.mkdtemp(prefix="kd_detr_bench_"))
    data = kd_data.generate_synthetic(work / "data", num_train=args.images, num_val=8, image_size=args.size, seed=0,
                                      progress=False)
    ds = kd_data.CocoDetection(data / "train2017", data / "annotations" / "instances_train2017.json",
                               transforms=kd_data.make_policy(True, args.size), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    torch.manual_seed(1)
    teacher_model = build_model(TEACHER[0], num_classes=ds.label_map.num_classes, **TEACHER[1])
    teacher_path = work / "teacher.safetensors"
    save_model(teacher_model, teacher_path, label_map=ds.label_map, extra_metadata={"image_size": args.size})

    # ---- cache: build throughput with 1 and 2 actors (Ray), bytes, read throughput
    import ray

    from kd_detr.teacher import resolve_teacher
    from kd_detr.teacher.cache import CacheReader, StoreConfig

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    spec = resolve_teacher(TEACHER[0], str(teacher_path))
    builds = section_cache_build(res, spec, ds, plan, work, args)
    if args.cache_build_only:
        ray.shutdown()
        _print_cache_builds(builds, plan, args)
        return
    section_bytes(res)
    reader = CacheReader(work / "cache1")
    keys = plan.all_views()
    batches = [keys[b:b + args.batch] for b in range(0, len(keys), args.batch)]
    loader = torch.utils.data.DataLoader(PlanViews(ds, plan, reader), batch_sampler=batches, num_workers=1,
                                         collate_fn=PlanViews.collate)
    t0 = time.perf_counter()
    n = sum(1 for _ in loader)
    res["cache_read_batches_per_s (images + teacher, 1 worker)"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for batch_keys in batches:
        TeacherOutputs.stack_views([reader.view_outputs(i, k) for i, k in batch_keys])
    res["cache_read_teacher_only_batches_per_s"] = len(batches) / (time.perf_counter() - t0)

    # ---- steps side by side on the same plan batches
    steps = Steps(ds, plan, teacher_model, batch=args.batch)
    batch = steps.batches[(0, 0)]
    given = steps.teacher(batch[0], batch[1])  # computed once, outside the timing
    from kd_detr.teacher.ray_serving import RayTeacherServer
    server = RayTeacherServer(spec, steps.kd.attn_mode, actors=1, prefetch=2, num_threads=1)
    phases = {
        "baseline": lambda: steps.baseline(batch),
        "teacher_fwd": lambda: steps.teacher(batch[0], batch[1]),
        "d3etr_inprocess": lambda: steps.d3etr(batch),
        "d3etr_given_teacher": lambda: steps.d3etr(batch, teacher_out=given),
        # read + decode in the step itself (the loader workers overlap it with compute in real runs)
        "d3etr_cache": lambda: steps.d3etr(batch, teacher_out=TeacherOutputs.stack_views(
            [reader.view_outputs(i, 0) for i in range(args.batch)])),
        "d3etr_ray_served": lambda: steps.d3etr(batch, teacher=server),
    }
    t = {}
    for name in phases:  # interleave rounds so drift hits every phase alike
        t[name] = []
    for i in range(args.rounds + 1):
        for name, fn in phases.items():
            t0 = time.perf_counter()
            steps.kd.match_seconds = {"adaptive": 0.0, "gt": 0.0}
            fn()
            if i:
                t[name].append(time.perf_counter() - t0)
                if name == "d3etr_inprocess":
                    t.setdefault("matching", []).append(sum(steps.kd.match_seconds.values()))
    server.close()
    t.update(_loader_loops(steps, ds, plan, reader, args))
    med = {k: statistics.median(v) for k, v in t.items()}
    res.update({f"step_s[{k}]": v for k, v in med.items()})
    step_wo_teacher = med["d3etr_given_teacher"]
    res["ratio d3etr_inprocess / (baseline + teacher)"] = med["d3etr_inprocess"] / (med["baseline"] + med["teacher_fwd"])
    res["ratio d3etr_cache / d3etr without teacher forward (read + decode in the step)"] = (
        med["d3etr_cache"] / step_wo_teacher)
    res["ratio d3etr_cache / d3etr without teacher forward (training loop: loader worker reads)"] = (
        med["loop_d3etr_cache"] / med["loop_d3etr_given_teacher"])
    res["ratio d3etr_cache / baseline"] = med["d3etr_cache"] / med["baseline"]
    res["ratio d3etr_ray_served / d3etr_inprocess (same device; overlap needs a 2nd device)"] = (
        med["d3etr_ray_served"] / med["d3etr_inprocess"])
    res["matching share of d3etr step"] = med["matching"] / med["d3etr_inprocess"]

    # ---- how much of the attention loss a topk cache keeps (same batch, same student state)
    full_t = steps.teacher(batch[0], batch[1])
    out = steps.student(batch[0], batch[1],
                        request=DetectorRequest(query_groups=steps.kd.extra_groups(full_t), attention=True))
    nb = steps.criterion.num_boxes(batch[2], batch[0].device)
    full_terms = steps.kd(steps.student, out, batch[2], nb, full_t)
    for k in (4, 8, 32):
        from kd_detr.teacher.cache import decode_attention, encode_attention
        cfg = StoreConfig.parse(f"topk:{k}")
        t_k = full_t.to()
        s_keys = full_t.self_attn.shape[-1]
        c_keys = full_t.cross_attn.shape[-1]
        t_k.self_attn = decode_attention(encode_attention(full_t.self_attn, cfg), cfg, s_keys)
        t_k.cross_attn = decode_attention(encode_attention(full_t.cross_attn, cfg), cfg, c_keys)
        terms = steps.kd(steps.student, out, batch[2], nb, t_k)
        for kind in ("self_attn", "cross_attn"):
            a = sum(float(v.detach()) for n_, v in full_terms.items() if f".{kind}." in n_)
            b = sum(float(v.detach()) for n_, v in terms.items() if f".{kind}." in n_)
            res[f"topk:{k} {kind} loss / full loss"] = b / a if a else float("nan")

    # ---- MS-DETR / Co-DETR vs baseline
    for name in ("ms_detr", "co_detr"):
        try:
            r = load_recipe(name)
            objs = build_methods(r.sections, steps.student.config, steps.criterion)
            steps.opt.add_param_group({"params": [p for o in objs for p in o.parameters()], "lr": 1e-4})
            tb = _median_time(lambda: steps.baseline(batch), args.rounds)
            to = _median_time(lambda: steps.objective(batch, objs), args.rounds)
            res[f"ratio {name} / baseline step"] = to / tb
        except Exception as e:  # noqa: BLE001 - report, keep the other figures
            res[f"ratio {name} / baseline step"] = f"failed: {e}"
    ray.shutdown()

    if args.official:
        import subprocess
        gpu = torch.cuda.is_available()
        cmd = [sys.executable, str(Path(__file__).parent / "distill_step.py"), "--teacher", "cond_detr_r101",
               "--student", "cond_detr_r50", "--size", "800x1066", "--batch", "8" if gpu else "2",
               "--rounds", "3" if gpu else "2", "--json", str(work / "official.json")] + (["--amp"] if gpu else [])
        subprocess.run(cmd, check=True)
        official = json.loads((work / "official.json").read_text())
        for k in ("time_ratio", "adaptive_match_share", "all_match_share", "mem_ratio"):
            if k in official:
                res[f"official r101->r50 {k}"] = official[k]

    width = max(len(k) for k in res)
    print(f"## kd-detr benchmarks (CPU, {res['threads']} threads, {args.size}px, batch {args.batch}, "
          f"teacher {TEACHER[0]} -> student {STUDENT[0]}, median of {args.rounds} rounds)")
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    _print_cache_builds(builds, plan, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
