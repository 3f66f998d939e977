"""Loading transformers folders (``hf:DIR``): no weight is ever replaced silently, every broken file is one
line naming it, the Hub stays off, and Fixed Matching gets only static learned ``[Q,d]`` queries."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from kd_detr.data import LabelMap  # noqa: E402
from kd_detr.models import build_model, get_config, list_models  # noqa: E402
from kd_detr.models.backbone import read_state_dict_file  # noqa: E402
from kd_detr.models.hf import FAMILIES, HFDetector, HFModelConfig  # noqa: E402
from kd_detr.models.hf.adapter import hub_offline_and_quiet  # noqa: E402
from kd_detr.models.hf.registry import tiny_name  # noqa: E402
from kd_detr.models.hf.tiny_configs import TINY_CONFIGS, tiny_dab_detr, tiny_deformable_detr  # noqa: E402
from kd_detr.teacher.loading import load_teacher, resolve_teacher, spec_from_dict, spec_to_dict  # noqa: E402

FAMILY_KEYS = sorted(k for k in FAMILIES if tiny_name(k) in list_models())
CLASSES = 5
# families with static learned [Q,d] queries (single-stage Deformable DETR: the query_pos half of its [Q,2d])
STATIC_QUERIES = {"detr", "conditional_detr", "deformable_detr"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One pristine ``save_pretrained`` folder per family (5 classes, 6 queries); tests copy before changing."""
    root = tmp_path_factory.mktemp("hf_folders")
    out = {}
    with hub_offline_and_quiet():
        for family in FAMILY_KEYS:
            torch.manual_seed(0)
            cls = getattr(transformers, FAMILIES[family].hf_class)
            cls(TINY_CONFIGS[family](num_labels=CLASSES, num_queries=6)).save_pretrained(root / family)
            out[family] = root / family
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _label_map() -> LabelMap:
    return LabelMap.contiguous([{"id": i + 1, "name": f"class_{i}"} for i in range(CLASSES)])


def _model_keys(folder: Path) -> dict[str, tuple]:
    """The tensors a loaded model holds under the same name as in the folder's file (transformers renames
    some keys on load; these it does not) and with no tied copy, with their shapes."""
    family = get_config(f"hf:{folder}").family
    with hub_offline_and_quiet():
        model = getattr(transformers, FAMILIES[family].hf_class).from_pretrained(folder)
    sd = model.state_dict()
    ptrs = [v.data_ptr() for v in sd.values()]
    own = {k: tuple(v.shape) for k, v in sd.items() if ptrs.count(v.data_ptr()) == 1}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: own[k] for k in f.keys() if k in own}


# ---------------------------------------------------------------------------- weights that do not all load
@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_a_teacher_missing_or_misshaped_tensor_is_refused_naming_them(family, folders, tmp_path):
    folder = _copy(folders[family], tmp_path / family)
    keys = _model_keys(folder)
    # backbone tensors where the family's file names them as the model does (else any matrix of the model)
    pool = [k for k in sorted(keys) if "backbone" in k and len(keys[k]) >= 2] or \
        [k for k in sorted(keys) if len(keys[k]) >= 2 and "class" not in k]
    reshaped, dropped = pool[0], pool[1]
    sd = load_file(folder / "model.safetensors")
    sd[reshaped] = torch.zeros(keys[reshaped][0] + 1, *keys[reshaped][1:])
    del sd[dropped]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    spec = resolve_teacher(f"hf:{folder}")
    file_shape = [keys[reshaped][0] + 1, *keys[reshaped][1:]]
    expected = (f"{folder}: the teacher's weights do not all load: missing {dropped}; mis-shaped {reshaped} "
                f"(file {file_shape}, model {list(keys[reshaped])}) (a teacher must load every tensor of its folder: "
                "fix the folder, or pass --allow-partial-weights to start these from random values)")
    with pytest.raises(ValueError) as err:
        load_teacher(spec, _label_map())
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:  # the same folder as a student (same class count): the same rule
        build_model(f"hf:{folder}")
    assert str(err.value) == expected.replace("the teacher's", "the student's").replace(
        "a teacher must load every tensor of its folder",
        "a student may re-initialise only its class head, when its class count changes")


