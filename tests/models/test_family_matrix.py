"""Every transformers DETR family kd-detr registers (``list_hf_models()``: a family the installed transformers
gains is covered without editing this file) trains, checkpoints, resumes exactly, evaluates, distils (D3ETR's
cross-family terms, Teach-DETR's teacher boxes and feature KD on the encoder output) from a transformers teacher
in process and from a teacher cache (the same numbers), gives its encoder output maps (or is refused by name),
and exports: a kd-detr
``.safetensors`` equal bit for bit, a transformers folder ``AutoModelForObjectDetection`` loads with the same
outputs, and ONNX where the family exports faithfully (refused by name where it does not).

Kept small for the 10-minute suite: two 64-px training images and one validation image, batch size 1, 10
queries; one transformers DETR teacher and one cache (built once through the shared Ray session) serve every
student family."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kd_detr.models.hf.registry import list_hf_models  # noqa: E402

FAMILIES = sorted(list_hf_models())
IMAGE_SIZE = 64
STUDENT_OPTS = {"num_queries": 10}


def _log(run):
    return [r for r in (json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_session):
    """Data (2 train / 1 val images), a transformers DETR teacher folder whose id2label names the data's
    categories, and its teacher cache (1 view per image, dense float32 logits: reads back exactly)."""
    from kd_detr.data import DataSpec, generate_synthetic
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.models import build_model
    from kd_detr.teacher import resolve_teacher
    from kd_detr.teacher.cache import StoreConfig
    from kd_detr.teacher.cache.build import build_cache

    root = tmp_path_factory.mktemp("matrix")
    data = root / "data"
    generate_synthetic(data, num_train=2, num_val=1, image_size=IMAGE_SIZE, seed=3)
    train = DataSpec(train_ann=str(data / "annotations" / "instances_train2017.json"),
                     train_images=str(data / "train2017"), image_size=IMAGE_SIZE)
    dataset = train.train_set()
    label_map = dataset.label_map
    torch.manual_seed(11)
    teacher = build_model("hf_detr_tiny", num_classes=label_map.num_classes, num_queries=12)
    teacher.hf.config.id2label = {i: label_map.name_of_index(i) for i in range(label_map.num_classes)}
    teacher.hf.config.label2id = {v: k for k, v in teacher.hf.config.id2label.items()}
    folder = root / "teacher"
    teacher.hf.save_pretrained(folder)
    cache = root / "cache"
    build_cache(resolve_teacher(f"hf:{folder}"), dataset, ViewPlan.for_dataset(dataset, num_views=1), cache,
                StoreConfig.parse("none", dtype="float32", classes="dense", features=True), actors=1,
                images_per_shard=8, progress=False, image_size=IMAGE_SIZE)
    return {"data": data, "train": train, "teacher": f"hf:{folder}", "cache": str(cache)}


def _train(env, name, out, max_iters, resume=None):
    from kd_detr.engine.trainer import TrainConfig, Trainer

    cfg = TrainConfig(model=name, model_overrides=dict(STUDENT_OPTS), **env["train"].paths(), image_size=IMAGE_SIZE,
                      batch_size=1, num_workers=0, lr=1e-3, lr_backbone=1e-3, lr_drop=1000, max_iters=max_iters,
                      # the family's preset (groups, EMA, schedule) without its warm-up: two steps must move the
                      # weights (the ONNX check below needs untied encoder scores)
                      warmup_iters=0,
                      checkpoint_every=1, eval_every_epochs=0, log_every=1, progress=False, output_dir=str(out),
                      resume=resume)
    Trainer(cfg).fit()


def _distil(env, name, out, cache):
    from kd_detr.runs.assemble import TeacherSourceSpec, assemble_run

    source = TeacherSourceSpec(teacher=env["teacher"], cache=env["cache"] if cache else None)
    # D3ETR's cross-family terms, Teach-DETR's teacher boxes (the random teacher's 5 most confident) and feature KD
    # on the encoder output (every family gives its maps: test_family_gives_its_encoder_output_maps)
    run = assemble_run(name, "d3etr_cross_family_teach", env["train"], source, str(out),
                       student_overrides=dict(STUDENT_OPTS),
                       overrides=["train.batch_size=1", "train.max_iters=1", "train.log_every=1",
                                  "train.eval_every_epochs=0", "train.lr_drop=1000",
                                  "teach_detr.score_threshold=0.0", "teach_detr.max_targets=5",
                                  "feature_kd.enabled=true"],
                       train_options={"num_workers": 0, "progress": False}, views=1)
    run.run()
    return _log(out)


def _state(path):
    from kd_detr.models import load_model

    model, meta = load_model(path)
    return model.eval(), meta


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_resumes_evaluates_distils_and_exports(name, env, tmp_path):
    from kd_detr.models.checkpoint import tied_names
    from kd_detr.runs.export import export
    from kd_detr.runs.inference import evaluate_checkpoint, load_detector
    from kd_detr.models import save_model
    from kd_detr.runs.onnx_export import ONNX_FAMILIES, ONNX_REFUSED, ONNX_TOPK_FAMILIES

    # train 2 iterations (a checkpoint after each); resumed from the first checkpoint, the second iteration
    # is the same, bit for bit
    full, part = tmp_path / "full", tmp_path / "part"
    _train(env, name, full, 2)
    first = full / "checkpoints" / "iter_0000001.safetensors"
    _train(env, name, part, 2, resume=str(first))
    a, b = _log(full), _log(part)
    assert [r["iteration"] for r in a] == [1, 2] and [r["iteration"] for r in b] == [2]
    assert a[1]["loss"] == b[0]["loss"] and a[1]["grad_norm"] == b[0]["grad_norm"]
    final, meta = _state(full / "model_final.safetensors")
    resumed, _ = _state(part / "model_final.safetensors")
    sa, sb = final.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    # the checkpoint keeps the family's ties: one parameter, as in a freshly built model
    params = final.state_dict(keep_vars=True)
    assert meta["tied"] == tied_names(params) and all(params[k] is params[v] for k, v in meta["tied"].items())

    # evaluate the checkpoint
    result, out_dir = evaluate_checkpoint(full / "model_final.safetensors", data=str(env["data"]),
                                          image_size=IMAGE_SIZE, num_workers=0, batch_size=1,
                                          output_dir=str(tmp_path / "eval"), device="cpu")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 100.0 if "AP" in metrics else metrics

    # distil 1 iteration from the transformers teacher in process and from its cache: the same numbers
    inproc = _distil(env, name, tmp_path / "inproc", cache=False)
    cached = _distil(env, name, tmp_path / "cached", cache=True)
    assert len(inproc) == len(cached) == 1
    for key in ("loss", "distill.total", "teach_detr.total", "feature_kd.total"):
        assert cached[0][key] == pytest.approx(inproc[0][key], rel=1e-5, abs=1e-6), key
    assert inproc[0]["distill.total"] > 0 and inproc[0]["teach_detr.total"] > 0 and inproc[0]["feature_kd.total"] > 0

    # export: kd-detr safetensors (bit-exact), a transformers folder (same outputs), ONNX where faithful
    family = final.config.family
    formats = ["safetensors", "hf"] + (["onnx"] if family in ONNX_FAMILIES - ONNX_TOPK_FAMILIES else [])
    paths = export(full, tmp_path / "exp" / "student", formats)
    exported, _ = _state(paths["safetensors"])
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in sa.items())
    reloaded = transformers.AutoModelForObjectDetection.from_pretrained(paths["hf"]).eval()
    assert type(reloaded).__name__ == type(final.hf).__name__
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = final.hf(pixel_values=x), reloaded(pixel_values=x)
    assert (ref.logits - got.logits).abs().max() <= 1e-5 and (ref.pred_boxes - got.pred_boxes).abs().max() <= 1e-5
    # kd-detr reads the folder back as the student it was (its input square and image size recorded)
    folder_model, _, folder_meta = load_detector(paths["hf"])
    assert folder_meta["extra_metadata"]["image_size"] == IMAGE_SIZE
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    mask[1, :, IMAGE_SIZE * 3 // 4:] = True
    with torch.no_grad():
        ref, got = final(images, mask), folder_model(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert (ref[key] - got[key]).abs().max() <= 1e-5, key
    assert (paths["hf"] / "model.safetensors").stat().st_mode & 0o077 == (paths["hf"] / "config.json").stat().st_mode & 0o077
    if family in ONNX_TOPK_FAMILIES:
        # two steps from transformers' init leave the masked anchors' encoder scores tied, and onnxruntime's
        # top-k orders ties differently (the export check refuses that); a trained model's scores differ, as
        # they do after this perturbation (D-FINE / DEIMv2: smaller, or activations grow to ~1e4, where float32
        # rounding alone passes the check's 1e-4; RT-DETR's scores stay tied below 0.3)
        # (perturbed: the raw weights of the last checkpoint; model_final is their EMA under the family's preset)
        scale = 0.1 if family in ("d_fine", "deimv2") else 0.3
        raw, _ = _state(full / "checkpoints" / "iter_0000002.safetensors")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in raw.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        save_model(raw, tmp_path / "perturbed.safetensors", label_map=meta["label_map"])
        assert export(tmp_path / "perturbed.safetensors", tmp_path / "exp" / "perturbed", ["onnx"])["onnx"].is_file()
    elif family in ONNX_FAMILIES:
        assert paths["onnx"].is_file()
    else:
        assert family in ONNX_REFUSED  # a new family is refused until checked: list it in onnx_export
        with pytest.raises(ValueError, match=rf"cannot export {name} to ONNX: transformers family '{family}'"):
            export(full, tmp_path / "exp2" / "student", ["onnx"])
        assert not (tmp_path / "exp2").exists() or not any((tmp_path / "exp2").iterdir())


def test_a_deformable_teacher_is_cached_without_attention_maps_or_refused_upfront(env, tmp_path):
    """RT-DETR has no dense decoder attention: a build asking for maps is refused before any actor starts,
    naming the option; the quickstart's cache of such a teacher stores none."""
    from kd_detr.models import build_model
    from kd_detr.teacher import resolve_teacher
    from kd_detr.teacher.cache import CacheError, StoreConfig
    from kd_detr.teacher.cache.build import build_cache
    from kd_detr.data.view_plan import ViewPlan

    dataset = env["train"].train_set()
    label_map = dataset.label_map
    teacher = build_model("hf_rt_detr_tiny", num_classes=label_map.num_classes)
    teacher.hf.config.id2label = {i: label_map.name_of_index(i) for i in range(label_map.num_classes)}
    teacher.hf.config.label2id = {v: k for k, v in teacher.hf.config.id2label.items()}
    teacher.hf.save_pretrained(tmp_path / "rt")
    spec = resolve_teacher(f"hf:{tmp_path / 'rt'}")
    with pytest.raises(CacheError, match=r"no dense decoder attention maps.*--attention none"):
        build_cache(spec, dataset, ViewPlan.for_dataset(dataset, num_views=1), tmp_path / "cache",
                    StoreConfig.parse("topk:4"), actors=1, progress=False, image_size=IMAGE_SIZE)
    assert not (tmp_path / "cache").exists()  # refused before the folder or its lock was made


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gives_its_encoder_output_maps(name):
    """``DetectorRequest(features=True)``: ``config.feature_levels`` maps of ``config.feature_channels``, highest
    resolution first, with their strides and padding masks (a mask family's padded image has padding, a
    fixed-size family's none); a teacher's maps per view cover each image's own grid."""
    from kd_detr.models import DetectorRequest, build_model
    from kd_detr.teacher import InProcessTeacher

    model = build_model(name, num_classes=3, num_queries=10).eval()
    config = model.config
    assert "features" in config.supports, f"{name}: give its encoder maps or refuse them by name (see below)"
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    with torch.no_grad():
        out = model(images, mask, request=DetectorRequest(features=True))
    maps, strides, masks = out["features"], out["feature_strides"], out["feature_masks"]
    assert len(maps) == len(strides) == len(masks) == config.feature_levels >= 1
    assert list(strides) == sorted(strides) and all(s in (8, 16, 32, 64) for s in strides)
    for m, fm in zip(maps, masks):
        assert m.shape[:2] == (2, config.feature_channels) and fm.shape == (2, *m.shape[-2:]) and fm.dtype == torch.bool
        assert not fm[0].any()
        assert fm[1].any() == model.family.pixel_mask  # only a mask family sees the batch's padding
    teacher = InProcessTeacher(model, attn="none", features=True)(images, mask)
    assert teacher.feature_strides == tuple(strides) and teacher.feature_grids.shape == (2, len(maps), 2)


def test_a_family_without_encoder_maps_is_refused_by_name(monkeypatch):
    import dataclasses

    from kd_detr.methods.registry import check_capabilities
    from kd_detr.models import DetectorRequest, build_model
    from kd_detr.models.hf.families import FAMILIES as REGISTRY

    monkeypatch.setitem(REGISTRY, "detr", dataclasses.replace(REGISTRY["detr"], features=None))
    model = build_model("hf_detr_tiny", num_classes=3, num_queries=10).eval()
    assert "features" not in model.config.supports and model.config.feature_levels == 0
    with pytest.raises(ValueError, match="reads no encoder output maps of the transformers family 'detr'"):
        model(torch.randn(1, 3, 64, 64), request=DetectorRequest(features=True))
    with pytest.raises(ValueError, match=r"\[feature_kd\] needs the student's features, which the student "
                                         r"hf_detr_tiny \(transformers detr\) does not have"):
        check_capabilities("feature_kd", frozenset({"features"}), model.config)
