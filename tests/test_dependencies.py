"""The tested dependency ranges: pyproject.toml pins exactly them, and an installed version outside them is
named in one warning line by every command."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kd_detr import dependencies
from kd_detr.dependencies import TESTED, parse_version, untested

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_parse_version():
    assert parse_version("5.25.0") == (5, 25, 0)
    assert parse_version("5.26.0.dev0") == (5, 26, 0)
    assert parse_version("2.60.0rc1") == (2, 60, 0)
    with pytest.raises(ValueError, match="not a version"):
        parse_version("dev")


@pytest.mark.parametrize("name", sorted(TESTED))
def test_range_bounds_are_half_open(name):
    low, high = TESTED[name]
    assert untested(name, low) is None
    assert untested(name, high) is not None and f">={low},<{high}" in untested(name, high)
    below = ".".join(map(str, parse_version(low)[:-1] + (parse_version(low)[-1] - 1,))) if parse_version(low)[-1] \
        else None
    if below:
        assert untested(name, below) is not None


def _pyproject_specs() -> list[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(data["dependencies"])
    for extra in data["optional-dependencies"].values():
        specs += extra
    return specs


@pytest.mark.parametrize("name", sorted(TESTED))
def test_pyproject_pins_the_tested_range(name):
    """Every requirement on the package in pyproject.toml carries exactly the tested bounds."""
    low, high = TESTED[name]
    found = [s for s in _pyproject_specs() if re.match(rf"{name}(\[[a-z,]+\])?[<>=!~ ]", s)]
    assert found, f"{name} is not required in pyproject.toml"
    for spec in found:
        bounds = set(re.sub(rf"^{name}(\[[a-z,]+\])?", "", spec).replace(" ", "").split(","))
        assert bounds == {f">={low}", f"<{high}"}, spec


def test_cli_warns_once_per_untested_version(monkeypatch, caplog):
    from kd_detr.cli import main

    versions = {"transformers": "5.99.0", "safetensors": "0.8.0", "ray": "2.10.0"}
    monkeypatch.setattr(dependencies, "installed_version", lambda name: versions[name])
    with caplog.at_level(logging.WARNING, logger="kd_detr"):
        result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = [r.getMessage() for r in caplog.records if "was tested with" in r.getMessage()]
    assert lines == [untested("transformers", "5.99.0"), untested("ray", "2.10.0")]
    assert "transformers >=5.17.0,<5.26" in lines[0]


def test_installed_versions_are_inside_the_tested_ranges():
    """The environment this suite runs in is one the ranges claim: a release outside them fails here first."""
    assert dependencies.untested_warnings() == []