def test_unexpected_tensors_are_refused_and_partial_weights_must_be_asked_for(folders, tmp_path, caplog):
    folder = _copy(folders["detr"], tmp_path / "detr")
    sd = load_file(folder / "model.safetensors")
    dropped = "model.input_projection.bias"
    del sd[dropped]
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"load: missing {dropped}; unexpected extra.weight \(a teacher"):
        load_teacher(resolve_teacher(f"hf:{folder}"), _label_map())

    spec = resolve_teacher(f"hf:{folder}", allow_partial_weights=True)
    assert spec.to_dict()["allow_partial_weights"] is True
    assert spec_from_dict(spec_to_dict(spec)) == spec  # what a Ray actor or a cache build receives
    with caplog.at_level(logging.WARNING, logger="kd_detr.models.hf"):
        model, _, _ = load_teacher(spec, _label_map())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"{folder}: partial weights allowed (allow_partial_weights): missing {dropped}; unexpected "
                     "extra.weight; the model's tensors among them start from random values"]
    assert model.config.allow_partial_weights is True
    assert model.config.to_dict()["allow_partial_weights"] is True  # recorded with the model's config
    # the student's switch: build_model(allow_partial_weights=True) and --student-opt allow_partial_weights=true
    assert build_model(f"hf:{folder}", allow_partial_weights=True).config.allow_partial_weights is True
    assert build_model(f"hf:{folder}", **{"allow_partial_weights": True}).config.allow_partial_weights is True


def test_old_serialised_configs_load_and_the_switch_is_recorded_only_when_on():
    cfg = get_config(tiny_name("detr"))
    d = cfg.to_dict()
    assert "allow_partial_weights" not in d  # the same dict as before the field existed
    assert HFModelConfig.from_dict(d).allow_partial_weights is False
    on = cfg.replace(allow_partial_weights=True)
    assert HFModelConfig.from_dict(json.loads(on.to_json())).allow_partial_weights is True
    with pytest.raises(ValueError, match="allow_partial_weights must be true or false"):
        cfg.replace(allow_partial_weights="yes")


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_a_student_re_initialises_only_its_class_head_and_says_so(family, folders, caplog):
    folder = folders[family]
    with caplog.at_level(logging.WARNING, logger="kd_detr.models.hf"):
        full = build_model(f"hf:{folder}")
        assert caplog.records == []
        student = build_model(f"hf:{folder}", num_classes=3)
    (line,) = [r.getMessage() for r in caplog.records]
    prefix = f"{folder}: class head re-initialised for 3 classes (the folder's has {CLASSES}): "
    assert line.startswith(prefix)
    named = line[len(prefix):].split(", ")
    old, new = full.hf.state_dict(), student.hf.state_dict()
    changed = {k for k in new if new[k].shape != old[k].shape}
    assert named and set(named) <= changed
    for k in changed:  # a class axis: 5 -> 3 classes, or 6 -> 4 with a no-object / padding slot
        diff = [(a, b) for a, b in zip(old[k].shape, new[k].shape) if a != b]
        assert diff in ([(5, 3)], [(6, 4)]), (k, old[k].shape, new[k].shape)
    for k in new.keys() - changed:  # everything else is the folder's
        assert torch.equal(new[k], old[k]), k
    # a teacher never re-initialises its head: another class count is a mis-shaped load
    with pytest.raises(ValueError, match=r"the teacher's weights do not all load: mis-shaped .*\(file \[[56]"):
        HFDetector(get_config(f"hf:{folder}").replace(num_classes=3), role="teacher")


# ---------------------------------------------------------------------------- broken files: one line each
def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def _bad_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    b = f.read_bytes()
    f.write_bytes(b[:8] + b"{not json" + b[17:])


def _huge_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    b = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 40) + b[8:])


