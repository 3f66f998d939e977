"""Recipes and teacher cards: loading, extends, --set overrides, validation errors, TOML round trip."""

from __future__ import annotations

import dataclasses

import sys

import pytest

from kd_detr.engine.recipe import (
    Recipe,
    RecipeError,
    find_recipe,
    list_recipes,
    load_recipe,
    recipe_to_toml,
)
from kd_detr.teacher.card import find_card, list_cards, load_card

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

SHIPPED = ["baseline", "d3etr", "d3etr_adaptive_only", "d3etr_fixed_only", "d3etr_pred_only", "logits_kd"]
CARDS = {"cond_detr_r50": 41.0, "cond_detr_r101": 42.8, "cond_detr_r50_dc5": 43.7, "cond_detr_r101_dc5": 45.0}


def write(path, text):
    path.write_text(text)
    return path


def error(match, fn, *args, **kwargs):
    """Run ``fn`` expecting a RecipeError; return its message."""
    with pytest.raises(RecipeError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- shipped recipes
def test_shipped_recipes_load():
    listed = list_recipes()
    assert list(listed) == sorted(listed) and "README" not in listed
    for name in SHIPPED:
        assert listed[name], f"{name} has no description"
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description == listed[name]
        assert recipe.source == str(find_recipe(name)) and recipe.chain[0] == recipe.source
        assert recipe.train == {"epochs": 12, "lr_drop": 11}  # every recipe shares the baseline schedule


def test_shipped_recipe_semantics():
    assert load_recipe("baseline").distill.enabled is False

    d = load_recipe("d3etr").distill
    assert d.enabled and d.adaptive and d.fixed and d.layers == "all" and d.layer_map == "identity"
    assert d.pred.enabled and d.self_attn.enabled and d.cross_attn.enabled and d.fixed_group.gt_loss
    assert min(d.pred.class_weight, d.pred.bbox_weight, d.pred.giou_weight) > 0
    assert len(load_recipe("d3etr").chain) == 2  # d3etr, baseline

    a = load_recipe("d3etr_adaptive_only").distill
    assert a.fixed is False and a.adaptive
    f = load_recipe("d3etr_fixed_only").distill
    assert f.adaptive is False and f.fixed
    p = load_recipe("d3etr_pred_only").distill
    assert p.pred.enabled and not p.self_attn.enabled and not p.cross_attn.enabled and p.adaptive and p.fixed

    k = load_recipe("logits_kd")
    assert "logit" in k.description
    k = k.distill
    assert k.enabled and k.adaptive and not k.fixed and k.layers == "last"
    assert k.pred.bbox_weight == 0 and k.pred.giou_weight == 0 and k.pred.class_weight > 0
    assert not k.self_attn.enabled and not k.cross_attn.enabled


def test_defaults_match_docs():
    r = Recipe.from_dict({"name": "x"})
    assert r.distill.enabled and r.distill.adaptive_weight == 1.0 and r.distill.fixed_weight == 1.0
    assert (r.distill.match.class_weight, r.distill.match.bbox_weight, r.distill.match.giou_weight) == (2.0, 5.0, 2.0)
    assert r.distill.pred.temperature == 1.0 and not r.distill.pred.confidence_weighting
    assert (r.distill.self_attn.loss, r.distill.self_attn.per_head) == ("kl", False)
    fg = r.distill.fixed_group
    assert (fg.teacher_assignment, fg.reference_points, fg.query_projection) == ("last", "student", "none")
    tc = r.teacher_check
    assert (tc.image_size, tc.eval_images, tc.min_ap, tc.max_ap_drop) == (True, 0, 0.0, 10.0)
    assert r.train == {} and r.train_config_kwargs() == {}


# --------------------------------------------------------------------------- extends
def test_extends_merges_child_over_parent(tmp_path):
    write(tmp_path / "parent.toml", """
name = "parent"
description = "the parent"
[train]
epochs = 3
lr = 1e-3
[distill]
layers = [0, 1]
[distill.pred]
temperature = 3.0
bbox_weight = 1.0
""")
    child = write(tmp_path / "child.toml", """
extends = "parent"
[train]
epochs = 5
[distill]
layers = [2]
[distill.pred]
temperature = 2
""")
    r = load_recipe(child)
    assert r.train == {"epochs": 5, "lr": 1e-3}
    assert r.distill.layers == [2]  # lists are replaced, not merged
    assert r.distill.pred.temperature == 2.0 and isinstance(r.distill.pred.temperature, float)
    assert r.distill.pred.bbox_weight == 1.0  # inherited
    assert r.name == "child" and r.description == ""  # name/description are not inherited
    assert r.chain == [str(child), str(tmp_path / "parent.toml")]


def test_extends_shipped_recipe_by_name_and_by_path(tmp_path):
    by_name = write(tmp_path / "mine.toml", 'extends = "d3etr"\n[distill.pred]\ntemperature = 4.0\n')
    r = load_recipe(by_name)
    assert r.distill.pred.temperature == 4.0 and r.distill.enabled and r.train["epochs"] == 12
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "base.toml", "[train]\nepochs = 7\n")
    by_path = write(tmp_path / "rel.toml", 'extends = "sub/base.toml"\n')
    assert load_recipe(str(by_path)).train == {"epochs": 7}


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b"\n')
    write(tmp_path / "b.toml", 'extends = "c"\n')
    write(tmp_path / "c.toml", 'extends = "a"\n')
    msg = error("cycle", load_recipe, tmp_path / "a.toml")
    assert "a.toml -> b.toml -> c.toml -> a.toml" in msg
    write(tmp_path / "self.toml", 'extends = "self"\n')
    error("cycle", load_recipe, tmp_path / "self.toml")


