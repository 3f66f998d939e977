"""D3ETR on real (tiny) models: MixMatcher properties, label-assignment sharing, compatibility checks,
distillation runs, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kd_detr.models import DetectorRequest
from kd_detr.criterion import SetCriterion
from kd_detr.methods.d3etr import D3ETRLoss, resolve_layer_map
from kd_detr.engine.recipe import load_recipe
from kd_detr.teacher import InProcessTeacher, TeacherOutputs
from kd_detr.models import build_model
from tests.support.runs import distill_args, read_log, save_teacher

TINY = dict(num_queries=6, dim_feedforward=64, d_model=32, nheads=4, dec_layers=3)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("cond_detr_r10_tiny", num_classes=5, **{**TINY, **kw}).eval()


def batch(seed=0, b=2, size=64, pad=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g)
    mask = torch.zeros(b, size, size, dtype=torch.bool)
    if b > 1 and pad:
        mask[1, :, size - 16:] = True  # padding on the second image
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ][:b]
    return images, mask, targets


def kd_loss(student, teacher, recipe="d3etr", **overrides):
    r = load_recipe(recipe, overrides)
    crit = SetCriterion(5, num_dec_layers=student.config.dec_layers)
    return D3ETRLoss(r.distill, student.config, teacher.config, crit)


def run(kd, student, teacher, images, mask, targets):
    t = InProcessTeacher(teacher, attn=kd.attn_mode)(images, mask)
    out = student(images, mask, request=DetectorRequest(query_groups=kd.extra_groups(t), attention=kd.needs_attn))
    return kd(student, out, targets, kd.criterion.num_boxes(targets, images.device), t), out, t


def test_identical_teacher_and_student_give_identity_matchings_and_zero_losses():
    student = tiny()
    teacher = copy.deepcopy(student)
    # unpadded images: the teacher sees each image alone (cropped to its own region), so only images that
    # fill the batch give the student (which sees the padded batch) exactly the teacher's inputs
    images, mask, targets = batch(pad=False)
    kd = kd_loss(student, teacher)
    losses, out, t = run(kd, student, teacher, images, mask, targets)
    kd_terms = {k: v for k, v in losses.items() if k.startswith("distill.")}
    # every group x term x layer is present
    assert len(kd_terms) == 2 * 5 * 3
    for k, v in kd_terms.items():
        assert abs(float(v)) < 1e-5, (k, float(v))
    from kd_detr.methods.d3etr.adaptive_match import adaptive_match
    s_logits = torch.stack([o["pred_logits"] for o in [*out["aux_outputs"], out]])
    s_boxes = torch.stack([o["pred_boxes"] for o in [*out["aux_outputs"], out]])
    t_idx, s_idx = adaptive_match(t.logits, t.boxes, s_logits, s_boxes)
    assert torch.equal(s_idx, t_idx) and torch.equal(t_idx[0, 0], torch.arange(6))


def test_permuting_student_queries_permutes_matching_and_keeps_losses():
    teacher, student = tiny(1), tiny(2)
    images, mask, targets = batch()
    kd = kd_loss(student, teacher, **{"distill.fixed": False})
    base, out, t = run(kd, student, teacher, images, mask, targets)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = copy.deepcopy(student)
    with torch.no_grad():
        permuted.query_embed.weight.copy_(student.query_embed.weight[perm])
    again, out2, _ = run(kd, permuted, teacher, images, mask, targets)
    # the permuted student's query k is the original's query perm[k]
    torch.testing.assert_close(out2["pred_boxes"], out["pred_boxes"][:, perm], atol=1e-5, rtol=1e-5)
    assert base.keys() == again.keys()
    for k in base:
        assert float(again[k]) == pytest.approx(float(base[k]), rel=1e-4, abs=1e-5), k


def test_auxiliary_group_does_not_change_primary_outputs():
    teacher, student = tiny(1), tiny(2)
    images, mask, _ = batch()
    kd = kd_loss(student, teacher)
    t = InProcessTeacher(teacher, attn="per_head")(images, mask)
    with torch.no_grad():
        plain = student(images, mask, request=DetectorRequest(attention=True))
        mixed = student(images, mask, request=DetectorRequest(query_groups=kd.extra_groups(t), attention=True))
    for key in ("pred_logits", "pred_boxes", "self_attn", "cross_attn"):
        torch.testing.assert_close(mixed[key], plain[key], atol=1e-6, rtol=1e-6)
    assert mixed["groups"][0]["pred_logits"].shape == (2, 6, 5)


def test_label_assignment_sharing_uses_the_teacher_assignment_at_the_last_layer():
    teacher, student = tiny(1), tiny(2)
    images, mask, targets = batch(b=1)
    kd = kd_loss(student, teacher)
    crit = kd.criterion
    t = InProcessTeacher(teacher, attn="mean")(images, mask)
    # Hand-made teacher last layer: query 4 sits exactly on GT 0 with its class, query 1 on GT 1.
    logits = torch.full_like(t.logits[-1], -5.0)
    boxes = torch.full_like(t.boxes[-1], 0.1) + torch.rand_like(t.boxes[-1]) * 0.05
    boxes[0, 4], logits[0, 4, 1] = targets[0]["boxes"][0], 5.0
    boxes[0, 1], logits[0, 1, 3] = targets[0]["boxes"][1], 5.0
    t.logits[-1], t.boxes[-1] = logits, boxes
    out = student(images, mask, request=DetectorRequest(query_groups=kd.extra_groups(t)))
    a_layers = [*out["groups"][0]["aux_outputs"], out["groups"][0]]
    a_logits = torch.stack([o["pred_logits"] for o in a_layers])
    a_boxes = torch.stack([o["pred_boxes"] for o in a_layers])
    got = kd.fixed_gt_losses(a_logits, a_boxes, t, targets, num_boxes=2.0)
    known = [(torch.tensor([1, 4]), torch.tensor([1, 0]))]  # teacher query i <-> auxiliary query i
    want = crit.layer_losses({"pred_logits": a_logits[-1], "pred_boxes": a_boxes[-1]}, targets, known, 2.0)
    for k, v in want.items():
        torch.testing.assert_close(got[f"fixed_gt.{k}.l2"], v)
    # other layers use the group's own Hungarian matching
    own = crit.matcher({"pred_logits": a_logits[0], "pred_boxes": a_boxes[0]}, targets)
    want0 = crit.layer_losses({"pred_logits": a_logits[0], "pred_boxes": a_boxes[0]}, targets, own, 2.0)
    torch.testing.assert_close(got["fixed_gt.loss_ce.l0"], want0["loss_ce"])
    # teacher_assignment = "off": the last layer uses its own matching, which differs here
    kd_off = kd_loss(student, teacher, **{"distill.fixed_group.teacher_assignment": "off"})
    off = kd_off.fixed_gt_losses(a_logits, a_boxes, t, targets, num_boxes=2.0)
    assert float(off["fixed_gt.loss_bbox.l2"]) != pytest.approx(float(got["fixed_gt.loss_bbox.l2"]))


def test_no_gradient_reaches_the_teacher_and_student_gets_gradients():
    teacher, student = tiny(1), tiny(2)
    student.train()
    images, mask, targets = batch()
    kd = kd_loss(student, teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses, _, _ = run(kd, student, teacher, images, mask, targets)
    sum(v * kd.weight_dict[k] for k, v in losses.items()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.query_embed.weight.grad is not None and student.query_embed.weight.grad.abs().sum() > 0
    assert student.transformer.decoder.layers[-1].sa_qcontent_proj.weight.grad.abs().sum() > 0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_incompatible_pairs_are_refused_with_the_option_to_use():
    student = tiny()
    with pytest.raises(ValueError, match="label map"):
        kd_loss(student, build_model("cond_detr_r10_tiny", num_classes=7, **TINY))
    deeper = tiny(dec_layers=4)
    with pytest.raises(ValueError, match="layer_map"):
        kd_loss(student, deeper)
    assert resolve_layer_map("uniform", 3, 6) == [1, 3, 5]
    assert resolve_layer_map("uniform", 2, 3) == [1, 2]
    with pytest.raises(ValueError, match="do not exist"):
        resolve_layer_map([0, 1, 9], 3, 4)
    wider = tiny(d_model=64)
    with pytest.raises(ValueError, match="query_projection"):
        kd_loss(student, wider)
    with pytest.raises(ValueError, match="per_head"):
        kd_loss(student, tiny(nheads=2), **{"distill.self_attn.per_head": True})
    with pytest.raises(ValueError, match="DC5|dilat"):
        kd_loss(student, tiny(dilation=True))


def test_declared_projection_and_layer_map_work():
    """A wider, deeper, query-richer teacher: linear query projection + uniform layer map + rectangular AM."""
    student = tiny().train()
    teacher = tiny(3, d_model=64, dec_layers=4, num_queries=9)
    kd = kd_loss(student, teacher, **{"distill.fixed_group.query_projection": "linear",
                                      "distill.layer_map": "uniform"})
    images, mask, targets = batch()
    losses, out, _ = run(kd, student, teacher, images, mask, targets)
    assert out["groups"][0]["pred_logits"].shape == (2, 9, 5)  # the auxiliary group has the teacher's 9 queries
    total = sum(v * kd.weight_dict[k] for k, v in losses.items())
    assert torch.isfinite(total)
    total.backward()
    assert kd.projection.weight.grad is not None and kd.projection.weight.grad.abs().sum() > 0


def test_teacher_outputs_mean_mode_is_head_average():
    teacher = tiny(1)
    images, mask, _ = batch()
    full = InProcessTeacher(teacher, attn="per_head")(images, mask)
    mean = InProcessTeacher(teacher, attn="mean")(images, mask)
    assert isinstance(full, TeacherOutputs) and full.self_attn.shape == (3, 2, 4, 6, 6)
    torch.testing.assert_close(mean.cross_attn, full.cross_attn.mean(2, keepdim=True))


# --------------------------------------------------------------------------- end to end (CLI)
def test_distillation_loss_falls_and_export_loads_strictly(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main
    from kd_detr.models import load_model, load_official_state_dict, read_official_checkpoint

    teacher = save_teacher(tmp_path, synth_data)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, distill_args(synth_data, out, teacher, "--set", "train.max_iters=40",
                                                "--set", "train.lr=1e-3", "--set", "train.lr_backbone=1e-3"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    log = [r for r in read_log(out) if "loss" in r]
    assert len(log) == 40
    # every term is logged per group and layer, scaled and unscaled, with sums
    for key in ("distill.adaptive.pred_cls.l0", "distill.fixed.cross_attn.l1_unscaled", "fixed_gt.loss_ce.l1",
                "distill.adaptive.self_attn", "distill.total", "student.total", "loss_ce", "loss_ce_0"):
        assert key in log[0], key
    first = sum(r["distill.total"] for r in log[:5]) / 5
    last = sum(r["distill.total"] for r in log[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    # run record: merged recipe, versions, git SHA
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["recipe"]["distill"]["adaptive"] is True
    assert record["config"]["recipe"]["train"]["max_iters"] == 40
    assert "git_sha" in record and "torch" in record["versions"]
    assert (out / "recipe.toml").exists()

    res = CliRunner().invoke(main, ["export", "--run", str(out), "--out", str(tmp_path / "student")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    trained, _ = load_model(out / "model_final.safetensors")
    plain = build_model("cond_detr_r10_tiny", num_classes=trained.config.num_classes, num_queries=10,
                        dim_feedforward=128)
    load_official_state_dict(plain, read_official_checkpoint(tmp_path / "student.pth"))  # strict
    exported, _ = load_model(tmp_path / "student.safetensors")
    images, mask, _ = batch(b=2)
    t = InProcessTeacher(load_model(teacher)[0], attn="none")(images, mask)
    with torch.no_grad():
        mixed = trained.eval()(images, mask, request=DetectorRequest(query_groups=[{"query_pos": t.query_embed}]))
        for m in (plain.eval(), exported.eval()):
            o = m(images, mask)
            torch.testing.assert_close(o["pred_logits"], mixed["pred_logits"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(o["pred_boxes"], mixed["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_distill_resume_and_baseline_and_refusals(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main

    teacher = save_teacher(tmp_path, synth_data)
    runner = CliRunner()
    # resume continues exactly (3 + 3 == 6)
    full, part = tmp_path / "full", tmp_path / "part"
    for out, iters, extra in ((full, 6, []), (part, 3, []), (part, 6, ["--resume", "auto"])):
        res = runner.invoke(main, distill_args(synth_data, out, teacher, "--set", f"train.max_iters={iters}", *extra))
        assert res.exit_code == 0, res.output + repr(res.exception)
    a, b = [r for r in read_log(full) if "loss" in r], [r for r in read_log(part) if "loss" in r]
    assert [r["iteration"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["iteration"]
    # resuming with another recipe is refused
    res = runner.invoke(main, distill_args(synth_data, part, teacher, "--set", "train.max_iters=8",
                                           "--set", "distill.fixed=false", "--resume", "auto"))
    assert res.exit_code != 0 and "differs from the recipe" in res.output.replace("\n", " ")
    # the teacher AP check refuses a teacher far below min_ap
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "weak", teacher, "--set", "train.max_iters=1",
                                           "--set", "teacher_check.eval_images=4", "--set", "teacher_check.min_ap=50"))
    assert res.exit_code != 0 and "below teacher_check.min_ap" in res.output
    # baseline: no teacher needed, no distillation terms
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "base", teacher, "--recipe", "baseline",
                                           "--set", "train.max_iters=2"))
    assert res.exit_code == 0, res.output
    assert not any(k.startswith("distill") for k in read_log(tmp_path / "base")[0])
    # a teacher trained at another image size is refused, naming the option
    other = tmp_path / "t128"
    other.mkdir()
    t128 = save_teacher(other, synth_data, image_size=128)
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "bad", t128, "--set", "train.max_iters=1"))
    assert res.exit_code != 0 and "teacher_check.image_size" in res.output
    # a model name without a checkpoint, and an unknown teacher
    res = runner.invoke(main, ["distill", "--teacher", "cond_detr_r18_tiny", "--student", "cond_detr_r10_tiny",
                               "--data", str(synth_data)])
    assert res.exit_code != 0 and "--teacher-checkpoint" in res.output
    res = runner.invoke(main, ["distill", "--teacher", "nope", "--student", "cond_detr_r10_tiny",
                               "--data", str(synth_data)])
    assert res.exit_code != 0 and "neither a teacher card" in res.output
    # a shipped card whose official checkpoint is absent (and cannot be downloaded: the tests are offline) names
    # the download url and where the file goes, in the user cache, not the package
    res = runner.invoke(main, ["distill", "--teacher", "cond_detr_r101", "--student", "cond_detr_r50",
                               "--data", str(synth_data)])
    assert res.exit_code != 0 and "releases/download/v1.0/ConditionalDETR_r101_epoch50.pth" in res.output
    assert "kd_detr/teachers/ConditionalDETR_r101_epoch50.pth" in res.output
    # a bad recipe key names the key
    res = runner.invoke(main, distill_args(synth_data, tmp_path / "x", teacher, "--set", "distill.pred.temprature=2"))
    assert res.exit_code != 0 and "distill.pred.temprature" in res.output


def test_distill_from_a_teacher_card_with_an_official_checkpoint(synth_data, tmp_path):
    """A card naming an official-format .pth (no metadata): label map and image size come from the card."""
    from click.testing import CliRunner

    from kd_detr.cli import main
    from kd_detr.models import load_model
    from kd_detr.models.checkpoint import save_official_checkpoint

    teacher, _ = load_model(save_teacher(tmp_path, synth_data))
    (tmp_path / "ckpt").mkdir()
    save_official_checkpoint(teacher, tmp_path / "ckpt" / "teacher.pth")
    card = tmp_path / "tiny_teacher.toml"
    card.write_text('name = "tiny_teacher"\nmodel = "cond_detr_r10_tiny"\ncheckpoint = "ckpt/teacher.pth"\n'
                    f'format = "official"\nnum_classes = {teacher.config.num_classes}\nlabel_map = "contiguous"\n'
                    'image_size = 64\nknown_ap = 0.0\n[model_overrides]\nnum_queries = 10\ndim_feedforward = 128\n')
    args = distill_args(synth_data, tmp_path / "run", "unused", "--set", "train.max_iters=2")
    args[1:5] = ["--teacher", str(card)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["teacher"]["name"] == "tiny_teacher"
    # the same card with the wrong image size is refused
    card.write_text(card.read_text().replace("image_size = 64", "image_size = 0"))
    res = CliRunner().invoke(main, args[:-2] + ["--output-dir", str(tmp_path / "run2")])
    assert res.exit_code != 0 and "official sizes" in res.output
