"""``kd-detr export --format hf|onnx``: a transformers ``save_pretrained`` folder and an ONNX graph of the
student, each equal to the kd-detr model on the same padded batch; the hf export imports back identically."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kd_detr.cli import main  # noqa: E402
from kd_detr.data.label_map import LabelMap  # noqa: E402
from kd_detr.models import build_model, load_model, model_from_official, save_model  # noqa: E402
from kd_detr.models.hf_export import hf_config  # noqa: E402
from kd_detr.runs.export import export, parse_formats  # noqa: E402

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 8, "name": "bird"},
              {"id": 11, "name": "fish"}, {"id": 20, "name": "horse"}]


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and heads (at init the box head is zero: boxes would not depend on the image)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.startswith(("bbox_embed", "class_embed")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def _tiny(**overrides):
    torch.manual_seed(0)
    model = build_model("cond_detr_r10_tiny", num_classes=5, **overrides)
    _randomise(model)
    return model.eval()


def _save_run(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model_final.safetensors", label_map=LabelMap.contiguous(CATEGORIES))
    return folder


def _batch(b=2, h=64, w=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)  # True = pad
    images[-1, :, h // 2:, :], mask[-1, h // 2:, :] = 0, True
    images[-1, :, :, 3 * w // 4:], mask[-1, :, 3 * w // 4:] = 0, True
    return images, mask


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = _tiny()
    return model, _save_run(model, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def cli_export(run, tmp_path_factory):
    """One `kd-detr export --format hf,onnx` shared by the tests below."""
    _, folder = run
    prefix = tmp_path_factory.mktemp("out") / "student"
    res = CliRunner().invoke(main, ["export", "--run", str(folder), "--out", str(prefix), "--format", "hf,onnx"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return prefix, res.output


def test_cli_writes_hf_folder_and_onnx_only(cli_export):
    prefix, output = cli_export
    assert sorted(p.name for p in prefix.iterdir()) == ["config.json", "model.safetensors"]
    assert prefix.with_name("student.onnx").is_file()
    assert not prefix.with_name("student.safetensors").exists() and not prefix.with_name("student.pth").exists()
    assert f"{prefix}/" in output and "student.onnx" in output
    assert not [p for p in prefix.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("auto", [False, True])
def test_hf_export_loads_cleanly_and_matches(run, cli_export, auto):
    from transformers import AutoModelForObjectDetection, ConditionalDetrForObjectDetection

    model, _ = run
    prefix, _ = cli_export
    cls = AutoModelForObjectDetection if auto else ConditionalDetrForObjectDetection
    hf, info = cls.from_pretrained(prefix, output_loading_info=True)
    assert type(hf).__name__ == "ConditionalDetrForObjectDetection"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "bird", 3: "fish", 4: "horse"}
    assert hf.config.kd_detr_label_map["categories"][4]["id"] == 20
    images, mask = _batch()
    with torch.no_grad():
        ours = model(images, mask)
        ref = hf.eval()(pixel_values=images, pixel_mask=(~mask).long())  # HF: 1 = valid
    assert (ours["pred_logits"] - ref.logits).abs().max() <= 1e-5
    assert (ours["pred_boxes"] - ref.pred_boxes).abs().max() <= 1e-5
    assert ours["pred_logits"].std() > 1e-2 and ours["pred_boxes"].std() > 1e-2  # not trivially equal


def test_hf_export_imports_back_identically(run, cli_export):
    model, _ = run
    prefix, _ = cli_export
    back = model_from_official(prefix / "model.safetensors", "cond_detr_r10_tiny", fmt="hf")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_onnx_export_matches_pytorch_with_dynamic_shapes(run, cli_export):
    import onnx
    import onnxruntime as ort

    model, _ = run
    prefix, _ = cli_export
    path = prefix.with_name("student.onnx")
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["kd_detr_label_map"])["num_classes"] == 5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "mask"]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    # the traced size, another batch / image size, and one whose padding starts on a row the mask's nearest
    # resize to the 4x2 C5 map reads (112 -> 4: row 56; onnxruntime's own Resize read row 55)
    for b, h, w in [(2, 64, 64), (3, 96, 80), (2, 112, 48)]:
        images, mask = _batch(b, h, w, seed=b)
        with torch.no_grad():
            ref = model(images, mask)
        logits, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
        assert (torch.from_numpy(logits) - ref["pred_logits"]).abs().max() <= 1e-4
        assert (torch.from_numpy(boxes) - ref["pred_boxes"]).abs().max() <= 1e-4


def test_onnx_export_is_generic(tmp_path):
    """Any module called as model(images, mask) -> {pred_logits, pred_boxes} exports (HF-family students)."""
    from kd_detr.runs.onnx_export import export_onnx

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
            self.queries = torch.nn.Parameter(torch.randn(6, 8))
            self.cls, self.box = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

        def forward(self, images, mask):
            f = self.conv(images).flatten(2).transpose(1, 2)  # [B,S,8]
            valid = ~torch.nn.functional.interpolate(mask[None].float(), size=images.shape[-2:])[0].bool()
            keep = valid[:, ::4, ::4].flatten(1)[..., None].to(f.dtype)
            attn = torch.softmax(self.queries @ f.transpose(1, 2) - 1e4 * (1 - keep.transpose(1, 2)), -1)
            hs = attn @ f
            return {"pred_logits": self.cls(hs), "pred_boxes": self.box(hs).sigmoid(), "aux": [hs]}

    toy = Toy().train()
    out = export_onnx(toy, tmp_path / "toy.onnx")
    assert out.is_file() and toy.training  # the caller's mode is restored


def test_unsupported_configs_are_refused_by_name(tmp_path):
    gn = _save_run(_tiny(backbone_norm="gn"), tmp_path / "gn")
    with pytest.raises(ValueError, match=r"backbone_norm='gn'"):
        export(gn, tmp_path / "x", ["hf"])
    res = CliRunner().invoke(main, ["export", "--run", str(gn), "--out", str(tmp_path / "x"), "--format", "hf"])
    assert res.exit_code != 0 and "backbone_norm='gn'" in res.output and len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x*"))  # refused before anything is written
    cfg = build_model("cond_detr_r10_tiny", num_classes=5).config
    with pytest.raises(ValueError, match=r"dilation=True"):
        hf_config(cfg.replace(backbone="resnet50", dilation=True))
    with pytest.raises(ValueError, match=r"pe_temperature=20"):
        hf_config(cfg.replace(pe_temperature=20))


def test_format_option_parsing_and_existing_folder(run, tmp_path):
    assert parse_formats(None) == ("safetensors", "official")
    assert parse_formats(["onnx", "hf, safetensors"]) == ("safetensors", "hf", "onnx")
    with pytest.raises(ValueError, match="tflite"):
        parse_formats(["tflite"])
    _, folder = run
    res = CliRunner().invoke(main, ["export", "--run", str(folder), "--out", str(tmp_path / "s"), "--format", "tflite"])
    assert res.exit_code == 2 and "tflite" in res.output
    # a folder that is not an earlier hf export is never replaced
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export(folder, tmp_path / "busy", ["hf"])
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_default_formats_unchanged(run, tmp_path):
    model, folder = run
    res = CliRunner().invoke(main, ["export", "--run", str(folder), "--out", str(tmp_path / "student")])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"wrote {tmp_path / 'student.safetensors'} and {tmp_path / 'student.pth'}"
    exported, meta = load_model(tmp_path / "student.safetensors")
    assert meta["label_map"]["num_classes"] == 5
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in model.state_dict().items())


def test_hf_family_student_exports_onnx_and_refuses_official(tmp_path):
    """A transformers-family student (kd_detr/models/hf adapters): onnx works, official / hf are refused."""
    try:
        student = build_model("hf_detr_tiny", num_classes=5).eval()
    except (KeyError, ValueError, ImportError) as e:
        pytest.skip(f"no hf_detr_tiny student here: {e}")
    folder = _save_run(student, tmp_path / "hf_run")
    with pytest.raises(ValueError, match="needs a kd-detr Conditional DETR student"):
        export(folder, tmp_path / "x", ["official"])
    paths = export(folder, tmp_path / "y", ["onnx"])
    assert paths["onnx"].is_file()


def test_hf_export_files_honour_the_umask(cli_export):
    """safetensors writes 0600; the folder's files get what a plain open gives (0644 under umask 022)."""
    import os

    prefix, _ = cli_export
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    assert {p.name: p.stat().st_mode & 0o777 for p in prefix.iterdir()} == {"config.json": want,
                                                                             "model.safetensors": want}
    assert prefix.with_name("student.onnx").stat().st_mode & 0o777 == want