def test_extends_unknown_parent(tmp_path):
    path = write(tmp_path / "orphan.toml", 'extends = "no_such_recipe"\n')
    msg = error("extends", load_recipe, path)
    assert str(path) in msg and "no_such_recipe" in msg and "d3etr" in msg


# --------------------------------------------------------------------------- overrides
def test_overrides():
    r = load_recipe("d3etr", ["distill.pred.temperature=2", "distill.layers=[0,2]", "train.lr=2e-4",
                              "train.device=cuda:0", "distill.self_attn.loss = mse"])
    assert r.distill.pred.temperature == 2.0 and isinstance(r.distill.pred.temperature, float)
    assert r.distill.layers == [0, 2]
    assert r.train["lr"] == 2e-4 and r.train["epochs"] == 12
    assert r.train["device"] == "cuda:0"  # not TOML: taken as a string
    assert r.distill.self_attn.loss == "mse"
    r = load_recipe("d3etr", {"distill.layers": "last", "train.max_iters": 10, "distill.enabled": False})
    assert r.distill.layers == "last" and r.train["max_iters"] == 10 and not r.distill.enabled
    assert load_recipe("baseline", "distill.enabled=true").distill.enabled  # a single string works too


def test_override_errors_name_set():
    msg = error("unknown key", load_recipe, "d3etr", ["distill.pred.temprature=2"])
    assert "'distill.pred.temprature'" in msg and "--set" in msg and "'distill.pred.temperature'" in msg
    msg = error("must be", load_recipe, "d3etr", ["distill.layers=some"])
    assert "'distill.layers'" in msg and "--set" in msg and '"all"' in msg
    error("expected dotted.key=value", load_recipe, "d3etr", ["distill.layers"])
    error("extends", load_recipe, "d3etr", ["extends=baseline"])
    error("not a table", load_recipe, "d3etr", ["distill.enabled.x=1"])


