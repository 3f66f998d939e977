"""``kd-detr quickstart``: the whole teacher -> cache -> distill -> compare flow on generated data, on a CPU.

1. generate the synthetic COCO-format data set;
2. the teacher: the card ``teachers/quickstart_teacher.toml`` when its checkpoint exists, otherwise
   (or with ``--train-teacher``) one trained here with ``kd-detr train`` for ``teacher_iters``;
3. cache the teacher's decoder outputs on a K-view plan with Ray actors;
4. ``kd-detr compare`` of ``baseline`` and ``d3etr`` for the same student, budget and seed, from the cache;
5. print the comparison table and where the plots are.

Every step is resumable: a rerun reuses the data, the teacher, the cache and finished runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

# The quickstart's task: each category has its own colour (generate_synthetic(class_colours=True)), 1-4
# objects of at least 20 px on a lightly cluttered grey background. The default data (category = shape,
# colour uninformative, 1-8 objects from 10 px) keeps a tiny from-scratch DETR near 0 AP for 10k CPU
# iterations (docs/cpu-convergence.md); this one is learnt in minutes yet leaves room for a teacher.
QUICKSTART_DATA = dict(num_train=1024, num_val=100, image_size=128, seed=0, objects_per_image=(1, 4), clutter=0.3,
                       min_object_size=20.0, class_colours=True)
# The teacher trains on 4x the students' images from the same generator: with the same seed, image i is
# the same in both sets, so the students' training images are the first quarter of the teacher's.
TEACHER_DATA_FACTOR = 4
TEACHER_ITERS = 16000
TEACHER = "cond_detr_r10_tiny"
TEACHER_OPTS = {"dec_layers": 3, "num_queries": 30}
STUDENT = "cond_detr_r10_tiny"
STUDENT_OPTS = {"dec_layers": 3, "num_queries": 30, "d_model": 64, "dim_feedforward": 256}


def shipped_card() -> Path:
    """The quickstart teacher's card shipped with kd-detr (``teachers/quickstart_teacher.toml``)."""
    from kd_detr.zoo import builtin_dir

    return builtin_dir("teachers") / "quickstart_teacher.toml"


