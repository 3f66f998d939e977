"""Every script in benchmarks/ imports against the package as it is: a renamed or moved name breaks here, not in
the next session's measurement. The scripts run their work under ``if __name__ == "__main__"`` only."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only: the work is behind __main__