# --------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize("body, key, words", [
    ("[distill.pred]\ntemprature = 2.0\n", "distill.pred.temprature", "did you mean 'distill.pred.temperature'"),
    ("descripton = 'x'\n", "descripton", "did you mean 'description'"),
    ("epochs = 3\n", "epochs", "did you mean 'train.epochs'"),
    ("[distill.bogus]\nx = 1\n", "distill.bogus", "unknown key"),
    ("[distill]\nenabled = 1\n", "distill.enabled", "must be true or false"),
    ("[distill]\nlayers = 'first'\n", "distill.layers", "must be"),
    ("[distill]\nlayers = [0, -1]\n", "distill.layers", ">= 0"),
    ("[distill]\nlayers = [1, 1]\n", "distill.layers", "repeat"),
    ("[distill]\nlayers = []\n", "distill.layers", "empty"),
    ("[distill]\nlayer_map = [0, 1.5]\n", "distill.layer_map", "must be"),
    ("[distill]\nadaptive_weight = -1.0\n", "distill.adaptive_weight", ">= 0"),
    ("[distill]\nadaptive = false\nfixed = false\n", "distill.adaptive", "nothing would be distilled"),
    ("[distill.pred]\ntemperature = 0\n", "distill.pred.temperature", "> 0"),
    ("[distill.pred]\nbbox_weight = 'high'\n", "distill.pred.bbox_weight", "must be a number"),
    ("[distill.cross_attn]\nloss = 'l2'\n", "distill.cross_attn.loss", '"kl" or "mse"'),
    ("[distill.fixed_group]\nteacher_assignment = 'first'\n", "distill.fixed_group.teacher_assignment", '"off"'),
    ("[distill.fixed_group]\nreference_points = 'techer'\n", "distill.fixed_group.reference_points",
     "did you mean 'teacher'"),
    ("[distill.fixed_group]\nquery_projection = 'mlp'\n", "distill.fixed_group.query_projection", '"linear"'),
    ("[teacher_check]\neval_images = -5\n", "teacher_check.eval_images", ">= 0"),
    ("[teacher_check]\neval_images = 2.5\n", "teacher_check.eval_images", "must be an integer"),
    ("distill = 3\n", "distill", "must be a table"),
    ("[train]\nmodel = 'cond_detr_r50'\n", "train.model", "given on the command line"),
    ("[train]\noutput_dir = 'runs/x'\n", "train.output_dir", "given on the command line"),
    ("[train]\nepoch = 3\n", "train.epoch", "did you mean 'train.epochs'"),
    ("[train]\nepochs = 2.5\n", "train.epochs", "must be an integer"),
    ("[train]\namp = 1\n", "train.amp", "must be true or false"),
    ("[train]\nmax_iters = 'none'\n", "train.max_iters", "leave the key out"),
    ("[train]\nlabel_map = 'raw'\n", "train.label_map", '"coco91"'),
])
def test_validation_errors_name_key_and_file(tmp_path, body, key, words):
    path = write(tmp_path / "bad.toml", body)
    msg = error(None, load_recipe, path)
    assert f"'{key}'" in msg and str(path) in msg and words in msg, msg


def test_error_names_the_file_that_set_the_key(tmp_path):
    parent = write(tmp_path / "parent.toml", "[distill.self_attn]\nweight = -2.0\n")
    child = write(tmp_path / "child.toml", 'extends = "parent"\n[distill]\nfixed = false\n')
    msg = error("distill.self_attn.weight", load_recipe, child)
    assert str(parent) in msg and str(child) not in msg


def test_train_types_are_converted(tmp_path):
    path = write(tmp_path / "t.toml", "[train]\nlr = 1\nepochs = 3.0\nmax_iters = 100\naugment = false\n")
    train = load_recipe(path).train
    assert train == {"lr": 1.0, "epochs": 3, "max_iters": 100, "augment": False}
    assert isinstance(train["lr"], float) and isinstance(train["epochs"], int)


def test_unknown_recipe_lists_available():
    msg = error("unknown recipe 'd3ert'", load_recipe, "d3ert")
    for name in SHIPPED:
        assert name in msg
    error("does not exist", find_recipe, "missing/file.toml")


def test_malformed_toml_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path / "broken.toml", "[distill\nenabled = true\n")
    msg = error("invalid TOML", load_recipe, path)
    assert str(path) in msg
    # list_recipes still lists the other recipes and flags the broken one
    monkeypatch.setenv("KD_DETR_RECIPES", str(tmp_path))
    listed = list_recipes()
    assert "unreadable" in listed["broken"] and "d3etr" in listed


def test_env_folder_is_searched_first(tmp_path, monkeypatch):
    write(tmp_path / "d3etr.toml", 'description = "shadow"\n[distill]\nfixed = false\n')
    write(tmp_path / "extra.toml", 'description = "an extra recipe"\nextends = "baseline"\n')
    monkeypatch.setenv("KD_DETR_RECIPES", str(tmp_path))
    assert list_recipes()["d3etr"] == "shadow" and list_recipes()["extra"] == "an extra recipe"
    assert load_recipe("d3etr").distill.fixed is False
    assert load_recipe("extra").distill.enabled is False


# --------------------------------------------------------------------------- TOML writer
@pytest.mark.parametrize("name", SHIPPED)
def test_to_toml_round_trips(name, tmp_path):
    r = load_recipe(name, ["distill.layers=[0,2]", "train.lr=2e-5"])
    d = r.to_dict()
    text = recipe_to_toml(d)
    assert tomllib.loads(text) == d
    # the dump is itself a valid recipe that loads to the same thing
    again = load_recipe(write(tmp_path / "dump.toml", text))
    assert again.to_dict() == d and again.name == name
    assert Recipe.from_dict(d).to_dict() == d


