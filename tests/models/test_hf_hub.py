"""Hub model ids (`hf:org/name[@revision]`, kd_detr/models/hf/hub.py), resolved offline from a Hub cache
layout the test writes itself (`models--org--name/snapshots/<commit>/` + `refs/main`), as huggingface_hub
would have left it after a download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kd_detr.data import LabelMap  # noqa: E402
from kd_detr.models import build_model  # noqa: E402
from kd_detr.models.hf import FAMILIES  # noqa: E402
from kd_detr.models.hf.adapter import hub_offline_and_quiet  # noqa: E402
from kd_detr.models.hf.hub import HubError, _resolve, is_hub_id, resolve_hub_id  # noqa: E402
from kd_detr.models.hf.tiny_configs import TINY_CONFIGS  # noqa: E402
from kd_detr.teacher.loading import load_teacher, resolve_teacher, teacher_family_record  # noqa: E402

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, seed: int, branch: str | None = "main") -> Path:
    """A Hub cache entry of a tiny RT-DETR (5 classes) saved with save_pretrained."""
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    with hub_offline_and_quiet():
        torch.manual_seed(seed)
        cls = getattr(transformers, FAMILIES["rt_detr"].hf_class)
        cls(TINY_CONFIGS["rt_detr"](num_labels=5, num_queries=6)).save_pretrained(folder)
    if branch:
        (folder.parent.parent / "refs").mkdir(exist_ok=True)
        (folder.parent.parent / "refs" / branch).write_text(commit)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _resolve.cache_clear()
    yield cache
    _resolve.cache_clear()


def test_a_hub_id_resolves_to_its_cached_snapshot_and_records_the_commit(hub_cache, tmp_path, monkeypatch):
    old = _snapshot(hub_cache, "acme/rtdetr-tiny", COMMIT_A, seed=0, branch=None)
    new = _snapshot(hub_cache, "acme/rtdetr-tiny", COMMIT_B, seed=1)  # main points at B
    snap = resolve_hub_id("acme/rtdetr-tiny")
    assert (snap.folder, snap.commit, snap.revision) == (new, COMMIT_B, "main")
    assert set(snap.files) == {"model.safetensors"} and len(snap.files["model.safetensors"]) == 64
    assert resolve_hub_id(f"acme/rtdetr-tiny@{COMMIT_A}").folder == old  # a revision pins other weights

    model = build_model("hf:acme/rtdetr-tiny")
    assert model.config.name == "hf:acme/rtdetr-tiny" and model.config.hub["commit"] == COMMIT_B
    assert model.config.to_dict()["hub"]["files"] == snap.files  # serialised into checkpoints
    pinned = build_model(f"hf:acme/rtdetr-tiny@{COMMIT_A}")
    w_new = dict(model.named_parameters())
    w_old = dict(pinned.named_parameters())
    assert any(not torch.equal(w_new[k], w_old[k]) for k in w_new)  # the other commit's weights

    # a teacher id is pinned to its commit (Ray actors, resumed runs load the same files) and a cache records it
    spec = resolve_teacher("hf:acme/rtdetr-tiny", None)
    assert spec.name == "hf:acme/rtdetr-tiny" and spec.model == f"hf:acme/rtdetr-tiny@{COMMIT_B}"
    assert teacher_family_record(spec)["hub"]["commit"] == COMMIT_B
    labels = LabelMap.contiguous([{"id": i, "name": f"class_{i}"} for i in range(5)])
    teacher, _, _ = load_teacher(spec, labels)
    assert teacher.config.hub["repo_id"] == "acme/rtdetr-tiny"

    # a local folder with the same spelling wins over the Hub
    monkeypatch.chdir(tmp_path)
    shutil.copytree(old, tmp_path / "acme" / "rtdetr-tiny")
    assert not is_hub_id("acme/rtdetr-tiny")
    assert build_model("hf:acme/rtdetr-tiny").config.hub is None


def test_offline_without_the_model_in_the_cache_is_one_line_naming_the_id(hub_cache):
    with pytest.raises(HubError) as e:
        build_model("hf:acme/absent")
    msg = str(e.value)
    assert "\n" not in msg and "hf:acme/absent" in msg and str(hub_cache) in msg and "hf download acme/absent" in msg
    with pytest.raises(HubError, match="revision v2"):
        resolve_hub_id("acme/absent@v2")


def test_the_run_record_names_the_hub_weights(hub_cache):
    from kd_detr.engine.run_record import run_record

    _snapshot(hub_cache, "acme/rtdetr-tiny", COMMIT_B, seed=1)
    record = run_record({"train": {"model": "hf:acme/rtdetr-tiny"}, "teacher": None})
    assert record["hub"]["hf:acme/rtdetr-tiny"]["commit"] == COMMIT_B
    assert "hub" not in run_record({"train": {"model": "hf_rt_detr_tiny"}})
    json.dumps(record)  # JSON-safe


def test_distill_from_a_hub_teacher_on_a_yolo_data_set(hub_cache, synth_data, tmp_path):
    """The user's path, offline: `kd-detr distill --teacher hf:org/name --student hf_rt_detr_tiny --data
    data.yaml`, the teacher's classes mapped onto the YOLO names by name, and the run's record naming the commit."""
    from click.testing import CliRunner

    from kd_detr.cli import main
    from tests.data.test_yolo import export_yolo

    yaml = export_yolo(synth_data, tmp_path / "yolo")
    names = json.loads((synth_data / "annotations" / "instances_train2017.json").read_text())["categories"]
    folder = hub_cache / "models--acme--shapes-rtdetr" / "snapshots" / COMMIT_A
    with hub_offline_and_quiet():
        torch.manual_seed(0)
        config = TINY_CONFIGS["rt_detr"](num_labels=len(names) + 1, num_queries=6)
        config.id2label = {0: "unrelated", **{i + 1: c["name"].upper() for i, c in enumerate(names)}}
        config.label2id = {v: k for k, v in config.id2label.items()}
        getattr(transformers, FAMILIES["rt_detr"].hf_class)(config).save_pretrained(folder)
    (folder.parent.parent / "refs").mkdir()
    (folder.parent.parent / "refs" / "main").write_text(COMMIT_A)
    res = CliRunner().invoke(main, [
        "distill", "--teacher", "hf:acme/shapes-rtdetr", "--student", "hf_rt_detr_tiny", "--recipe", "teach_detr",
        "--data", str(yaml), "--image-size", "64", "--num-workers", "0", "--output-dir", str(tmp_path / "run"),
        "--no-progress", "--set", "train.batch_size=4", "--set", "train.max_iters=1",
        "--set", "train.eval_every_epochs=0", "--set", "teach_detr.score_threshold=0.0"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["hub"]["hf:acme/shapes-rtdetr"]["commit"] == COMMIT_A