BROKEN = {
    "truncated": (_truncate, "{w}: not a readable safetensors file: the file is shorter than its header says: "
                             "truncated (an interrupted copy or download?)"),
    "bad_header": (_bad_header, "{w}: not a readable safetensors file: Error while deserializing header: invalid "
                                "JSON in header: key must be a string at line 1 column 2"),
    "huge_header": (_huge_header, "{w}: corrupt safetensors header (it says 1099511627776 header bytes, the file "
                                  "has {size}; over the 100 MB limit)"),
    "unknown_model_type": (lambda f: _edit_config(f, model_type="bert"),
                           "{c}: transformers model_type 'bert' is not a supported DETR family; supported: {types}"),
    "no_model_type": (lambda f: _edit_config(f, model_type=None),
                      "{c}: no model_type (a transformers save_pretrained config.json names its architecture in "
                      "model_type)"),
    "config_not_object": (lambda f: (f / "config.json").write_text("[1, 2]"),
                          "{c}: not a JSON object (its top level is a list); a transformers config.json is an object "
                          "of config fields"),
    "id2label_key": (lambda f: _edit_config(f, id2label={"zero": "cat"}),
                     "{c}: id2label key 'zero' is not an integer class index"),
    "no_queries": (lambda f: _edit_config(f, num_queries=0),
                   "{c}: num_queries = 0: a detector needs at least one query"),
    "flash_attention": (lambda f: _edit_config(f, attn_implementation="flash_attention_2"),
                        "{c}: attn_implementation = 'flash_attention_2' is not supported: kd-detr runs transformers' "
                        "eager or sdpa attention only (remove the key or set one of them)"),
    "hub_kernel": (lambda f: _edit_config(f, backbone_config={**json.loads((f / "config.json").read_text())[
        "backbone_config"], "attn_implementation": "kernels-community/flash-attn"}),
                   "{c}: backbone_config.attn_implementation = 'kernels-community/flash-attn' is not supported: "
                   "kd-detr runs transformers' eager or sdpa attention only (remove the key or set one of them)"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_folder_is_one_line_naming_the_file_for_teacher_and_student(broken, folders, tmp_path):
    folder = _copy(folders["detr"], tmp_path / "detr")
    corrupt, message = BROKEN[broken]
    corrupt(folder)
    w = folder / "model.safetensors"
    expected = message.format(w=w, c=folder / "config.json", size=w.stat().st_size,
                              types=sorted(f.model_type for f in FAMILIES.values()))
    for load in (lambda: resolve_teacher(f"hf:{folder}"), lambda: build_model(f"hf:{folder}")):
        with pytest.raises(ValueError) as err:
            load()
        assert str(err.value) == expected
        assert "\n" not in str(err.value)


def test_a_pickle_carrying_code_is_refused_in_one_line_and_never_runs(folders, tmp_path):
    folder = _copy(folders["detr"], tmp_path / "detr")
    marker = tmp_path / "code_ran"
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**sd, "payload": Payload()}, folder / "pytorch_model.bin")
    expected = (f"{folder / 'pytorch_model.bin'}: a torch pickle that would import posix.system (code, not tensor "
                "data), refused: only tensors and plain values are read from pickles; use a .safetensors file")
    spec = resolve_teacher(f"hf:{folder}")  # nothing is read from a .bin before the build
    for load in (lambda: load_teacher(spec, _label_map()), lambda: build_model(f"hf:{folder}"),
                 lambda: read_state_dict_file(folder / "pytorch_model.bin")):
        with pytest.raises(ValueError) as err:
            load()
        assert str(err.value) == expected
        assert err.value.__cause__ is None  # torch's advice (load with weights_only=False) is not chained either
    assert not marker.exists()


def test_custom_code_is_named_once_and_the_built_in_class_used(folders, tmp_path, caplog):
    folder = _copy(folders["detr"], tmp_path / "detr")
    _edit_config(folder, auto_map={"AutoConfig": "configuration_mine.MyConfig",
                                   "AutoModelForObjectDetection": "modeling_mine.MyDetr"})
    (folder / "modeling_mine.py").write_text(f"open({str(tmp_path / 'code_ran')!r}, 'w')\n")
    with caplog.at_level(logging.WARNING, logger="kd_detr.models.hf"):
        model = build_model(f"hf:{folder}")
        build_model(f"hf:{folder}")
    assert [r.getMessage() for r in caplog.records] == [
        f"hf:{folder}: config.json's auto_map names custom code (modeling_mine.MyDetr), which kd-detr never runs: "
        "transformers' built-in DetrForObjectDetection (model_type 'detr') is used instead"]
    assert type(model.hf) is transformers.DetrForObjectDetection
    assert not (tmp_path / "code_ran").exists()


