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

import time
from pathlib import Path
from typing import Callable, Optional

QUICKSTART_DATA = dict(num_train=512, num_val=100, image_size=128)
TEACHER = "cond_detr_r10_tiny"
TEACHER_OPTS = {"dec_layers": 3, "num_queries": 30}
STUDENT = "cond_detr_r10_tiny"
STUDENT_OPTS = {"dec_layers": 3, "num_queries": 30, "d_model": 64, "dim_feedforward": 256}
CARD = Path(__file__).resolve().parents[1] / "teachers" / "quickstart_teacher.toml"


def teacher_train_config(data_dir: Path, out: Path, iters: int, seed: int, progress: bool = True):
    """The exact ``kd-detr train`` settings of the quickstart teacher (also recorded in its card)."""
    from kd_detr.engine.trainer import TrainConfig

    return TrainConfig(model=TEACHER, model_overrides=dict(TEACHER_OPTS), data=str(data_dir),
                       image_size=QUICKSTART_DATA["image_size"], batch_size=8, lr=4e-4, lr_backbone=4e-4,
                       max_iters=iters, warmup_iters=min(100, iters // 5), lr_drop=None,
                       lr_drop_iter=int(iters * 0.8), eval_every_epochs=0, num_workers=1, output_dir=str(out),
                       seed=seed, resume="auto", checkpoint_every=200, progress=progress)


def run_quickstart(out: Path, iters: int = 600, seed: int = 0, echo: Callable[[str], None] = print,
                   train_teacher: bool = False, teacher_iters: int = 600, views: int = 2, actors: int = 2,
                   num_train: Optional[int] = None, num_val: Optional[int] = None, progress: bool = True) -> dict:
    from kd_detr.compare import CompareConfig, compare, format_table
    from kd_detr.data import generate_synthetic

    out = Path(out)
    data_params = dict(QUICKSTART_DATA)
    if num_train is not None:
        data_params["num_train"] = num_train
    if num_val is not None:
        data_params["num_val"] = num_val
    data_dir = out / "data"
    t0 = time.perf_counter()
    echo(f"[1/5] synthetic data in {data_dir} ({data_params['num_train']} train / {data_params['num_val']} val, "
         f"{data_params['image_size']} px)")
    generate_synthetic(data_dir, seed=seed, progress=False, **data_params)

    teacher_ckpt = _teacher(out, data_dir, seed, echo, train_teacher, teacher_iters, progress)

    cache_dir = out / "cache"
    echo(f"[3/5] caching the teacher's decoder outputs ({views} views per image, Ray actors: {actors}) in {cache_dir}")
    t = time.perf_counter()
    _build_cache(teacher_ckpt, data_dir, cache_dir, views, actors, seed, progress)
    echo(f"      {time.perf_counter() - t:.0f} s")

    echo(f"[4/5] distilling {STUDENT} {STUDENT_OPTS}: baseline and d3etr, {iters} iterations each, from the cache")
    cfg = CompareConfig(student=STUDENT, student_overrides=dict(STUDENT_OPTS), recipes=["baseline", "d3etr"],
                        out=str(out / "compare"), budget=iters, teacher=TEACHER, teacher_checkpoint=str(teacher_ckpt),
                        teacher_cache=str(cache_dir), seeds=[seed], data=str(data_dir),
                        image_size=data_params["image_size"], num_workers=1, eval_points=3,
                        overrides=["train.batch_size=8", "train.lr=4e-4", "train.lr_backbone=4e-4",
                                   f"train.warmup_iters={min(100, iters // 5)}", f"train.lr_drop_iter={int(iters * 0.8)}",
                                   "train.log_every=10",
                                   # the student is narrower (d=64) than the teacher (d=128)
                                   "distill.fixed_group.query_projection=\"linear\""],
                        progress=progress)
    rows, files = compare(cfg)
    echo("[5/5] comparison (COCOeval on the validation images):")
    echo(format_table(rows, 1))
    echo(f"plots: {files['ap_plot']} and {files['loss_plot']}; table: {files['markdown']} and {files['csv']}; "
         f"total {time.perf_counter() - t0:.0f} s")
    return {r["recipe"]: r for r in rows}


def _teacher(out: Path, data_dir: Path, seed: int, echo, train_teacher: bool, teacher_iters: int,
             progress: bool = True) -> Path:
    """The shipped quickstart teacher, or one trained here."""
    if not train_teacher and CARD.exists():
        from kd_detr.distill.teacher_card import load_card

        card = load_card(str(CARD))
        path = card.checkpoint_path()
        if path.exists():
            echo(f"[2/5] teacher: {CARD.name} ({card.model}, known AP {card.known_ap} on this data)")
            return path
    from kd_detr.engine.trainer import train

    teacher_dir = out / "teacher"
    final = teacher_dir / "model_final.safetensors"
    if final.exists() and not train_teacher:
        echo(f"[2/5] teacher: reusing {final}")
        return final
    echo(f"[2/5] training the teacher {TEACHER} {TEACHER_OPTS} for {teacher_iters} iterations (kd-detr train)")
    t = time.perf_counter()
    metrics = train(teacher_train_config(data_dir, teacher_dir, teacher_iters, seed, progress))
    echo(f"      teacher AP {100 * metrics.get('AP', 0.0):.1f} after {time.perf_counter() - t:.0f} s")
    return final


def _build_cache(teacher_ckpt: Path, data_dir: Path, cache_dir: Path, views: int, actors: int, seed: int,
                 progress: bool) -> None:
    from kd_detr import data as kd_data
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.distill.teacher_loading import resolve_teacher
    from kd_detr.teacher_cache import StoreConfig
    from kd_detr.teacher_cache.build import build_cache

    size = QUICKSTART_DATA["image_size"]
    ds = kd_data.CocoDetection(data_dir / "train2017", data_dir / "annotations" / "instances_train2017.json",
                               transforms=kd_data.make_policy(True, size), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=views, batch_size=8, seed=seed)
    spec = resolve_teacher(TEACHER, str(teacher_ckpt))
    build_cache(spec, ds, plan, cache_dir, StoreConfig.parse("topk:16"), actors=actors, batches_per_shard=8,
                progress=progress, image_size=size, num_threads=1)
