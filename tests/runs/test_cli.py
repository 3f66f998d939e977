"""The kd-detr command line, end to end on generated data."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from kd_detr.cli import main


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_models_lists_registry():
    out = run("models").output
    for name in ("cond_detr_r50", "cond_detr_r101", "cond_detr_r50_dc5", "cond_detr_r101_dc5",
                 "cond_detr_r18_tiny", "cond_detr_r10_tiny"):
        assert name in out


def test_synth_train_eval_predict(tmp_path):
    data = tmp_path / "data"
    run("data", "synth", "--out", data, "--train", 8, "--val", 4, "--image-size", 64, "--seed", 1)
    assert (data / "annotations" / "instances_train2017.json").exists()
    out = tmp_path / "run"
    run("train", "--model", "cond_detr_r10_tiny", "--model-opt", "num_queries=8", "--data", data,
        "--image-size", 64, "--batch-size", 4, "--max-iters", 2, "--num-workers", 0, "--output-dir", out,
        "--no-progress")
    ckpt = out / "model_final.safetensors"
    assert ckpt.exists() and (out / "checkpoints" / "latest.json").exists()

    res = run("eval", "--checkpoint", ckpt, "--data", data, "--num-workers", 0, "--output-dir", tmp_path / "ev")
    lines = [l for l in res.output.splitlines() if l.strip().startswith("Average")]
    assert len(lines) == 12
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["AP"] <= 1.0 if "metrics" in metrics else 0.0 <= metrics["AP"] <= 1.0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])

    image = sorted((data / "val2017").iterdir())[0]
    pred = tmp_path / "pred.json"
    run("predict", "--checkpoint", ckpt, "--image", image, "--output", pred, "--top-k", 5)
    entries = json.loads(pred.read_text())
    assert len(entries) == 1 and entries[0]["width"] == 64 and entries[0]["height"] == 64
    dets = entries[0]["detections"]
    assert len(dets) == 5
    assert {"score", "label", "query", "box"} <= set(dets[0])
    assert all(0 <= d["query"] < 8 for d in dets)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    # --no-resize on a 64 px image that was trained at 64 px gives the same detections
    pred2 = tmp_path / "pred2.json"
    run("predict", "--checkpoint", ckpt, "--image", image, "--output", pred2, "--top-k", 5, "--no-resize")
    assert json.loads(pred2.read_text())[0]["detections"] == dets


def test_convert_from_official(tmp_path):
    """official .pth -> `kd-detr convert` -> safetensors gives the same outputs; wrong architecture refused."""
    from kd_detr.models import build_model, load_model, official_state_dict

    torch.manual_seed(0)
    model = build_model("cond_detr_r10_tiny", num_classes=91, backbone_norm="frozen_bn", num_queries=5).eval()
    official = tmp_path / "official.pth"
    torch.save({"model": official_state_dict(model)}, official)
    out = tmp_path / "converted.safetensors"
    res = run("convert", "--from-official", official, "--model", "cond_detr_r10_tiny",
              "--model-opt", "backbone_norm=frozen_bn", "--model-opt", "num_queries=5", "--out", out)
    assert "91 class slots" in res.output
    converted, meta = load_model(out)
    assert meta["model_name"] == "cond_detr_r10_tiny" and meta["label_map"]["num_classes"] == 91
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        a, b = model(images, mask), converted.eval()(images, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])

    bad = tmp_path / "bad.safetensors"
    res = run("convert", "--from-official", official, "--model", "cond_detr_r50", "--out", bad, ok=False)
    assert res.exit_code != 0 and "transformer" in res.output  # names offending keys
    assert not bad.exists()


def test_data_synth_generator_options(tmp_path):
    import json

    out = tmp_path / "d"
    run("data", "synth", "--out", out, "--train", 3, "--val", 1, "--image-size", 64, "--objects-per-image", 1, 2,
        "--clutter", 0, "--min-object-size", 16, "--class-colours")
    params = json.loads((out / "annotations" / "instances_train2017.json").read_text())["info"]["generator_params"]
    assert params["objects_per_image"] == [1, 2] and params["clutter"] == 0.0 and params["class_colours"] is True
    assert params["min_object_size"] == 16.0
    res = run("data", "synth", "--out", out, "--train", 3, "--val", 1, "--image-size", 64, ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output
    run("data", "synth", "--out", out, "--train", 3, "--val", 1, "--image-size", 64, "--overwrite")
    params = json.loads((out / "annotations" / "instances_train2017.json").read_text())["info"]["generator_params"]
    assert "class_colours" not in params and params["objects_per_image"] == [1, 8]
    res = run("data", "synth", "--out", tmp_path / "e", "--objects-per-image", 3, 1, ok=False)
    assert res.exit_code != 0 and "objects_per_image" in res.output


def test_clear_errors(tmp_path):
    res = run("train", "--model", "no_such_model", "--data", tmp_path, ok=False)
    assert res.exit_code != 0 and "no_such_model" in res.output
    res = run("eval", "--checkpoint", __file__, "--data", tmp_path, ok=False)
    assert res.exit_code != 0 and "--model" in res.output


def test_quickstart_runs_the_whole_flow_end_to_end(tmp_path, ray_session):
    """The CI variant: tiny data and budgets, but every step (data, teacher trained here and written with its
    card, Ray cache, compare)."""
    args = ("quickstart", "--out", tmp_path / "qs", "--iters", 4, "--train-teacher", "--teacher-iters", 4,
            "--num-train", 16, "--num-val", 4, "--actors", 1, "--no-progress")
    res = run(*args)
    assert "[5/5]" in res.output and "| baseline |" in res.output and "| d3etr |" in res.output
    qs = tmp_path / "qs"
    assert "minutes" in res.output  # --train-teacher says how long the training takes
    from kd_detr.teacher.card import load_card

    card = load_card(str(qs / "teacher" / "quickstart_teacher.toml"))
    assert card.checkpoint_path() == qs / "teacher" / "quickstart_teacher.safetensors"
    assert card.training["iterations"] == 4 and card.training["data"]["num_train"] == 64
    assert card.known_ap is not None and "--max-iters 4 " in card.training["commands"][1]
    assert (qs / "cache" / "manifest.json").exists()
    assert (qs / "compare" / "comparison.md").exists() and (qs / "compare" / "ap_curve.png").exists()
    for recipe in ("baseline", "d3etr"):
        assert (qs / "compare" / "runs" / recipe / "seed0" / "model_final.safetensors").exists()
    table = (qs / "compare" / "comparison.md").read_text()
    # a rerun reuses everything and prints the same table
    res = run(*args)
    assert "[5/5]" in res.output and (qs / "compare" / "comparison.md").read_text() == table


def test_cache_storage_defaults_are_the_codecs():
    """`kd-detr cache --help` spells the defaults out (no torch import); they must be the codec's, which fit the
    default d3etr recipe's cache in 0.25 MB per view at the official sizes."""
    from kd_detr import cli
    from kd_detr.teacher.cache import StoreConfig, bytes_per_view
    from kd_detr.teacher.cache.attention_codec import DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC

    assert (cli.DEFAULT_ATTENTION_SPEC, cli.DEFAULT_CLASSES_SPEC) == (DEFAULT_ATTENTION_SPEC, DEFAULT_CLASSES_SPEC)
    store = StoreConfig.parse(DEFAULT_ATTENTION_SPEC, classes=DEFAULT_CLASSES_SPEC)
    assert store.attn_rest == "uniform" and store.class_rest == "mean_prob"
    assert bytes_per_view(store) == 244_820 <= 250_000
    assert bytes_per_view(store) * 3 <= bytes_per_view(StoreConfig.parse("topk:32"))  # a third of the old default