@pytest.mark.parametrize("out, says", [("", "--out is empty"), ("afile/x", "afile is a file, not a folder"),
                                       ("afile/deeper/x", "afile is a file, not a folder"),
                                       (".", "names a folder, not an output prefix")])
def test_bad_out_gives_one_line_naming_it(run, tmp_path, monkeypatch, out, says):
    _, folder = run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(main, ["export", "--run", str(folder), "--out", out, "--format", "safetensors,hf"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_onnx_refused_by_family_name_before_anything_is_written(tmp_path, monkeypatch):
    """A family kd-detr has not checked (here: D-FINE taken off the list) is refused by name, nothing written."""
    from kd_detr.runs import onnx_export
    from kd_detr.models.hf.registry import list_hf_models

    name = "hf_d_fine_tiny"
    if name not in list_hf_models():
        pytest.skip("transformers without D-FINE")
    assert not set(onnx_export.ONNX_REFUSED) & onnx_export.ONNX_FAMILIES
    monkeypatch.setattr(onnx_export, "ONNX_FAMILIES", onnx_export.ONNX_FAMILIES - {"d_fine"})
    folder = _save_run(build_model(name, num_classes=5).eval(), tmp_path / "run")
    res = CliRunner().invoke(main, ["export", "--run", str(folder), "--out", str(tmp_path / "o" / "s"),
                                    "--format", "safetensors,onnx"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert ("cannot export hf_d_fine_tiny to ONNX: transformers family 'd_fine': kd-detr has not checked this "
            "family's ONNX graph against PyTorch") in res.output
    assert not (tmp_path / "o").exists()


def _variance_preserving(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Linear / conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.01): features that depend on the image and encoder
    scores that do not tie (transformers' init gives every encoder token of D-FINE the same score)."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ["d_fine", "deimv2"])
def test_onnx_export_of_d_fine_families(family, tmp_path):
    """D-FINE and DEIMv2 export faithfully (within ~2e-6) once their encoder scores do not tie."""
    from kd_detr.models.hf.registry import list_hf_models
    from kd_detr.runs.onnx_export import ONNX_FAMILIES, ONNX_TOPK_FAMILIES, check_onnx, export_onnx, _example

    name = f"hf_{family}_tiny"
    if name not in list_hf_models():
        pytest.skip(f"transformers without {family}")
    assert family in ONNX_FAMILIES and family in ONNX_TOPK_FAMILIES
    torch.manual_seed(0)
    model = _variance_preserving(build_model(name, num_classes=5, num_queries=10).eval())
    path = export_onnx(model, tmp_path / "m.onnx")  # checked at 2x64x64 and 3x96x80 within 1e-4
    worst = check_onnx(path, model, [_example(1, 112, 48, torch.device("cpu"), seed=4)], atol=1e-5)
    assert worst <= 1e-5


def test_untrained_d_fine_is_refused_by_the_check_naming_tied_scores(tmp_path):
    """transformers' init gives every encoder token the same score: onnxruntime's top-k picks other queries."""
    from kd_detr.models.hf.registry import list_hf_models
    from kd_detr.models.hf_export import ExportMismatch
    from kd_detr.runs.onnx_export import export_onnx

    if "hf_d_fine_tiny" not in list_hf_models():
        pytest.skip("transformers without D-FINE")
    torch.manual_seed(0)
    model = build_model("hf_d_fine_tiny", num_classes=5).eval()
    with pytest.raises(ExportMismatch, match="top-k query selection meets tied encoder scores"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_no_half_export(run, tmp_path, monkeypatch):
    """A later writer failing its check removes what the same call had already written (an earlier file of
    another format is kept)."""
    from kd_detr.models.hf_export import ExportMismatch
    from kd_detr.runs import onnx_export

    _, folder = run
    prefix = tmp_path / "student"
    prefix.with_name("student.pth").write_bytes(b"earlier")
    deep = tmp_path / "new" / "deeper" / "student"

    def mismatch(model, path, **kw):
        raise ExportMismatch(f"{path}: onnxruntime pred_logits differs")

    monkeypatch.setattr(onnx_export, "export_onnx", mismatch)
    res = CliRunner().invoke(main, ["export", "--run", str(folder), "--out", str(prefix),
                                    "--format", "safetensors,hf,onnx"])
    assert res.exit_code == 1 and res.output.strip() == f"Error: {prefix}.onnx: onnxruntime pred_logits differs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pth"]
    with pytest.raises(ExportMismatch):
        export(folder, deep, ["safetensors", "onnx"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pth"]  # the folders it made are gone too


@pytest.mark.parametrize("family", ["deformable_detr", "lw_detr", "rf_detr"])
def test_onnx_export_of_families_traced_with_fixes(family, tmp_path):
    """Deformable DETR, LW-DETR and RF-DETR: the graph equals PyTorch at sizes other than the traced one (their
    feature-map sizes, window padding and antialiased resize are traced, not constants), and the tracing
    replacements are undone afterwards."""
    import onnxruntime as ort

    from kd_detr.models.hf import adapter
    from kd_detr.models.hf.registry import list_hf_models
    from kd_detr.runs.onnx_export import ONNX_FAMILIES, ONNX_REFUSED, export_onnx

    name = f"hf_{family}_tiny"
    if name not in list_hf_models():
        pytest.skip(f"transformers without {family}")
    assert family in ONNX_FAMILIES and family not in ONNX_REFUSED
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, num_queries=10).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from transformers' init, so that boxes depend on the image
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pad = adapter._pad_to_multiple
    path = export_onnx(model, tmp_path / "m.onnx")  # checked at 2x64x64 and 3x96x80
    assert adapter._pad_to_multiple is pad
    assert not any(m._forward_pre_hooks for m in model.modules())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, mask = _batch(2, 112, 48, seed=5)  # a third size, taller than wide
    with torch.no_grad():
        ref = model(images, mask)
    feed = {"images": images.numpy(), "mask": mask.numpy()}
    logits, boxes = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
    assert (torch.from_numpy(logits) - ref["pred_logits"]).abs().max() <= 1e-4
    assert (torch.from_numpy(boxes) - ref["pred_boxes"]).abs().max() <= 1e-4
    assert (ref["pred_boxes"][0] - ref["pred_boxes"][1]).abs().max() > 1e-3  # the outputs depend on the image


def test_deformable_detr_onnx_is_wrong_at_other_sizes_without_the_tracing_fixes(tmp_path, monkeypatch):
    """The cause the fixes address: traced as transformers writes it, the feature-map sizes are constants."""
    import contextlib

    from kd_detr.models.hf.registry import list_hf_models
    from kd_detr.models.hf_export import ExportMismatch
    from kd_detr.runs import onnx_export

    if "hf_deformable_detr_tiny" not in list_hf_models():
        pytest.skip("transformers without Deformable DETR")
    torch.manual_seed(0)
    model = build_model("hf_deformable_detr_tiny", num_classes=5, num_queries=10).eval()
    monkeypatch.setattr(onnx_export, "_tracing_fixes", lambda model: contextlib.nullcontext())
    with pytest.raises(ExportMismatch, match=r"differs from PyTorch by .* input \(3, 3, 96, 80\)"):
        onnx_export.export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("shape, size", [((4, 4), (8, 8)), ((4, 4), (10, 9)), ((4, 4), (3, 7)),
                                         ((37, 23), (5, 30)), ((6, 6), (6, 6))])
def test_antialiased_bicubic_as_matrix_products_equals_pytorch(shape, size):
    """The opset-17 form of F.interpolate(mode="bicubic", antialias=True) used while tracing RF-DETR."""
    import torch.nn.functional as F

    from kd_detr.runs.onnx_export import _TracedInterpolate

    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    with _TracedInterpolate():
        got = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        plain = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # anything else: untouched
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
    assert torch.equal(plain, F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def test_traced_nearest_mask_resize_reads_pytorchs_rows(tmp_path):
    """The padding mask resized to a feature map: the ONNX graph reads the rows PyTorch reads (a plain Resize
    reads row 55 of 112 for the third of 4 rows, PyTorch row 56)."""
    import torch.nn.functional as F
    import onnxruntime as ort

    from kd_detr.runs.onnx_export import _TracedInterpolate

    class MaskResize(torch.nn.Module):
        def forward(self, mask, feat):
            return F.interpolate(mask[None].float(), size=feat.shape[-2:])[0]

    with _TracedInterpolate(), torch.no_grad():
        torch.onnx.export(MaskResize(), (torch.zeros(2, 64, 64, dtype=torch.bool), torch.zeros(2, 1, 2, 2)),
                          str(tmp_path / "r.onnx"), dynamo=False, opset_version=17, input_names=["mask", "feat"],
                          dynamic_axes={"mask": {0: "b", 1: "h", 2: "w"}, "feat": {0: "b", 2: "fh", 3: "fw"}})
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    for h, w, fh, fw in [(112, 48, 4, 2), (100, 60, 7, 4), (64, 64, 2, 2), (96, 80, 3, 3)]:
        mask = torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, h // 2:], mask[1, :, 3 * w // 4:] = True, True
        feat = torch.zeros(2, 1, fh, fw)
        got = session.run(None, {"mask": mask.numpy(), "feat": feat.numpy()})[0]
        assert torch.equal(torch.from_numpy(got), MaskResize()(mask, feat)), (h, w, fh, fw)
