"""kd_detr.zoo: the one lookup of named recipes and teacher cards (env folders first, then built-in)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_detr import zoo
from kd_detr.zoo import RECIPES, TEACHERS, NamedTomls, builtin_dir

ENV = "KD_DETR_TEST_ZOO"


def _write(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"# {folder.name}/{name}\n")
    return folder


@pytest.fixture
def empty_builtin(tmp_path, monkeypatch):
    """Point the built-in folder at an empty tmp folder so only the env folders count."""
    builtin = _write(tmp_path / "builtin")
    monkeypatch.setattr(zoo, "builtin_dir", lambda kind: builtin)
    return builtin


def test_builtin_dirs_hold_the_shipped_files():
    assert (builtin_dir("recipes") / "d3etr.toml").is_file()
    assert (builtin_dir("recipes") / "baseline.toml").is_file()
    assert (builtin_dir("teachers") / "quickstart_teacher.toml").is_file()
    assert (builtin_dir("teachers") / "quickstart_teacher.safetensors").is_file()


def test_builtin_dir_prefers_the_packaged_copy(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "kd_detr"
    packaged = _write(pkg / "_zoo" / "recipes", "d3etr.toml")
    monkeypatch.setattr(zoo, "_PACKAGE_DIR", pkg)
    assert builtin_dir("recipes") == packaged
    # no packaged teachers: falls back to the folder beside the package (a checkout's top level)
    assert builtin_dir("teachers") == tmp_path / "site" / "teachers"


@pytest.mark.parametrize("kind", ["configs", "recipe", "", "Teachers"])
def test_builtin_dir_rejects_other_kinds(kind):
    with pytest.raises(ValueError, match="recipes, teachers"):
        builtin_dir(kind)
    with pytest.raises(ValueError):
        NamedTomls(kind, ENV, "thing")


def test_instances():
    assert (RECIPES.kind, RECIPES.env_var, RECIPES.what) == ("recipes", "KD_DETR_RECIPES", "recipe")
    assert (TEACHERS.kind, TEACHERS.env_var, TEACHERS.what) == ("teachers", "KD_DETR_TEACHERS", "teacher card")


def test_builtin_names_and_find(monkeypatch):
    monkeypatch.delenv("KD_DETR_RECIPES", raising=False)
    monkeypatch.delenv("KD_DETR_TEACHERS", raising=False)
    assert {"d3etr", "baseline"} <= set(RECIPES.names())
    assert "quickstart_teacher" in TEACHERS.names()
    assert "README" not in RECIPES.names() and "README" not in TEACHERS.names()
    assert RECIPES.find("d3etr") == (builtin_dir("recipes") / "d3etr.toml").resolve()
    assert TEACHERS.require("quickstart_teacher") == (builtin_dir("teachers") / "quickstart_teacher.toml").resolve()
    assert RECIPES.dirs() == [builtin_dir("recipes")]


def test_dirs_env_first_expanded(tmp_path, monkeypatch, empty_builtin):
    monkeypatch.setenv("HOME", str(tmp_path))
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(ENV, os.pathsep.join([str(a), "", "~/b"]))
    assert NamedTomls("recipes", ENV, "recipe").dirs() == [a, b, empty_builtin]
    monkeypatch.delenv(ENV)
    assert NamedTomls("recipes", ENV, "recipe").dirs() == [empty_builtin]


def test_shadowing_order_and_names(tmp_path, monkeypatch, empty_builtin):
    first = _write(tmp_path / "first", "shared.toml", "only_first.toml")
    second = _write(tmp_path / "second", "shared.toml", "only_second.toml", "README.toml", "readme.toml",
                    "notes.md")
    _write(empty_builtin, "shared.toml", "builtin_one.toml", "ReadMe.toml")
    (second / "dir.toml").mkdir()  # a folder named *.toml is not a file
    monkeypatch.setenv(ENV, os.pathsep.join([str(first), str(second), str(tmp_path / "missing")]))
    named = NamedTomls("recipes", ENV, "recipe")

    assert named.names() == ["builtin_one", "only_first", "only_second", "shared"]
    assert named.find("shared") == (first / "shared.toml").resolve()
    assert named.find("only_second") == (second / "only_second.toml").resolve()
    assert named.find("builtin_one") == (empty_builtin / "builtin_one.toml").resolve()
    assert named.find("dir") is None
    assert named.find("nope") is None
    assert named.find("") is None
    assert named.find("../first/shared") is None  # a name, not a path

    monkeypatch.setenv(ENV, os.pathsep.join([str(second), str(first)]))
    assert named.find("shared") == (second / "shared.toml").resolve()


def test_find_resolves_symlinks(tmp_path, monkeypatch, empty_builtin):
    real = _write(tmp_path / "real", "x.toml")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv(ENV, str(tmp_path / "link"))
    assert NamedTomls("teachers", ENV, "teacher card").find("x") == (real / "x.toml").resolve()


def test_require_error_names_kind_available_and_env_var(tmp_path, monkeypatch, empty_builtin):
    folder = _write(tmp_path / "cards", "alpha.toml", "beta.toml", "README.toml")
    monkeypatch.setenv(ENV, str(folder))
    named = NamedTomls("teachers", ENV, "teacher card")
    assert named.require("alpha") == (folder / "alpha.toml").resolve()
    with pytest.raises(FileNotFoundError) as err:
        named.require("zzz")
    msg = str(err.value)
    assert msg.startswith("unknown teacher card 'zzz'; available: alpha, beta (searched ")
    assert str(folder) in msg and str(empty_builtin) in msg
    assert f"set ${ENV} to add a folder" in msg
    assert "did you mean" not in msg
    assert "README" not in msg.split("(searched")[0]


def test_require_did_you_mean(tmp_path, monkeypatch, empty_builtin):
    monkeypatch.setenv(ENV, str(_write(tmp_path / "r", "d3etr.toml", "baseline.toml")))
    with pytest.raises(FileNotFoundError, match=r"unknown recipe 'd3ert'.*did you mean 'd3etr'\?"):
        NamedTomls("recipes", ENV, "recipe").require("d3ert")


def test_require_with_nothing_available(monkeypatch, empty_builtin):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"unknown recipe 'x'; available: none \(searched "):
        NamedTomls("recipes", ENV, "recipe").require("x")


def test_zoo_imports_without_torch():
    code = "import sys, kd_detr.zoo; assert 'torch' not in sys.modules, 'kd_detr.zoo imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
