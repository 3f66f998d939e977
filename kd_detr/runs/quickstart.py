"""``kd-detr quickstart``: the whole teacher -> cache -> distill -> compare flow on generated data, on a CPU.

1. generate the synthetic COCO-format data set;
2. the teacher: the quickstart's shipped card (``teachers/quickstart_teacher.toml``; the real-time quickstart's
   ``teachers/rt_detr_quickstart_teacher.toml``) when its checkpoint exists, otherwise (or with
   ``--train-teacher``) one trained here with ``kd-detr train`` for ``teacher_iters``;
3. cache the teacher's decoder outputs on a K-view plan with Ray actors;
4. ``kd-detr compare`` of the baseline and a distillation recipe (``d3etr``; ``teach_detr`` for the RT-DETR
   student) for the same student, budget and seed, from the cache;
5. print the comparison table and where the plots are.

Every step is resumable: a rerun reuses the data, the teacher, the cache and finished runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

# The quickstart's task: each category has its own colour (generate_synthetic(class_colours=True)), 1-4
# objects of at least 20 px on a lightly cluttered grey background. The default data (category = shape,
# colour uninformative, 1-8 objects from 10 px) keeps a tiny from-scratch DETR near 0 AP for 10k CPU
# iterations (docs/cpu-convergence.md); this one is learnt in minutes yet leaves room for a teacher.
QUICKSTART_DATA = dict(num_train=1024, num_val=100, image_size=128, seed=0, objects_per_image=(1, 4), clutter=0.3,
                       min_object_size=20.0, class_colours=True)
# The teacher trains on 4x the students' images from the same generator: with the same seed, image i is
# the same in both sets, so the students' training images are the first quarter of the teacher's.
TEACHER_DATA_FACTOR = 4


@dataclass(frozen=True)
class Quickstart:
    """One quickstart: its shipped teacher (card, architecture, how it is trained) and its student (architecture,
    recipes compared, the ``--set`` overrides every recipe gets).

    ``teacher_train(iters)`` gives the teacher's ``kd-detr train`` settings beyond those every quickstart teacher
    shares (:func:`teacher_train_config`); the card's recorded command is written from the same values."""

    name: str
    card: str
    teacher: str
    teacher_opts: Mapping[str, Any]
    teacher_train: Callable[[int], dict]
    teacher_iters: int
    student: str
    student_opts: Mapping[str, Any]
    recipes: tuple[str, ...]
    student_sets: Callable[[int], list[str]]
    teacher_step_s: float  # seconds per teacher iteration on an idle 2-core CPU (the time estimate printed)


def _cond_detr_student_sets(iters: int) -> list[str]:
    return ["train.batch_size=8", "train.lr=4e-4", "train.lr_backbone=4e-4",
            f"train.warmup_iters={min(100, iters // 5)}", f"train.lr_drop_iter={int(iters * 0.8)}",
            "train.log_every=10",
            # the student is narrower (d=64) than the teacher (d=128)
            "distill.fixed_group.query_projection=\"linear\""]


def _rt_detr_student_sets(iters: int) -> list[str]:
    # the quickstart's budget and schedule, as the Conditional DETR student's (batch 8, lr 4e-4 for a run of
    # minutes rather than RT-DETR's 72 epochs, a short warm-up, x0.1 for the last fifth); the rest is the
    # family's preset: its parameter groups (no decay on norms and biases; the random-init backbone at lr),
    # EMA and clipping
    return ["train.batch_size=8", "train.lr=4e-4", f"train.warmup_iters={min(100, iters // 5)}",
            f"train.lr_drop_iter={int(iters * 0.8)}", "train.log_every=10"]


# The RT-DETR teacher: the tiny registered RT-DETR widened to d = 128 on a ResNet-18-shaped backbone at half
# width (about 6.6 M parameters, 13 MB in float16), trained from scratch by its family's preset; the backbone
# trains at the base rate (the preset's 0.1x is for an ImageNet-initialised one) and its BatchNorms learn.
RT_DETR_TEACHER_OPTS = {
    "d_model": 128, "encoder_hidden_dim": 128, "decoder_in_channels": [128, 128, 128], "encoder_ffn_dim": 512,
    "decoder_ffn_dim": 512, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "backbone_config.embedding_size": 32, "backbone_config.hidden_sizes": [32, 64, 128, 256],
    "backbone_config.depths": [2, 2, 2, 2], "encoder_in_channels": [64, 128, 256],
    "freeze_backbone_batch_norms": False, "decoder_n_points": 4, "hidden_expansion": 1.0, "num_denoising": 30,
}

