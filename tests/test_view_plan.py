"""View plans: recorded views replay exactly; fixed batches; epochs visit views and batches as documented."""

from __future__ import annotations

import json

import torch

from kd_detr.data import CocoDetection, View, make_policy
from kd_detr.data.view_plan import PlanBatches, PlanBatchSampler, ViewPlan


def dataset(synth_data):
    return CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json",
                         transforms=make_policy(True, 64))


def test_recorded_views_replay_exactly(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=3, batch_size=4, seed=5)
    for i in (0, 7, 23):
        for k in range(3):
            view = plan.view(i, k)
            recorded = json.loads(json.dumps(view.to_dict()))  # plain numbers, as a cache stores them
            a_img, a_tgt = ds.get_view(i, view)
            b_img, b_tgt = ds.get_view(i, View.from_dict(recorded))
            assert torch.equal(a_img, b_img)
            assert torch.equal(a_tgt["boxes"], b_tgt["boxes"]) and torch.equal(a_tgt["labels"], b_tgt["labels"])
    # views differ between k (augmentation is random) and are stable across plan objects
    again = ViewPlan.for_dataset(ds, num_views=3, batch_size=4, seed=5)
    assert [plan.view(3, k) for k in range(3)] == [again.view(3, k) for k in range(3)]
    assert len({json.dumps(plan.view(i, k).to_dict()) for i in range(24) for k in range(3)}) > 24
    assert again.fingerprint() == plan.fingerprint()
    assert ViewPlan.for_dataset(ds, 3, 4, seed=6).fingerprint() != plan.fingerprint()


def test_batches_partition_the_images_and_epochs_cycle_views(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=3, batch_size=5, seed=0)
    assert plan.num_batches() == 5  # 24 images -> 4 x 5 + 4
    for k in range(3):
        seen = [i for j in range(plan.num_batches()) for i in plan.batch(k, j)]
        assert sorted(seen) == list(range(24))
    assert plan.batch(0, 0) != plan.batch(1, 0)  # composition changes from view to view
    # every cycle of K epochs uses every view once
    views = [plan.view_of_epoch(e, run_seed=1) for e in range(6)]
    assert sorted(views[:3]) == [0, 1, 2] and sorted(views[3:]) == [0, 1, 2]
    # an epoch visits all batches of its view; two ranks split them without overlap
    e0 = plan.epoch_batches(0, run_seed=1)
    assert sorted(j for _, j in e0) == list(range(5)) and {k for k, _ in e0} == {views[0]}
    r0, r1 = plan.epoch_batches(0, 1, rank=0, world_size=2), plan.epoch_batches(0, 1, rank=1, world_size=2)
    assert len(r0) == len(r1) == 3 and {j for _, j in r0 + r1} == set(range(5))
    # the sampler resumes mid-epoch
    s = PlanBatchSampler(plan, seed=1)
    s.set_epoch(0, start_batch=2)
    assert list(s) == e0[2:] and len(s) == 3


def test_plan_batches_collate_the_recorded_views(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=2, batch_size=4, seed=0)
    images, mask, targets = PlanBatches(ds, plan)[(1, 2)]
    idx = plan.batch(1, 2)
    assert images.shape[0] == 4 and [int(t["image_id"]) for t in targets] == [ds.image_ids[i] for i in idx]
    for b, i in enumerate(idx):
        img, tgt = ds.get_view(i, plan.view(i, 1))
        h, w = img.shape[-2:]
        assert torch.equal(images[b, :, :h, :w], img) and not mask[b, :h, :w].any()
        assert torch.equal(targets[b]["boxes"], tgt["boxes"])


def test_distill_on_a_view_plan_resumes_exactly(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main
    from test_d3etr import _distill_args, _log, _save_teacher

    teacher = _save_teacher(tmp_path, synth_data)
    runner = CliRunner()
    full, part = tmp_path / "full", tmp_path / "part"
    for out, iters, extra in ((full, 8, []), (part, 4, []), (part, 8, ["--resume", "auto"])):
        res = runner.invoke(main, _distill_args(synth_data, out, teacher, "--views", "2",
                                                "--set", f"train.max_iters={iters}", *extra))
        assert res.exit_code == 0, res.output + repr(res.exception)
    a, b = [r for r in _log(full) if "loss" in r], [r for r in _log(part) if "loss" in r]
    assert [r["iteration"] for r in b] == list(range(1, 9))  # 6 batches per epoch: crosses an epoch boundary
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], ra["iteration"]
    record = json.loads((full / "config.json").read_text())
    assert record["config"]["view_plan"]["num_views"] == 2
