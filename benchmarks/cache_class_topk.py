"""Class top-k in the teacher cache: KD error per rest scheme and k, and bytes per view, in one run.

    python benchmarks/cache_class_topk.py                  # ~1-2 minutes on 2 CPU cores
    python benchmarks/cache_class_topk.py --json out.json

Realistic logits: the shipped quickstart teacher (``teachers/quickstart_teacher.safetensors``, 3 decoder
layers, 30 queries, 6 classes) on images of ``kd-detr data synth --class-colours`` at 128 px (the generator
settings of its card, another seed: images it never saw), and a random student of the same architecture.
Every batch goes through the D3ETR objective (recipe ``d3etr_pred_only``: Adaptive Matching, i.e. a
Hungarian teacher-student matching per layer recomputed from the decoded logits, and the Fixed Matching
group; every layer) once with the dense float32 teacher outputs (the reference) and once per store
config with the outputs encoded and decoded by the cache codec (``encode_batch`` / ``decode_batch``:
boxes and logits in the store dtype, float16 by default).

Reported per store config (dense fp16 = today's cache; ``topk:k:REST`` for each rest scheme and k):

* ``cls err``: relative error of the class KD term (``prediction_distill`` cls, summed over groups and
  layers, recipe weights) vs the reference: the worst batch and over all batches together;
* ``pred err``: the same for the total prediction KD (weighted cls + L1 + GIoU);
* bytes per image view at the official sizes (6 layers, 300 queries, 91 classes, fp16), predictions
  only (``--attention none``); a second table adds attention ``topk:A`` (the d3etr recipe distils
  attention) to see what fits the issue's budget of 0.25 MB per view.

The student's forward does not depend on the teacher logits (the Fixed group feeds it the teacher's
queries, which the codec does not touch), so it runs once per batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_detr import data as kd_data  # noqa: E402
from kd_detr.criterion import SetCriterion  # noqa: E402
from kd_detr.engine.recipe import load_recipe  # noqa: E402
from kd_detr.methods.d3etr import D3ETRLoss  # noqa: E402
from kd_detr.runs.quickstart import QUICKSTART_DATA  # noqa: E402
from kd_detr.models import DetectorRequest, build_model, load_model  # noqa: E402
from kd_detr.teacher import TeacherOutputs  # noqa: E402
from kd_detr.teacher.cache import StoreConfig, bytes_per_view, decode_batch, encode_batch  # noqa: E402
from kd_detr.teacher.cache.class_codec import CLASS_REST_SCHEMES, DEFAULT_CLASS_REST  # noqa: E402

BUDGET = 250_000  # bytes per view: the target at official sizes


def store_configs(ks, dtype):
    out = [("dense", StoreConfig(dtype=dtype))]
    for rest in CLASS_REST_SCHEMES:
        for k in ks:
            out.append((f"topk:{k}:{rest}", StoreConfig(dtype=dtype, class_topk=k, class_rest=rest)))
    return out


def pred_sums(terms: dict, weights: dict) -> tuple[float, float]:
    """(weighted class KD summed over groups and layers, weighted total prediction KD)."""
    cls = sum(weights[k] * float(v) for k, v in terms.items() if ".pred_cls." in k)
    total = sum(weights[k] * float(v) for k, v in terms.items() if ".pred_" in k)
    return cls, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "teachers" / "quickstart_teacher.safetensors"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ks", default="1,2,4,8", help="class top-k values")
    ap.add_argument("--attention-ks", default="8,16,32", help="attention topk:A for the budget table")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--seed", type=int, default=0, help="student init")
    ap.add_argument("--data-seed", type=int, default=1, help="synthetic images (the teacher trained on seed 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]

    # ---- data: the quickstart generator settings (teachers/quickstart_teacher.toml [training.data])
    work = Path(tempfile.mkdtemp(prefix="kd_detr_class_topk_"))
    root = kd_data.generate_synthetic(work / "data", progress=False, **dict(
        QUICKSTART_DATA, num_train=args.images, num_val=1, image_size=args.size, seed=args.data_seed))
    ds = kd_data.CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                               transforms=kd_data.make_policy(False, args.size), log_report=False)

    # ---- teacher (shipped weights) and a random student of the same architecture
    teacher, _meta = load_model(args.teacher)
    teacher = teacher.float().eval()
    torch.manual_seed(args.seed)
    student = build_model(teacher.config).float().eval()
    C = teacher.config.num_classes
    recipe = load_recipe("d3etr_pred_only")
    criterion = SetCriterion(C, num_dec_layers=student.config.dec_layers)
    kd = D3ETRLoss(recipe.distill, student.config, teacher.config, criterion)
    weights = kd.weight_dict
    configs = store_configs(ks, args.dtype)

    ref_cls, ref_tot = [], []
    got: dict[str, tuple[list, list]] = {name: ([], []) for name, _ in configs}
    top_mass = []  # share of the teacher's probability mass in its top-k classes, per k
    with torch.no_grad():
        for start in range(0, len(ds), args.batch):
            items = [ds[i] for i in range(start, min(start + args.batch, len(ds)))]
            images, mask, targets = kd_data.collate_fn(items)
            t = TeacherOutputs.from_model_output(teacher(images, mask), "none")
            L, B, N = t.logits.shape[:3]
            t.gt_assignment = torch.full((B, N), -1, dtype=torch.int64)  # the codec requires one; unused here
            out = student(images, mask, request=DetectorRequest(query_groups=kd.extra_groups(t)))
            nb = criterion.num_boxes(targets, images.device)
            c, tot = pred_sums(kd(student, out, targets, nb, t), weights)
            ref_cls.append(c)
            ref_tot.append(tot)
            p = t.logits.sigmoid()
            top_mass.append([float(p.topk(min(k, C), -1).values.sum() / p.sum()) for k in ks])
            for name, cfg in configs:
                dec = decode_batch(encode_batch(t, torch.arange(B), cfg), cfg, t.query_embed)
                c, tot = pred_sums(kd(student, out, targets, nb, dec), weights)
                got[name][0].append(c)
                got[name][1].append(tot)

    def errs(vals, ref):
        worst = max(abs(v - r) / abs(r) for v, r in zip(vals, ref))
        overall = abs(sum(vals) - sum(ref)) / abs(sum(ref))
        return worst, overall

    rows = []
    for name, cfg in configs:
        cw, co = errs(got[name][0], ref_cls)
        tw, to = errs(got[name][1], ref_tot)
        official = StoreConfig(dtype="float16", class_topk=cfg.class_topk, class_rest=cfg.class_rest)
        rows.append({"store": name, "cls_err_worst": cw, "cls_err_all": co, "pred_err_worst": tw,
                     "pred_err_all": to, "bytes_per_view": bytes_per_view(official)})

    print(f"quickstart teacher ({teacher.config.dec_layers} layers, {teacher.config.num_queries} queries, {C} classes) "
          f"on {len(ds)} synth --class-colours images at {args.size} px, batch {args.batch}, random student, "
          f"recipe d3etr_pred_only (adaptive + fixed groups, all layers); reference: dense float32 teacher outputs; "
          f"cache dtype {args.dtype}")
    print("mean share of the teacher's sigmoid mass in its top-k classes: "
          + ", ".join(f"k={k}: {sum(m[i] for m in top_mass) / len(top_mass):.3f}" for i, k in enumerate(ks)))
    print()
    print(f"{'store (--classes)':<22} {'cls err worst':>13} {'cls err all':>11} {'pred err worst':>14} "
          f"{'pred err all':>12} {'bytes/view (official, pred only)':>33}")
    for r in rows:
        print(f"{r['store']:<22} {100 * r['cls_err_worst']:>12.3f}% {100 * r['cls_err_all']:>10.3f}% "
              f"{100 * r['pred_err_worst']:>13.3f}% {100 * r['pred_err_all']:>11.3f}% "
              f"{r['bytes_per_view']:>14,d} ({r['bytes_per_view'] / 1e6:.3f} MB)")
    print(f"(k >= C = {C} keeps every class: such rows equal the dense row)")

    # ---- budget at official sizes with attention (the d3etr recipe distils attention)
    print()
    a_ks = [int(a) for a in args.attention_ks.split(",")]
    cls_specs = ["dense"] + [f"topk:{k}:{DEFAULT_CLASS_REST}" for k in ks]
    print(f"bytes per view at official sizes (L=6, N=300, C=91, S=25*34, fp16, heads mean), budget {BUDGET:,d}:")
    print(f"{'--classes':<22}" + "".join(f"{'attn ' + s:>18}" for s in ["none"] + [f"topk:{a}" for a in a_ks]))
    budget = {}
    for cs in cls_specs:
        cells = []
        for a in ["none"] + [f"topk:{a}" for a in a_ks]:
            b = bytes_per_view(StoreConfig.parse(a, classes=cs))
            budget[f"{cs} attn {a}"] = b
            cells.append(f"{b:>12,d}{'  ok ' if b <= BUDGET else ' over'}")
        print(f"{cs:<22}" + "".join(f"{c:>18}" for c in cells))
    attn_per_k = bytes_per_view(StoreConfig.parse("topk:2")) - bytes_per_view(StoreConfig.parse("topk:1"))
    print(f"attention topk costs {attn_per_k:,d} bytes per view per key kept (self + cross, mean heads)")

    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "budget": budget, "top_mass": top_mass,
                                               "ref_cls": ref_cls, "ref_total": ref_tot}, indent=1))


if __name__ == "__main__":
    main()