def teacher_train_config(data_dir: Path, out: Path, iters: int, seed: int = 0, progress: bool = True):
    """The exact ``kd-detr train`` settings of the quickstart teacher (also recorded in its card)."""
    from kd_detr.engine.trainer import TrainConfig

    return TrainConfig(model=TEACHER, model_overrides=dict(TEACHER_OPTS), data=str(data_dir),
                       image_size=QUICKSTART_DATA["image_size"], batch_size=8, lr=4e-4, lr_backbone=4e-4,
                       max_iters=iters, warmup_iters=min(100, iters // 5), lr_drop=None,
                       lr_drop_iter=int(iters * 0.8), eval_every_epochs=0, eval_every_iters=max(iters // 4, 1),
                       eval_batch_size=16, num_workers=1, output_dir=str(out), seed=seed, resume="auto",
                       checkpoint_every=1000, progress=progress)


# Student runs at a time on a CPU machine with at least this many cores (the published figures' setting).
QUICKSTART_PARALLEL = 2


def run_quickstart(out: Path, iters: int = 2000, seed: int = 0, echo: Callable[[str], None] = print,
                   train_teacher: bool = False, teacher_iters: int = TEACHER_ITERS, views: int = 2, actors: int = 2,
                   num_train: Optional[int] = None, num_val: Optional[int] = None, progress: bool = True,
                   parallel: Optional[int] = None, seeds: Optional[Sequence[int]] = None) -> dict:
    """Run the flow; returns ``{recipe: comparison row}``. ``seed`` seeds the runs and the cache's views (the
    data is always the teacher's, generated with ``QUICKSTART_DATA["seed"]``). ``seeds`` (e.g. ``[0, 1, 2]``)
    runs every recipe once per seed from the one cache whose views ``seeds[0]`` seeds, and the table gives
    mean ± std and the paired gain per seed; the run of ``seeds[0]`` is the single-seed quickstart's."""
    from kd_detr.data import generate_synthetic

    from .compare import compare, format_table

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

    teacher_ckpt = _teacher(out, data_dir, seed, echo, train_teacher, teacher_iters, progress)

    cache_dir = out / "cache"
    echo(f"[3/5] caching the teacher's decoder outputs ({views} views per image, Ray actors: {actors}) in {cache_dir}")
    t = time.perf_counter()
    build_quickstart_cache(teacher_ckpt, data_dir, cache_dir, views, actors, seed, progress)
    echo(f"      {time.perf_counter() - t:.0f} s")

    per_seed = f", seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else ""
    echo(f"[4/5] distilling {STUDENT} {STUDENT_OPTS}: baseline and d3etr, {iters} iterations each{per_seed}, "
         "from the cache")
    cfg = compare_config(out, teacher_ckpt, cache_dir, iters, seeds, parallel, progress)
    rows, files = compare(cfg)
    echo("[5/5] comparison (COCOeval on the validation images):")
    echo(format_table(rows, len(seeds)))
    echo(f"plots: {files['ap_plot']} and {files['loss_plot']}; table: {files['markdown']} and {files['csv']}; "
         f"total {time.perf_counter() - t0:.0f} s")
    return {r["recipe"]: r for r in rows}


def compare_config(out: Path, teacher_ckpt: Path, cache_dir: Path, iters: int, seeds: Sequence[int], parallel: int,
                   progress: bool = True, recipes: Sequence[str] = ("baseline", "d3etr"), compare_dir: str = "compare"):
    """The quickstart's ``kd-detr compare`` of ``recipes`` from the cache ``cache_dir`` into ``out/compare_dir``."""
    from kd_detr.data import DataSpec

    from .compare import CompareConfig

    return CompareConfig(student=STUDENT, student_overrides=dict(STUDENT_OPTS), recipes=list(recipes),
                         out=str(out / compare_dir), budget=iters, teacher=TEACHER,
                         teacher_checkpoint=str(teacher_ckpt), teacher_cache=str(cache_dir), seeds=list(seeds),
                         data=DataSpec(str(out / "data"), image_size=QUICKSTART_DATA["image_size"]), num_workers=1,
                         eval_points=3, overrides=student_overrides(iters), progress=progress, parallel=parallel)


def student_overrides(iters: int) -> list[str]:
    """``--set`` overrides of the quickstart's student runs (every recipe gets the same)."""
    return ["train.batch_size=8", "train.lr=4e-4", "train.lr_backbone=4e-4",
            f"train.warmup_iters={min(100, iters // 5)}", f"train.lr_drop_iter={int(iters * 0.8)}",
            "train.log_every=10",
            # the student is narrower (d=64) than the teacher (d=128)
            "distill.fixed_group.query_projection=\"linear\""]


def _teacher(out: Path, data_dir: Path, seed: int, echo, train_teacher: bool, teacher_iters: int,
             progress: bool = True) -> Path:
    """The shipped quickstart teacher, or one trained here (``--train-teacher``, or no shipped weights)."""
    from kd_detr.data import generate_synthetic
    from kd_detr.teacher.card import load_card
    from kd_detr.engine.trainer import train

    shipped = shipped_card()
    if not train_teacher and shipped.exists():
        card = load_card(str(shipped))
        path = card.checkpoint_path()
        if path.exists():
            echo(f"[2/5] teacher: {shipped.name} ({card.model}, known AP {card.known_ap} on the validation images)")
            return path
    teacher_dir = out / "teacher"
    final = teacher_dir / "model_final.safetensors"
    trained_card = teacher_dir / "quickstart_teacher.toml"
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
    # about 0.13 s per iteration on an idle 2-core CPU (docs/cpu-convergence.md)
    minutes = max(1, round(teacher_iters * 0.14 / 60))
    echo(f"[2/5] training the teacher {TEACHER} {TEACHER_OPTS} for {teacher_iters} iterations on "
         f"{params['num_train']} images (kd-detr train); on a 2-core CPU that takes about {minutes} "
         f"minute{'s' if minutes > 1 else ''}, resumable")
    generate_synthetic(teacher_data, progress=False, **params)
    t = time.perf_counter()
    train(teacher_train_config(teacher_data, teacher_dir, teacher_iters, seed, progress))
    minutes = (time.perf_counter() - t) / 60
    card = write_teacher_card(final, teacher_dir, data_dir, params, teacher_iters, seed, minutes)
    echo(f"      teacher AP {card.known_ap} after {minutes:.1f} minutes; card {card.source} (copy it and "
         f"{card.checkpoint} into teachers/ to ship this teacher)")
    return card.checkpoint_path()


def teacher_commands(iters: int = TEACHER_ITERS, seed: int = 0, num_train: Optional[int] = None) -> list[str]:
    """The shell commands that train the quickstart teacher: the same settings as :func:`teacher_train_config`."""
    d = QUICKSTART_DATA
    n = num_train or TEACHER_DATA_FACTOR * d["num_train"]
    lo, hi = d["objects_per_image"]
    return [
        f"kd-detr data synth --out teacher_data --train {n} --val {d['num_val']} --image-size {d['image_size']} "
        f"--seed {d['seed']} --objects-per-image {lo} {hi} --clutter {d['clutter']} "
        f"--min-object-size {d['min_object_size']:g} --class-colours",
        f"kd-detr train --model {TEACHER} " + " ".join(f"--model-opt {k}={v}" for k, v in TEACHER_OPTS.items())
        + f" --data teacher_data --image-size {d['image_size']} --batch-size 8 --lr 4e-4 --lr-backbone 4e-4 "
        f"--max-iters {iters} --warmup-iters {min(100, iters // 5)} --lr-drop-iter {int(iters * 0.8)} --seed {seed} "
        f"--num-workers 1 --eval-every-epochs 0 --eval-every-iters {max(iters // 4, 1)} --eval-batch-size 16 "
        f"--checkpoint-every 1000 --output-dir teacher --resume auto",
    ]


def write_teacher_card(checkpoint: Path, dest: Path, data_dir: Path, data_params: dict, iters: int, seed: int,
                       minutes: float, name: str = "quickstart_teacher"):
    """Ship a trained quickstart teacher: ``dest/NAME.safetensors`` (float16, half the bytes) and its card
    ``dest/NAME.toml`` with the AP of those float16 weights on ``data_dir``'s validation images and how the
    teacher was trained (commands, seed, data parameters, minutes)."""
    import tempfile

    import torch

    from kd_detr.atomic import write_text_atomic
    from kd_detr.engine.recipe import recipe_to_toml
    from kd_detr.teacher.card import load_card
    from .inference import evaluate_checkpoint
    from kd_detr.models import get_config, load_model, save_model

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
    default = get_config(TEACHER)
    overrides = {k: getattr(model.config, k) for k in ("d_model", "enc_layers", "dec_layers", "dim_feedforward",
                                                       "num_queries", "num_classes")
                 if getattr(model.config, k) != getattr(default, k)}
    doc = {
        "name": name, "model": TEACHER, "checkpoint": weights.name, "format": "safetensors",
        "num_classes": model.config.num_classes, "label_map": "contiguous",
        "image_size": QUICKSTART_DATA["image_size"], "known_ap": round(100 * metrics["AP"], 1),
        "ap_reference": f"COCO AP (%) of these float16 weights on the {data_params['num_val']} validation images "
                        "of the quickstart data (kd_detr.runs.quickstart.QUICKSTART_DATA)",
        "model_overrides": overrides,
        "training": {
            "commands": teacher_commands(iters, seed, data_params["num_train"]), "seed": seed, "iterations": iters,
            "minutes": round(minutes, 1), "machine": _machine(),
            "metrics": {k: round(100 * v, 1) for k, v in metrics.items() if k.startswith("AP")},
            "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_params.items()},
        },
    }
    card_path = dest / f"{name}.toml"
    header = ("# The quickstart teacher: trained by kd-detr's own `kd-detr train` on the quickstart's synthetic data\n"
              "# (one colour per category); written by kd_detr.runs.quickstart.write_teacher_card.\n")
    write_text_atomic(card_path, header + recipe_to_toml(doc))
    return load_card(str(card_path))


def _machine() -> str:
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads as `kd-detr train` sets them"


def _num_images(ann_file: Path) -> int:
    import json

    return len(json.loads(ann_file.read_text())["images"])


def build_quickstart_cache(teacher_ckpt: Path, data_dir: Path, cache_dir: Path, views: int, actors: int, seed: int,
                 progress: bool, store=None) -> dict:
    """The quickstart's teacher cache (``store``: a :class:`~kd_detr.teacher.cache.StoreConfig`, default what
    ``kd-detr cache`` stores by default); returns the build summary."""
    from kd_detr import data as kd_data
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher import resolve_teacher
    from kd_detr.teacher.cache import StoreConfig
    from kd_detr.teacher.cache.attention_codec import DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC
    from kd_detr.teacher.cache.build import build_cache

    size = QUICKSTART_DATA["image_size"]
    ds = kd_data.CocoDetection(data_dir / "train2017", data_dir / "annotations" / "instances_train2017.json",
                               transforms=kd_data.make_policy(True, size), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=views, seed=seed)
    spec = resolve_teacher(TEACHER, str(teacher_ckpt))
    if store is None:
        store = StoreConfig.parse(DEFAULT_ATTENTION_SPEC, classes=DEFAULT_CLASSES_SPEC)  # what `kd-detr cache` stores
    return build_cache(spec, ds, plan, cache_dir, store, actors=actors, images_per_shard=64,
                progress=progress, image_size=size, num_threads=1)