# ---------------------------------------------------------------------------- the Hub off, transformers quiet
@pytest.mark.parametrize("before", [None, "0"])
def test_the_hub_is_off_during_a_build_and_everything_is_restored(before, folders, monkeypatch, capfd):
    import huggingface_hub.constants as hub_constants
    from transformers.utils import logging as hf_logging

    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    seen = {}
    real = transformers.DetrForObjectDetection.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(env=os.environ.get("HF_HUB_OFFLINE"), hub=hub_constants.HF_HUB_OFFLINE,
                    local=kwargs.get("local_files_only"), bars=hf_logging.is_progress_bar_enabled(),
                    verbosity=hf_logging.get_verbosity())
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.DetrForObjectDetection, "from_pretrained", classmethod(spy))
    capfd.readouterr()
    build_model(f"hf:{folders['detr']}", num_classes=3)  # a load with a report table (the class head)
    out, err = capfd.readouterr()
    assert seen == {"env": "1", "hub": True, "local": True, "bars": False, "verbosity": logging.ERROR}
    assert "Loading weights" not in err + out and "LOAD REPORT" not in err + out
    assert os.environ.get("HF_HUB_OFFLINE") == before and hub_constants.HF_HUB_OFFLINE is False
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == logging.WARNING
    with pytest.raises(ValueError):  # restored after a failed build too
        with hub_offline_and_quiet():
            raise ValueError("boom")
    assert os.environ.get("HF_HUB_OFFLINE") == before and hf_logging.is_progress_bar_enabled()


def test_a_config_asking_for_a_hub_backbone_cannot_reach_it(folders, tmp_path):
    folder = _copy(folders["detr"], tmp_path / "detr")
    _edit_config(folder, backbone_config=None, backbone="microsoft/resnet-50", use_timm_backbone=False,
                 use_pretrained_backbone=True)
    with pytest.raises(ValueError) as err:
        build_model(f"hf:{folder}")
    assert str(err.value) == (
        f"{folder}: transformers cannot build a DetrConfig from its config: it asks for "
        "https://huggingface.co/api/models/microsoft/resnet-50 from the Hugging Face Hub, and kd-detr builds "
        "transformers models from local files only (name a local backbone_config instead)")


# ---------------------------------------------------------------------------- queries: Fixed Matching, num_queries
def _fixed_matching_check(teacher_config):
    from kd_detr.methods.d3etr.config import DistillConfig
    from kd_detr.methods.d3etr.objective import _check_families

    _check_families(DistillConfig(), get_config("cond_detr_r10_tiny"), teacher_config, [])


def _images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=g), torch.zeros(2, 64, 64, dtype=torch.bool)


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_fixed_matching_only_where_the_family_has_static_queries(family):
    torch.manual_seed(0)
    opts = {} if FAMILIES[family].pixel_mask else {"input_size": 64}
    model = build_model(tiny_name(family), num_queries=6, **opts).eval()
    config = model.config
    if family in STATIC_QUERIES:
        assert config.fixed_queries and config.fixed_queries_reason is None
        _fixed_matching_check(config)
        q = model.learned_queries()
        assert q.shape == (6, config.d_model)
        with torch.no_grad():
            out = model(*_images())
        if family == "deformable_detr":
            # the half that plays Conditional DETR's positional queries: the one its reference points come from
            ref = model.hf.model.reference_points(q).sigmoid()
            assert torch.allclose(out["reference_points"], ref[None, :, :2].expand(2, -1, -1), atol=1e-6)
            assert torch.equal(q, model.hf.model.query_position_embeddings.weight[:, :config.d_model])
        else:
            assert torch.equal(q, model.hf.model.query_position_embeddings.weight)
        assert torch.equal(out["query_embed"], q)
    else:
        assert not config.fixed_queries
        with pytest.raises(ValueError) as err:
            _fixed_matching_check(config)
        assert str(err.value) == (
            "Fixed Matching hands the teacher's static learned [Q,d] object queries to the student, but the teacher "
            f"{config.name} (transformers {family}) has none: {config.fixed_queries_reason}; set distill.fixed = false")
        if family == "dab_detr":
            assert "anchor boxes" in config.fixed_queries_reason


def test_two_stage_deformable_detr_has_no_static_queries_and_counts_its_proposals():
    cfg = tiny_deformable_detr(num_labels=4, num_queries=9, with_box_refine=True, two_stage=True).to_dict()
    cfg["two_stage_num_proposals"] = 7
    config = HFModelConfig(name="two_stage", family="deformable_detr", hf_config=cfg).validate()
    assert config.num_queries == 7 and not config.fixed_queries
    with pytest.raises(ValueError, match=r"has none: two_stage = true: its queries are chosen per image"):
        _fixed_matching_check(config)
    torch.manual_seed(0)
    with torch.no_grad():
        out = HFDetector(config).eval()(*_images())
    assert out["pred_logits"].shape == (2, 7, 4)


