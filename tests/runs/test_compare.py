"""kd-detr compare: table, CSV and plots from the runs' own files; resume; failed recipes reported."""

from __future__ import annotations

import csv
import json

from click.testing import CliRunner

from kd_detr.cli import main
from tests.support.runs import save_teacher


def _args(synth_data, teacher, out, recipes, *extra):
    return ["compare", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher),
            "--student", "cond_detr_r10_tiny", "--student-opt", "num_queries=10", "--student-opt", "dim_feedforward=128",
            "--recipes", recipes, "--budget", "4", "--eval-points", "2", "--data", str(synth_data),
            "--image-size", "64", "--num-workers", "0", "--out", str(out), "--no-progress",
            "--set", "train.batch_size=4", "--set", "train.log_every=1", *extra]


def test_compare_table_csv_plots_resume_and_failure(synth_data, tmp_path):
    teacher = save_teacher(tmp_path, synth_data)
    broken = tmp_path / "broken.toml"  # valid TOML and schema, fails when the run starts (no such teacher layer)
    broken.write_text('name = "broken"\nextends = "d3etr"\n[distill]\nlayer_map = [0, 7]\n')
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, _args(synth_data, teacher, out, f"baseline,d3etr,{broken}", "--no-ray"))
    # the table is written, and the exit status says the comparison is incomplete
    assert res.exit_code == 1 and "| baseline |" in res.output, res.output + repr(res.exception)
    assert "1 of 3 runs failed (broken seed 0" in res.output and "result.json" in res.output

    rows = {r["recipe"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"baseline", "d3etr", "broken"}
    for name in ("baseline", "d3etr"):
        metrics = json.loads((out / "runs" / name / "seed0" / "metrics.json").read_text())
        assert float(rows[name]["AP"]) == 100 * metrics["AP"]  # taken from the run, not recomputed
        if metrics["APl"] >= 0:
            assert float(rows[name]["APl"]) == 100 * metrics["APl"]
        else:  # COCOeval's -1: no large object in the validation set; no value, never -100
            assert rows[name]["APl"] == "" and "-100" not in (out / "comparison.md").read_text()
        log = [json.loads(x) for x in (out / "runs" / name / "seed0" / "log.jsonl").read_text().splitlines()]
        assert sum(1 for x in log if "eval/AP" in x) == 2  # evaluated at regular points
        assert (out / "runs" / name / "seed0" / "model_final.safetensors").exists()
        assert (out / "runs" / name / "seed0" / "recipe.toml").exists()
    assert float(rows["d3etr"]["gain_AP"]) == float(rows["d3etr"]["AP"]) - float(rows["baseline"]["AP"])
    assert rows["broken"]["ok"] == "0" and "layer_map" in rows["broken"]["failed"]
    assert rows["d3etr"]["teacher_AP"] != ""
    md = (out / "comparison.md").read_text()
    assert "| baseline |" in md and "failed" in md
    for png in ("ap_curve.png", "losses.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the gallery: 4 validation images x (ground truth, teacher, baseline, d3etr, broken: n/a), and a title band
    from PIL import Image

    assert str(out / "gallery.png") in res.output
    with Image.open(out / "gallery.png") as gallery:
        assert gallery.size == (1300, 1080)
    # the loss plot has a panel per method objective some run logged (here D3ETR's only)
    from kd_detr.runs.compare import _method_totals

    cfg = type("Cfg", (), {"recipes": ["baseline", "d3etr", str(broken)], "seeds": [0], "out": str(out)})()
    assert _method_totals(cfg) == ["distill.total"]

    # rerun: finished runs are not redone (their logs do not grow), the failed one is tried again
    before = (out / "runs" / "d3etr" / "seed0" / "log.jsonl").read_text()
    res = CliRunner().invoke(main, _args(synth_data, teacher, out, f"baseline,d3etr,{broken}", "--no-ray"))
    assert res.exit_code == 1, res.output
    assert (out / "runs" / "d3etr" / "seed0" / "log.jsonl").read_text() == before
    assert "failed" in (out / "comparison.md").read_text()


def test_compare_seeds_give_mean_std_and_paired_gains(synth_data, tmp_path):
    teacher = save_teacher(tmp_path, synth_data)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, _args(synth_data, teacher, out, "baseline,d3etr", "--no-ray", "--seeds", "0,1"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    ap = {(r, s): 100 * json.loads((out / "runs" / r / f"seed{s}" / "metrics.json").read_text())["AP"]
          for r in ("baseline", "d3etr") for s in (0, 1)}
    rows = {r["recipe"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    gains = [ap[("d3etr", s)] - ap[("baseline", s)] for s in (0, 1)]  # paired: same seed
    for s in (0, 1):
        assert float(rows["d3etr"][f"gain_AP_seed{s}"]) == gains[s]
    assert float(rows["d3etr"]["gain_AP"]) == (gains[0] + gains[1]) / 2
    assert float(rows["d3etr"]["gain_AP_std"]) == abs(gains[0] - gains[1]) / 2 ** 0.5  # sample std of two
    assert float(rows["d3etr"]["AP"]) == (ap[("d3etr", 0)] + ap[("d3etr", 1)]) / 2
    assert "paired AP gain vs baseline" in res.output and "± " in res.output
    assert (out / "ap_curve.png").read_bytes()[:4] == b"\x89PNG"