QUICKSTARTS: dict[str, Quickstart] = {
    "cond_detr": Quickstart(
        "cond_detr", "quickstart_teacher", "cond_detr_r10_tiny", {"dec_layers": 3, "num_queries": 30},
        lambda iters: dict(lr=4e-4, lr_backbone=4e-4, warmup_iters=min(100, iters // 5), checkpoint_every=1000),
        16000, "cond_detr_r10_tiny", {"dec_layers": 3, "num_queries": 30, "d_model": 64, "dim_feedforward": 256},
        ("baseline", "d3etr"), _cond_detr_student_sets, 0.14),  # docs/cpu-convergence.md
    "rt_detr": Quickstart(
        "rt_detr", "rt_detr_quickstart_teacher", "hf_rt_detr_tiny", RT_DETR_TEACHER_OPTS,
        lambda iters: dict(preset="rt_detr", lr=2e-4, lr_backbone=2e-4, warmup_iters=min(500, iters // 5),
                           checkpoint_every=500),
        # teach_detr: the best of the recipes measured from this teacher at the quickstart's budget (README)
        8000, "hf_rt_detr_tiny", {}, ("baseline", "teach_detr"), _rt_detr_student_sets, 0.3),  # its card's run
}
DEFAULT_QUICKSTART = "cond_detr"

# the default quickstart's names (the published figures and the shipped Conditional DETR teacher)
TEACHER_ITERS = QUICKSTARTS[DEFAULT_QUICKSTART].teacher_iters
TEACHER = QUICKSTARTS[DEFAULT_QUICKSTART].teacher
TEACHER_OPTS = dict(QUICKSTARTS[DEFAULT_QUICKSTART].teacher_opts)
STUDENT = QUICKSTARTS[DEFAULT_QUICKSTART].student
STUDENT_OPTS = dict(QUICKSTARTS[DEFAULT_QUICKSTART].student_opts)


def get_quickstart(name: str | Quickstart) -> Quickstart:
    if isinstance(name, Quickstart):
        return name
    if name not in QUICKSTARTS:
        raise ValueError(f"unknown quickstart {name!r}; choose one of {sorted(QUICKSTARTS)}")
    return QUICKSTARTS[name]


def shipped_card(setup: str | Quickstart = DEFAULT_QUICKSTART) -> Path:
    """The quickstart teacher's card shipped with kd-detr (``teachers/<card>.toml``)."""
    from kd_detr.zoo import builtin_dir

    return builtin_dir("teachers") / f"{get_quickstart(setup).card}.toml"


def teacher_train_config(data_dir: Path, out: Path, iters: int, seed: int = 0, progress: bool = True,
                         setup: str | Quickstart = DEFAULT_QUICKSTART):
    """The exact ``kd-detr train`` settings of the quickstart teacher (also recorded in its card)."""
    from kd_detr.engine.trainer import TrainConfig

    q = get_quickstart(setup)
    return TrainConfig(model=q.teacher, model_overrides=dict(q.teacher_opts), data=str(data_dir),
                       image_size=QUICKSTART_DATA["image_size"], batch_size=8, max_iters=iters, lr_drop=None,
                       lr_drop_iter=int(iters * 0.8), eval_every_epochs=0, eval_every_iters=max(iters // 4, 1),
                       eval_batch_size=16, num_workers=1, output_dir=str(out), seed=seed, resume="auto",
                       progress=progress, **q.teacher_train(iters))


# Student runs at a time on a CPU machine with at least this many cores (the published figures' setting).
QUICKSTART_PARALLEL = 2


def run_quickstart(out: Path, iters: int = 2000, seed: int = 0, echo: Callable[[str], None] = print,
                   train_teacher: bool = False, teacher_iters: Optional[int] = None, views: int = 2, actors: int = 2,
                   num_train: Optional[int] = None, num_val: Optional[int] = None, progress: bool = True,
                   parallel: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
                   setup: str | Quickstart = DEFAULT_QUICKSTART) -> dict:
    """Run the flow; returns ``{recipe: comparison row}``. ``seed`` seeds the runs and the cache's views (the
    data is always the teacher's, generated with ``QUICKSTART_DATA["seed"]``). ``seeds`` (e.g. ``[0, 1, 2]``)
    runs every recipe once per seed from the one cache whose views ``seeds[0]`` seeds, and the table gives
    mean ± std and the paired gain per seed; the run of ``seeds[0]`` is the single-seed quickstart's.
    ``setup``: which quickstart (:data:`QUICKSTARTS`: ``cond_detr``, the default, or ``rt_detr``)."""
    from kd_detr.data import generate_synthetic

    from .compare import compare, format_table

    q = get_quickstart(setup)
    teacher_iters = q.teacher_iters if teacher_iters is None else teacher_iters
    out = Path(out)
    if parallel is None:
        # the two student runs side by side, one thread each: tiny models scale poorly across threads, so on
        # 2 cores this takes 0.64x the wall time of one after another (benchmarks/compare_parallel.py)
        parallel = QUICKSTART_PARALLEL if (os.cpu_count() or 1) >= QUICKSTART_PARALLEL else 1
    seeds = list(seeds) if seeds else [seed]
    seed = seeds[0]
    data_params = dict(QUICKSTART_DATA)
    if num_train is not None:
        data_params["num_train"] = num_train
    if num_val is not None:
        data_params["num_val"] = num_val
    data_dir = out / "data"
    t0 = time.perf_counter()
    echo(f"[1/5] synthetic data in {data_dir} ({data_params['num_train']} train / {data_params['num_val']} val, "
         f"{data_params['image_size']} px, one colour per category)")
    generate_synthetic(data_dir, progress=False, **data_params)

    teacher_ckpt = _teacher(out, data_dir, seed, echo, train_teacher, teacher_iters, progress, q)

    cache_dir = out / "cache"
    echo(f"[3/5] caching the teacher's decoder outputs ({views} views per image, Ray actors: {actors}) in {cache_dir}")
    t = time.perf_counter()
    build_quickstart_cache(teacher_ckpt, data_dir, cache_dir, views, actors, seed, progress, setup=q)
    echo(f"      {time.perf_counter() - t:.0f} s")

    per_seed = f", seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else ""
    opts = f" {dict(q.student_opts)}" if q.student_opts else ""
    echo(f"[4/5] distilling {q.student}{opts}: {' and '.join(q.recipes)}, {iters} iterations each{per_seed}, "
         "from the cache")
    cfg = compare_config(out, teacher_ckpt, cache_dir, iters, seeds, parallel, progress, recipes=q.recipes, setup=q)
    rows, files = compare(cfg)
    echo("[5/5] comparison (COCOeval on the validation images):")
    echo(format_table(rows, len(seeds)))
    echo(f"plots: {files['ap_plot']} and {files['loss_plot']}; detections: {files.get('gallery', 'n/a')}; "
         f"table: {files['markdown']} and {files['csv']}; "
         f"total {time.perf_counter() - t0:.0f} s")
    return {r["recipe"]: r for r in rows}


def compare_config(out: Path, teacher_ckpt: Path, cache_dir: Path, iters: int, seeds: Sequence[int], parallel: int,
                   progress: bool = True, recipes: Optional[Sequence[str]] = None, compare_dir: str = "compare",
                   setup: str | Quickstart = DEFAULT_QUICKSTART):
    """The quickstart's ``kd-detr compare`` of ``recipes`` (default: the quickstart's) from the cache
    ``cache_dir`` into ``out/compare_dir``."""
    from kd_detr.data import DataSpec

    from .compare import CompareConfig

    q = get_quickstart(setup)
    return CompareConfig(student=q.student, student_overrides=dict(q.student_opts),
                         recipes=list(recipes or q.recipes), out=str(out / compare_dir), budget=iters,
                         teacher=q.teacher, teacher_checkpoint=str(teacher_ckpt), teacher_cache=str(cache_dir),
                         seeds=list(seeds),
                         data=DataSpec(str(out / "data"), image_size=QUICKSTART_DATA["image_size"]), num_workers=1,
                         eval_points=3, overrides=q.student_sets(iters), progress=progress, parallel=parallel)


def student_overrides(iters: int, setup: str | Quickstart = DEFAULT_QUICKSTART) -> list[str]:
    """``--set`` overrides of the quickstart's student runs (every recipe gets the same)."""
    return get_quickstart(setup).student_sets(iters)


def _teacher(out: Path, data_dir: Path, seed: int, echo, train_teacher: bool, teacher_iters: int,
             progress: bool = True, setup: str | Quickstart = DEFAULT_QUICKSTART) -> Path:
    """The shipped quickstart teacher, or one trained here (``--train-teacher``, or no shipped weights)."""
    from kd_detr.data import generate_synthetic
    from kd_detr.teacher.card import load_card
    from kd_detr.engine.trainer import train

    q = get_quickstart(setup)
    shipped = shipped_card(q)
    if not train_teacher and shipped.exists():
        card = load_card(str(shipped))
        path = card.checkpoint_path()
        if path.exists():
            echo(f"[2/5] teacher: {shipped.name} ({card.model}, known AP {card.known_ap} on the validation images)")
            return path
    teacher_dir = out / "teacher"
    final = teacher_dir / "model_final.safetensors"
    trained_card = teacher_dir / f"{q.card}.toml"
    if trained_card.exists():
        card = load_card(str(trained_card))
        # a rerun reuses the teacher trained here (the cache and runs were made with it); to train it
        # anew, delete OUT/teacher
        if card.training.get("iterations") == teacher_iters and card.checkpoint_path().exists():
            echo(f"[2/5] teacher: reusing {card.checkpoint_path()} trained here (AP {card.known_ap})")
            return card.checkpoint_path()
    teacher_data = out / "teacher_data"
    ann = data_dir / "annotations"
    params = dict(QUICKSTART_DATA, num_train=TEACHER_DATA_FACTOR * _num_images(ann / "instances_train2017.json"),
                  num_val=_num_images(ann / "instances_val2017.json"))
    minutes = max(1, round(teacher_iters * q.teacher_step_s / 60))
    opts = " ".join(f"{k}={_arg(v)}" for k, v in q.teacher_opts.items())
    echo(f"[2/5] training the teacher {q.teacher} ({opts}) for {teacher_iters} iterations on "
         f"{params['num_train']} images (kd-detr train); on a 2-core CPU that takes about {minutes} "
         f"minute{'s' if minutes > 1 else ''}, resumable")
    generate_synthetic(teacher_data, progress=False, **params)
    t = time.perf_counter()
    train(teacher_train_config(teacher_data, teacher_dir, teacher_iters, seed, progress, setup=q))
    minutes = (time.perf_counter() - t) / 60
    card = write_teacher_card(final, teacher_dir, data_dir, params, teacher_iters, seed, minutes, setup=q)
    echo(f"      teacher AP {card.known_ap} after {minutes:.1f} minutes; card {card.source} (copy it and "
         f"{card.checkpoint} into teachers/ to ship this teacher)")
    return card.checkpoint_path()


def _arg(value: Any) -> str:
    """A value as the command line writes it (``4e-4``, ``[32,64]``, ``false``)."""
    if isinstance(value, bool) or isinstance(value, (list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float) and value < 0.01:
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.0e}")
    return str(value)


def teacher_commands(iters: Optional[int] = None, seed: int = 0, num_train: Optional[int] = None,
                     setup: str | Quickstart = DEFAULT_QUICKSTART) -> list[str]:
    """The shell commands that train the quickstart teacher: the same settings as :func:`teacher_train_config`."""
    q = get_quickstart(setup)
    iters = q.teacher_iters if iters is None else iters
    d = QUICKSTART_DATA
    n = num_train or TEACHER_DATA_FACTOR * d["num_train"]
    lo, hi = d["objects_per_image"]
    own = q.teacher_train(iters)
    flags = [("preset", own.get("preset")), ("data", "teacher_data"), ("image-size", d["image_size"]),
             ("batch-size", 8), ("lr", own["lr"]), ("lr-backbone", own["lr_backbone"]), ("max-iters", iters),
             ("warmup-iters", own["warmup_iters"]), ("lr-drop-iter", int(iters * 0.8)), ("seed", seed),
             ("num-workers", 1), ("eval-every-epochs", 0), ("eval-every-iters", max(iters // 4, 1)),
             ("eval-batch-size", 16), ("checkpoint-every", own["checkpoint_every"]), ("output-dir", "teacher"),
             ("resume", "auto")]
    model_opts = " ".join(f"--model-opt {shlex.quote(f'{k}={_arg(v)}')}" for k, v in q.teacher_opts.items())
    return [
        f"kd-detr data synth --out teacher_data --train {n} --val {d['num_val']} --image-size {d['image_size']} "
        f"--seed {d['seed']} --objects-per-image {lo} {hi} --clutter {d['clutter']} "
        f"--min-object-size {d['min_object_size']:g} --class-colours",
        f"kd-detr train --model {q.teacher} {model_opts} "
        + " ".join(f"--{flag} {_arg(v)}" for flag, v in flags if v is not None),
    ]


def write_teacher_card(checkpoint: Path, dest: Path, data_dir: Path, data_params: dict, iters: int, seed: int,
                       minutes: float, name: Optional[str] = None, setup: str | Quickstart = DEFAULT_QUICKSTART):
    """Ship a trained quickstart teacher: ``dest/NAME.safetensors`` (float16, half the bytes) and its card
    ``dest/NAME.toml`` (``NAME``: the quickstart's card name) with the AP of those float16 weights on
    ``data_dir``'s validation images and how the teacher was trained (commands, seed, data, minutes)."""
    import tempfile

    import torch

    from kd_detr.atomic import write_text_atomic
    from kd_detr.engine.recipe import recipe_to_toml
    from kd_detr.teacher.card import load_card
    from .inference import evaluate_checkpoint
    from kd_detr.models import load_model, save_model

    q = get_quickstart(setup)
    name = name or q.card
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(checkpoint)
    weights = dest / f"{name}.safetensors"
    save_model(model, weights, label_map=meta.get("label_map"), extra_metadata=meta.get("extra_metadata"),
               dtype=torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        result, _ = evaluate_checkpoint(weights, data=str(data_dir), image_size=QUICKSTART_DATA["image_size"],
                                        num_workers=0, batch_size=8, output_dir=tmp, device="cpu")
    metrics = result.metrics
    doc = {
        "name": name, "model": q.teacher, "checkpoint": weights.name, "format": "safetensors",
        "num_classes": model.config.num_classes, "label_map": "contiguous",
        "image_size": QUICKSTART_DATA["image_size"], "known_ap": round(100 * metrics["AP"], 1),
        "ap_reference": f"COCO AP (%) of these float16 weights on the {data_params['num_val']} validation images "
                        "of the quickstart data (kd_detr.runs.quickstart.QUICKSTART_DATA)",
        "model_overrides": {**q.teacher_opts, "num_classes": model.config.num_classes},
        "training": {
            "commands": teacher_commands(iters, seed, data_params["num_train"], setup=q), "seed": seed,
            "iterations": iters, "minutes": round(minutes, 1), "machine": _machine(),
            "metrics": {k: round(100 * v, 1) for k, v in metrics.items() if k.startswith("AP")},
            "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_params.items()},
        },
    }
    card_path = dest / f"{name}.toml"
    header = (f"# The {q.name} quickstart's teacher ({q.teacher}): trained by kd-detr's own `kd-detr train` on the "
              "quickstart's\n# synthetic data (one colour per category); written by "
              "kd_detr.runs.quickstart.write_teacher_card.\n")
    write_text_atomic(card_path, header + recipe_to_toml(doc))
    return load_card(str(card_path))


def _machine() -> str:
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads as `kd-detr train` sets them"


def _num_images(ann_file: Path) -> int:
    return len(json.loads(ann_file.read_text())["images"])


def build_quickstart_cache(teacher_ckpt: Path, data_dir: Path, cache_dir: Path, views: int, actors: int, seed: int,
                           progress: bool, store=None, setup: str | Quickstart = DEFAULT_QUICKSTART) -> dict:
    """The quickstart's teacher cache (``store``: a :class:`~kd_detr.teacher.cache.StoreConfig`, default what
    ``kd-detr cache`` stores by default); returns the build summary."""
    from kd_detr import data as kd_data
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher import resolve_teacher
    from kd_detr.teacher.loading import describe_teacher
    from kd_detr.teacher.cache import StoreConfig
    from kd_detr.teacher.cache.attention_codec import DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC
    from kd_detr.teacher.cache.build import build_cache

    size = QUICKSTART_DATA["image_size"]
    ds = kd_data.CocoDetection(data_dir / "train2017", data_dir / "annotations" / "instances_train2017.json",
                               transforms=kd_data.make_policy(True, size), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=views, seed=seed)
    spec = resolve_teacher(get_quickstart(setup).teacher, str(teacher_ckpt))
    if store is None:  # what `kd-detr cache` stores; no attention maps where the teacher has none (deformable)
        dense = "attention" in describe_teacher(spec, ds.label_map)[0].supports
        store = StoreConfig.parse(DEFAULT_ATTENTION_SPEC if dense else "none", classes=DEFAULT_CLASSES_SPEC)
    return build_cache(spec, ds, plan, cache_dir, store, actors=actors, images_per_shard=64,
                progress=progress, image_size=size, num_threads=1)
