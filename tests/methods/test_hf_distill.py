"""Cross-family D3ETR: a transformers teacher folder (``hf:DIR``) distilled into a student of another family,
in process, from a teacher cache and through Ray; the refusals the families need."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from kd_detr.cli import main  # noqa: E402
from kd_detr.models import build_model  # noqa: E402
from tests.support.runs import read_log  # noqa: E402


def _data_label_map(synth_data):
    from kd_detr.data import CocoDetection

    return CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json").label_map


def _hf_teacher_folder(tmp, synth_data, family="detr", names=True):
    """A tiny random-init transformers teacher saved with save_pretrained; its id2label names the data's
    categories in reverse order (so mapping by name is not the identity)."""
    label_map = _data_label_map(synth_data)
    torch.manual_seed(11)
    model = build_model(f"hf_{family}_tiny", num_classes=label_map.num_classes, num_queries=12)
    cats = [label_map.name_of_index(i) for i in range(label_map.num_classes)][::-1]
    model.hf.config.id2label = {i: (n if names else f"thing_{i}") for i, n in enumerate(cats)}
    model.hf.config.label2id = {v: k for k, v in model.hf.config.id2label.items()}
    folder = tmp / f"hf_{family}"
    model.hf.save_pretrained(folder)
    return folder


def _args(synth_data, out, teacher, student="hf_rt_detr_tiny", *extra):
    return ["distill", "--teacher", f"hf:{teacher}", "--student", student, "--student-opt", "num_queries=10",
            "--recipe", "d3etr_cross_family", "--data", str(synth_data), "--image-size", "64", "--num-workers", "0",
            "--output-dir", str(out), "--no-progress", "--set", "train.batch_size=4", "--set", "train.log_every=1",
            "--set", "train.eval_every_epochs=0", "--set", "train.lr_drop=1000", *extra]


@pytest.fixture(scope="module")
def teacher_folder(synth_data, tmp_path_factory):
    return _hf_teacher_folder(tmp_path_factory.mktemp("hfteacher"), synth_data)


def test_classes_are_mapped_by_name_and_unknown_names_refused(synth_data, teacher_folder, tmp_path):
    from kd_detr.teacher.loading import load_teacher, resolve_teacher

    label_map = _data_label_map(synth_data)
    spec = resolve_teacher(f"hf:{teacher_folder}")
    model, lm, _ = load_teacher(spec, label_map)
    assert lm == label_map and model.config.num_classes == label_map.num_classes
    C = label_map.num_classes
    assert model.config.class_map == list(range(C))[::-1]  # the folder names the categories in reverse
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    raw = out["family_logits"].softmax(-1)[..., :-1]  # DETR: the family's own class probabilities
    assert torch.allclose(out["pred_logits"].sigmoid(), raw.flip(-1), atol=1e-5)

    unnamed = _hf_teacher_folder(tmp_path, synth_data, names=False)
    res = CliRunner().invoke(main, _args(synth_data, tmp_path / "r", unnamed, "hf_rt_detr_tiny",
                                         "--set", "train.max_iters=1"))
    assert res.exit_code != 0
    first = label_map.name_of_index(0)
    assert "have no class of that name in the model's id2label" in res.output and first in res.output


def test_unsupported_fixed_matching_and_attention_are_refused(synth_data, teacher_folder, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, _args(synth_data, tmp_path / "a", teacher_folder, "hf_rt_detr_tiny",
                                    "--set", "distill.fixed=true", "--set", "train.max_iters=1"))
    assert res.exit_code != 0
    assert "hf_rt_detr_tiny (transformers rt_detr) cannot run" in res.output and "distill.fixed = false" in res.output
    res = runner.invoke(main, _args(synth_data, tmp_path / "b", teacher_folder, "hf_deformable_detr_tiny",
                                    "--set", "distill.cross_attn.enabled=true", "--set", "train.max_iters=1"))
    assert res.exit_code != 0
    assert "distill.cross_attn.enabled = false" in res.output and "deformable_detr" in res.output


def test_cross_family_distillation_in_process_from_cache_and_ray(synth_data, teacher_folder, tmp_path, ray_session):
    runner = CliRunner()
    common = ["--set", "train.max_iters=5", "--views", "2"]
    res = runner.invoke(main, _args(synth_data, tmp_path / "inproc", teacher_folder, "hf_rt_detr_tiny", *common))
    assert res.exit_code == 0, res.output + repr(res.exception)

    cache = tmp_path / "cache"
    res = runner.invoke(main, ["cache", "--teacher", f"hf:{teacher_folder}", "--data", str(synth_data),
                               "--image-size", "64", "--out", str(cache), "--views", "2",
                               "--actors", "1", "--images-per-shard", "8", "--dtype", "float32", "--attention", "full",
                               "--classes", "dense", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    teacher = json.loads((cache / "manifest.json").read_text())["teacher"]
    import transformers

    assert teacher["family"] == "detr" and teacher["transformers_version"] == transformers.__version__
    assert len(teacher["config_sha256"]) == 64 and teacher["config"]["class_map"] is not None
    res = runner.invoke(main, _args(synth_data, tmp_path / "fromcache", teacher_folder, "hf_rt_detr_tiny",
                                    "--teacher-cache", str(cache), *common))
    assert res.exit_code == 0, res.output + repr(res.exception)

    res = runner.invoke(main, _args(synth_data, tmp_path / "ray", teacher_folder, "hf_rt_detr_tiny",
                                    "--teacher-serve", "ray", "--teacher-actors", "1", *common))
    assert res.exit_code == 0, res.output + repr(res.exception)

    runs = {name: [r for r in read_log(tmp_path / name) if "loss" in r] for name in ("inproc", "fromcache", "ray")}
    assert all(len(r) == 5 for r in runs.values())
    for key in ("loss", "distill.total", "distill.adaptive.pred_cls"):
        for i in range(5):
            a = runs["inproc"][i][key]
            assert runs["fromcache"][i][key] == pytest.approx(a, rel=1e-4, abs=1e-5), ("cache", i, key)
            assert runs["ray"][i][key] == pytest.approx(a, rel=1e-4, abs=1e-5), ("ray", i, key)

    # a cache built under another transformers version is refused by name
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["teacher"]["transformers_version"] = "4.0.0"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(main, _args(synth_data, tmp_path / "stale", teacher_folder, "hf_rt_detr_tiny",
                                    "--teacher-cache", str(cache), *common))
    assert res.exit_code != 0 and "transformers 4.0.0" in res.output


def test_cross_family_kd_loss_falls(synth_data, teacher_folder, tmp_path):
    """A Conditional DETR student of kd-detr's own learns to match a transformers DETR teacher."""
    out = tmp_path / "run"
    res = CliRunner().invoke(main, _args(synth_data, out, teacher_folder, "cond_detr_r10_tiny",
                                         "--set", "train.max_iters=30", "--set", "train.lr=1e-3",
                                         "--set", "train.lr_backbone=1e-3", "--set", "train.aux_loss=true"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    kd = [r["distill.total"] for r in read_log(out) if "distill.total" in r]
    assert len(kd) == 30
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5


def test_hf_student_exports_to_a_folder_transformers_loads(synth_data, tmp_path):
    """train an RT-DETR student briefly, export it with --format hf, load it with AutoModelForObjectDetection,
    evaluate the folder with kd-detr eval."""
    from transformers import AutoModelForObjectDetection

    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", "hf_rt_detr_tiny", "--model-opt", "num_queries=10",
                                    "--model-opt", "input_size=64", "--data", str(synth_data), "--image-size", "64",
                                    "--max-iters", "2", "--batch-size", "2", "--num-workers", "0",
                                    "--output-dir", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = CliRunner().invoke(main, ["export", "--run", str(run), "--out", str(tmp_path / "student"),
                                    "--format", "hf"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    folder = tmp_path / "student"
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    label_map = _data_label_map(synth_data)
    assert model.config.id2label[0] == label_map.name_of_index(0)
    from kd_detr.models import load_model

    student, _ = load_model(run / "model_final.safetensors")
    student.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, student.hf(pixel_values=x).logits, atol=1e-5)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(folder), "--data", str(synth_data),
                                    "--image-size", "64", "--num-workers", "0", "--output-dir", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (tmp_path / "ev" / "metrics.json").is_file()