def test_dab_detr_num_queries_counts_its_patterns():
    config = HFModelConfig(name="dab", family="dab_detr",
                           hf_config={**tiny_dab_detr(num_labels=4, num_queries=5).to_dict(), "num_patterns": 2})
    assert config.validate().num_queries == 10
    torch.manual_seed(0)
    model = HFDetector(config).eval()
    with torch.no_grad():
        out = model(*_images())
    assert out["pred_logits"].shape == (2, 10, 4) and out.logits.shape[2] == 10
    assert model.learned_queries().shape == (10, config.d_model)  # a placeholder Fixed Matching refuses


def test_num_queries_zero_is_refused_as_an_override():
    with pytest.raises(ValueError, match="num_queries = 0: a detector needs at least one query"):
        build_model(tiny_name("detr"), num_queries=0)


# ---------------------------------------------------------------------------- the CLI switch
def test_allow_partial_weights_on_the_command_line_is_needed_and_recorded(folders, tmp_path, synth_data):
    """`kd-detr distill` refuses a teacher folder that does not fully load in one line; with
    --allow-partial-weights it trains and the run's config.json records the switch for the teacher and,
    for a transformers student, in its model overrides."""
    from click.testing import CliRunner

    from kd_detr.cli import main

    names = [c["name"] for c in json.loads((synth_data / "annotations" / "instances_train2017.json").read_text())[
        "categories"]]
    config = TINY_CONFIGS["conditional_detr"](num_labels=len(names), num_queries=6)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    teacher = tmp_path / "teacher"
    with hub_offline_and_quiet():
        transformers.ConditionalDetrForObjectDetection(config).save_pretrained(teacher)
    sd = load_file(teacher / "model.safetensors")
    del sd["model.input_projection.bias"]
    save_file(sd, teacher / "model.safetensors", metadata={"format": "pt"})
    common = ["distill", "--teacher", f"hf:{teacher}", "--student", tiny_name("conditional_detr"),
              "--recipe", "d3etr_cross_family", "--data", str(synth_data), "--image-size", "64",
              "--num-workers", "0", "--no-progress", "--set", "train.max_iters=1", "--set", "train.batch_size=2",
              "--set", "train.eval_every_iters=1", "--set", "train.eval_max_images=2"]
    refused = CliRunner().invoke(main, common + ["--output-dir", str(tmp_path / "refused")])
    assert refused.exit_code == 1
    # lines the shared Ray session forwards from its own processes (e.g. the raylet's disk-space warning) are
    # not the command's output
    ray_line = re.compile(r"^(\x1b\[\d+m)?\((raylet|pid=\d+)")
    assert [line for line in refused.output.strip().splitlines() if not ray_line.match(line)] == [
        f"Error: {teacher}: the teacher's weights do not all load: missing model.input_projection.bias (a teacher "
        "must load every tensor of its folder: fix the folder, or pass --allow-partial-weights to start these "
        "from random values)"]
    out = tmp_path / "allowed"
    allowed = CliRunner().invoke(main, common + ["--output-dir", str(out), "--allow-partial-weights"])
    assert allowed.exit_code == 0, allowed.output
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["teacher"]["allow_partial_weights"] is True
    # the tiny student is a transformers model too: the switch reaches it and its checkpoint's config
    assert record["config"]["train"]["model_overrides"] == {"allow_partial_weights": True}


def test_allow_partial_weights_with_no_transformers_model_is_a_usage_error(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main

    res = CliRunner().invoke(main, ["train", "--model", "cond_detr_r18_tiny", "--data", str(synth_data),
                                    "--max-iters", "1", "--output-dir", str(tmp_path / "r"), "--allow-partial-weights"])
    assert res.exit_code == 2 and "load strictly as kd-detr models" in res.output
    assert not (tmp_path / "r").exists()


def test_a_kd_detr_export_brings_its_input_square_to_hf_dir(folders, tmp_path):
    """`kd-detr export --format hf` of a fixed-size student records its square; as `hf:DIR` (a teacher, a
    student to fine-tune, eval) the folder runs at it, not at the family's default 640 px."""
    fixed = [f for f in FAMILY_KEYS if not FAMILIES[f].pixel_mask]
    masked = [f for f in FAMILY_KEYS if FAMILIES[f].pixel_mask]
    for family in fixed[:1] + masked[:1]:
        folder = _copy(folders[family], tmp_path / family)
        assert get_config(f"hf:{folder}").input_size is None
        _edit_config(folder, kd_detr_input_size=96)
        expected = None if FAMILIES[family].pixel_mask else 96  # mask families take any size
        assert get_config(f"hf:{folder}").input_size == expected
        assert resolve_teacher(f"hf:{folder}") is not None
        if expected:
            assert build_model(f"hf:{folder}").input_size == 96
