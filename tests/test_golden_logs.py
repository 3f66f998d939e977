"""Every recipe and teacher source logs the same loss terms as the recorded golden runs (to 1e-6).

The fixture was recorded on the code before the "one open engine" refactor (tests/golden_runs.py);
a change of any loss term, weight, lr or grad norm of baseline, d3etr (in-process, cache, Ray),
ms_detr, co_detr, d3etr_ms or d3etr_co fails here.
"""

from __future__ import annotations

import json
import math

import pytest

from golden_runs import GOLDEN, RUNS, run_all


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory, ray_session):
    return run_all(tmp_path_factory.mktemp("golden"), synth_data)


@pytest.mark.parametrize("name", list(RUNS))
def test_run_matches_golden_log(runs, name):
    golden = json.loads(GOLDEN.read_text())[name]
    got = runs[name]
    assert len(got) == len(golden)
    for g, r in zip(golden, got):
        assert sorted(r) == sorted(g), (name, g["iteration"], set(r) ^ set(g))
        for key, want in g.items():
            have = r[key]
            if isinstance(want, float):
                assert math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-6), (name, g["iteration"], key, have, want)
            else:
                assert have == want, (name, g["iteration"], key)