def test_to_toml_writer_edge_cases():
    d = {"a": 1, "s": 'quote " back \\ tab \t nl \n ctl \x01 é', "f": 1e-05, "big": 1e300, "neg": -0.5,
         "t": True, "l": [1, 2.5, "x", [True]], "weird key": "v", "e": {},
         "outer": {"x": 1, "inner": {"deep": {"y": [0]}}, "inline": [{"k": 1}]}}
    assert tomllib.loads(recipe_to_toml(d)) == d
    with pytest.raises(TypeError):
        recipe_to_toml({"x": None})


# --------------------------------------------------------------------------- teacher cards
def test_shipped_cards_load():
    listed = list_cards()
    assert set(CARDS) <= set(listed)
    for name, ap in CARDS.items():
        card = load_card(name)
        assert card.name == name and card.model == name and card.known_ap == ap
        assert card.format == "official" and card.num_classes == 91 and card.label_map == "coco91"
        assert card.image_size == 0 and card.image_size_preset is None
        assert card.url.startswith("https://") and card.url.endswith(card.checkpoint.split("/")[-1])
        assert card.checkpoint_path() == find_card(name).parent / card.checkpoint
        assert name in listed[name]


CARD = """
model = "cond_detr_r10_tiny"
checkpoint = "weights/teacher.safetensors"
url = "https://example.org/teacher.safetensors"
num_classes = 3
label_map = "contiguous"
image_size = 128
known_ap = 30
[model_overrides]
num_queries = 8
"""


def test_custom_card_and_checkpoint(tmp_path, monkeypatch):
    from kd_detr.download import DownloadError

    monkeypatch.setenv("KD_DETR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KD_DETR_OFFLINE", "1")
    path = write(tmp_path / "tiny.toml", CARD)
    card = load_card(path)
    assert card.name == "tiny" and card.image_size_preset == 128 and card.known_ap == 30.0
    assert card.model_overrides == {"num_queries": 8} and card.source == path
    expected = tmp_path / "weights" / "teacher.safetensors"
    assert card.checkpoint_path() == expected
    # missing beside the card: downloaded from its url into KD_DETR_HOME, here refused offline in one line
    with pytest.raises(DownloadError) as info:
        card.require_checkpoint()
    msg = str(info.value)
    assert card.url in msg and str(tmp_path / "home" / "teachers") in msg and "\n" not in msg
    assert card.describe().endswith("checkpoint downloads on first use")
    no_url = dataclasses.replace(card, url="")
    with pytest.raises(FileNotFoundError) as info:
        no_url.require_checkpoint()
    msg = str(info.value)
    assert str(path) in msg and str(expected) in msg and "--teacher-checkpoint" in msg
    expected.parent.mkdir()
    expected.write_bytes(b"")
    assert card.require_checkpoint() == expected


def test_card_lookup_by_name(tmp_path, monkeypatch):
    write(tmp_path / "tiny.toml", CARD)
    assert find_card("tiny") is None
    monkeypatch.setenv("KD_DETR_TEACHERS", str(tmp_path))
    assert find_card("tiny") == (tmp_path / "tiny.toml").resolve()
    assert load_card("tiny").model == "cond_detr_r10_tiny" and "tiny" in list_cards()
    with pytest.raises(ValueError, match="unknown teacher card 'nope'.*cond_detr_r101"):
        load_card("nope")


@pytest.mark.parametrize("change, words", [
    (('"cond_detr_r10_tiny"', '"cond_detr_r7"'), "'model'"),
    (('label_map = "contiguous"', 'label_map = "contiguous"\nformat = "onnx"'), "'format'"),
    (('label_map = "contiguous"', 'label_map = "coco80"'), "'label_map'"),
    (('num_classes = 3', 'num_classes = 3.5'), "'num_classes'"),
    (('known_ap = 30', 'known_ap = 300'), "'known_ap'"),
    (('known_ap = 30', 'known_ap = 30\ncheckpont = "x"'), "'checkpont'; did you mean 'checkpoint'"),
    (('num_queries = 8', 'num_querys = 8'), "'model_overrides'"),
    (('num_classes = 3\n', ''), "missing key(s) num_classes"),
    (('label_map = "contiguous"', 'label_map = "coco91"'), "num_classes >= 91"),
])
def test_card_errors_name_key_and_file(tmp_path, change, words):
    path = write(tmp_path / "bad.toml", CARD.replace(*change))
    with pytest.raises(ValueError) as info:
        load_card(path)
    assert str(path) in str(info.value) and words in str(info.value), str(info.value)


def test_card_malformed_toml(tmp_path):
    path = write(tmp_path / "broken.toml", "model = \n")
    with pytest.raises(ValueError, match="invalid TOML") as info:
        load_card(path)
    assert str(path) in str(info.value)
