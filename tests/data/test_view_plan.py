"""View plans: recorded views replay exactly; every image draws one of its K views per epoch (each view once
per cycle of K epochs); the plan sampler keeps the batch sampler's batches, ranks and resume; PlanViews pads
the recorded views and stacks the teacher's per-view outputs; the in-process teacher sees each image alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd_detr.data import CocoDetection, View, make_policy, pad_images
from kd_detr.data.batch import Batch
from kd_detr.data.view_plan import PlanViews, PlanViewSampler, ViewPlan
from kd_detr.engine.sampler import ResumableBatchSampler
from kd_detr.teacher import TeacherOutputs
from kd_detr.teacher.inprocess import InProcessTeacher, image_regions

STRIDE = 32  # the C5 stride of cond_detr_r10_tiny


def dataset(synth_data):
    return CocoDetection(synth_data / "train2017", synth_data / "annotations" / "instances_train2017.json",
                         transforms=make_policy(True, 64))


def tiny_teacher(num_classes: int = 3, attn: str = "per_head") -> InProcessTeacher:
    from kd_detr.models import build_model

    torch.manual_seed(7)
    model = build_model("cond_detr_r10_tiny", num_classes=num_classes, num_queries=10, dim_feedforward=128)
    return InProcessTeacher(model, attn=attn)


def grid_maps(maps: torch.Tensor, grid) -> torch.Tensor:
    """``[..., h*w]`` -> ``[..., h, w]``."""
    return maps.reshape(*maps.shape[:-1], int(grid[0]), int(grid[1]))


def c5_grid(h: int, w: int) -> tuple[int, int]:
    return math.ceil(h / STRIDE), math.ceil(w / STRIDE)


# ------------------------------------------------------------------------------------------ the plan


def test_recorded_views_replay_exactly(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=3, seed=5)
    for i in (0, 7, 23):
        for k in range(3):
            view = plan.view(i, k)
            recorded = json.loads(json.dumps(view.to_dict()))  # plain numbers, as a cache stores them
            a_img, a_tgt = ds.get_view(i, view)
            b_img, b_tgt = ds.get_view(i, View.from_dict(recorded))
            assert torch.equal(a_img, b_img)
            assert torch.equal(a_tgt["boxes"], b_tgt["boxes"]) and torch.equal(a_tgt["labels"], b_tgt["labels"])
    # views differ between k (augmentation is random) and are stable across plan objects
    again = ViewPlan.for_dataset(ds, num_views=3, seed=5)
    assert [plan.view(3, k) for k in range(3)] == [again.view(3, k) for k in range(3)]
    assert len({json.dumps(plan.view(i, k).to_dict()) for i in range(24) for k in range(3)}) > 24
    assert again.fingerprint() == plan.fingerprint()
    assert ViewPlan.for_dataset(ds, 3, seed=6).fingerprint() != plan.fingerprint()
    assert ViewPlan.for_dataset(ds, 2, seed=5).fingerprint() != plan.fingerprint()
    with pytest.raises(IndexError, match="view 3"):
        plan.view(0, 3)
    # nothing about batches is part of a plan any more
    d = plan.to_dict()
    assert "batch_size" not in d and d["num_views"] == 3 and d["num_images"] == 24
    assert d["fingerprint"] == plan.fingerprint()
    assert plan.all_views() == [(i, k) for k in range(3) for i in range(24)]  # view 0 of every image first
    with pytest.raises(ValueError):
        ViewPlan.for_dataset(ds, num_views=0)


def test_epoch_views_visit_every_view_of_every_image_once_per_cycle(synth_data):
    ds = dataset(synth_data)
    K, n = 3, len(ds)
    plan = ViewPlan.for_dataset(ds, num_views=K, seed=0)
    epochs = np.stack([plan.epoch_views(e, run_seed=1).copy() for e in range(3 * K)])  # [epochs, N]
    assert epochs.shape == (3 * K, n) and epochs.min() >= 0 and epochs.max() < K
    for cycle in range(3):
        block = epochs[cycle * K:(cycle + 1) * K]
        # each cycle of K epochs gives every image each of its views exactly once
        assert (np.sort(block, axis=0) == np.arange(K)[:, None]).all(), cycle
    for e in range(3 * K):
        assert len(set(epochs[e].tolist())) > 1, e  # views differ across images within an epoch
    # each image has an order of its own, and the orders change from cycle to cycle
    orders = {tuple(epochs[:K, i]) for i in range(n)}
    assert len(orders) > 1
    assert not np.array_equal(epochs[:K], epochs[K:2 * K])
    # deterministic: another plan object, and asking for the epochs out of order, give the same views
    other = ViewPlan.for_dataset(ds, num_views=K, seed=0)
    for e in (7, 0, 4, 8, 1):
        assert np.array_equal(other.epoch_views(e, run_seed=1), epochs[e]), e
    assert not np.array_equal(np.stack([plan.epoch_views(e, run_seed=2) for e in range(K)]), epochs[:K])
    # one view: always view 0
    single = ViewPlan.for_dataset(ds, num_views=1, seed=0)
    assert all((single.epoch_views(e, 1) == 0).all() for e in range(3))


def test_plan_view_sampler_keeps_batches_ranks_and_resume(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=3, seed=0)
    n = len(ds)

    def sampler(batch_size=5, rank=0, world_size=1):
        inner = ResumableBatchSampler(n, batch_size, shuffle=True, seed=1, rank=rank, world_size=world_size)
        return PlanViewSampler(inner, plan, seed=1), inner

    s, inner = sampler()
    cycle = []
    for epoch in range(3):
        s.set_epoch(epoch)
        assert s.epoch == epoch and s.batches_per_epoch() == 5 and len(s) == 5
        batches = list(s)
        # the ordinary batches (order and sizes: any batch size), each image with its view of the epoch
        assert [[i for i, _ in b] for b in batches] == list(inner)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
        views = plan.epoch_views(epoch, run_seed=1)
        assert all(k == views[i] for b in batches for i, k in b)
        assert all(isinstance(i, int) and isinstance(k, int) for b in batches for i, k in b)
        assert sorted(i for b in batches for i, _ in b) == list(range(n))
        assert len({k for b in batches for _, k in b}) > 1  # one batch mixes views
        cycle += [key for b in batches for key in b]
    assert sorted(cycle) == sorted(plan.all_views())  # three epochs: every (i, k) exactly once

    # two ranks split the images of an epoch without overlap, with the same view per image
    s.set_epoch(1)
    full = {key for b in s for key in b}
    ranks = []
    for rank in range(2):
        r, _ = sampler(rank=rank, world_size=2)
        r.set_epoch(1)
        ranks.append([key for b in r for key in b])
        assert len(r) == 3  # 12 images per rank in batches of 5
    assert len(ranks[0]) == len(ranks[1]) == n // 2
    assert not {i for i, _ in ranks[0]} & {i for i, _ in ranks[1]}
    assert set(ranks[0]) | set(ranks[1]) == full

    # the sampler resumes mid-epoch: exactly the rest of the epoch
    s.set_epoch(2)
    e2 = list(s)
    s.set_epoch(2, start_batch=2)
    assert list(s) == e2[2:] and len(s) == 3
    # another batch size: same views per image
    s3, _ = sampler(batch_size=3)
    s3.set_epoch(2)
    assert dict(key for b in s3 for key in b) == dict(key for b in e2 for key in b)


# ------------------------------------------------------------------------------------------ PlanViews


def test_plan_views_collate_the_recorded_views(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    views = PlanViews(ds, plan)
    assert len(views) == 2 * len(ds)
    keys = [(3, 1), (10, 0), (17, 1), (0, 0)]
    items = [views[key] for key in keys]
    assert all(len(item) == 2 for item in items)
    images, mask, targets = PlanViews.collate(items)
    assert images.shape[0] == 4 and [int(t["image_id"]) for t in targets] == [ds.image_ids[i] for i, _ in keys]
    sizes = []
    for b, (i, k) in enumerate(keys):
        img, tgt = ds.get_view(i, plan.view(i, k))
        assert torch.equal(items[b][0], img)
        h, w = img.shape[-2:]
        sizes.append((h, w))
        assert torch.equal(images[b, :, :h, :w], img) and not mask[b, :h, :w].any()
        assert int(mask[b].sum()) == mask[b].numel() - h * w and not images[b][:, mask[b]].any()  # zero padding
        assert torch.equal(targets[b]["boxes"], tgt["boxes"]) and torch.equal(targets[b]["labels"], tgt["labels"])
    assert tuple(images.shape[-2:]) == (max(h for h, _ in sizes), max(w for _, w in sizes))

    # through a DataLoader with the plan sampler: the batches of the sampler, collated
    inner = ResumableBatchSampler(len(ds), 4, shuffle=True, seed=3)
    sampler = PlanViewSampler(inner, plan, seed=3)
    sampler.set_epoch(1)
    loader = DataLoader(views, batch_sampler=sampler, collate_fn=PlanViews.collate, num_workers=0)
    first_keys = next(iter(sampler))
    got = next(iter(loader))
    want = PlanViews.collate([views[key] for key in first_keys])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert [int(t["image_id"]) for t in got[2]] == [ds.image_ids[i] for i, _ in first_keys]


class ViewTeacher:
    """A teacher source serving ``view_outputs(i, k)`` like a cache reader: the in-process teacher on the view alone."""

    def __init__(self, ds, plan, teacher):
        self.ds, self.plan, self.teacher = ds, plan, teacher

    def view_outputs(self, i, k):
        image, _ = self.ds.get_view(i, self.plan.view(i, k))
        return self.teacher.view(image)


def test_plan_views_stack_the_teacher_outputs_of_each_view(synth_data):
    ds = dataset(synth_data)
    plan = ViewPlan.for_dataset(ds, num_views=2, seed=0)
    teacher = tiny_teacher(ds.label_map.num_classes)
    source = ViewTeacher(ds, plan, teacher)
    views = PlanViews(ds, plan, source)
    # views of different C5 grids in one batch: a 3x2 one, a 2x3 one, a 2x2 one
    grid_of = {}
    for i, k in plan.all_views():
        h, w = ds.get_view(i, plan.view(i, k))[0].shape[-2:]
        grid_of.setdefault(c5_grid(h, w), (i, k))
    assert {(3, 2), (2, 3), (2, 2)} <= set(grid_of)
    keys = [grid_of[(3, 2)], grid_of[(2, 2)], grid_of[(2, 3)]]
    items = [views[key] for key in keys]
    singles = [item[2] for item in items]
    for (i, k), item, single in zip(keys, items, singles):
        assert len(item) == 3 and single.logits.shape[1] == 1
        assert torch.equal(item[0], ds.get_view(i, plan.view(i, k))[0])
        assert single.feature_size == c5_grid(*item[0].shape[-2:])

    batch = PlanViews.collate(items)
    assert isinstance(batch, Batch)
    t = batch.teacher
    assert isinstance(t, TeacherOutputs)
    sizes = [item[0].shape[-2:] for item in items]
    assert tuple(batch.images.shape) == (3, 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert t.feature_size == (3, 3)
    assert t.image_grids.dtype == torch.int64 and t.image_grids.tolist() == [[3, 2], [2, 2], [2, 3]]
    # the stacked grid is the student's C5 grid of the padded batch
    from kd_detr.models import DetectorRequest

    with torch.no_grad():
        padded = teacher.model(batch.images, batch.mask, request=DetectorRequest(attention=True))
    assert tuple(padded["feature_size"]) == t.feature_size
    for b, single in enumerate(singles):
        for name in ("logits", "boxes", "self_attn"):
            assert torch.equal(getattr(t, name)[:, b:b + 1], getattr(single, name)), name
        assert torch.equal(t.reference_points[b:b + 1], single.reference_points)
        h, w = single.feature_size
        grid = grid_maps(t.cross_attn[:, b:b + 1], t.feature_size)
        assert torch.equal(grid[..., :h, :w], grid_maps(single.cross_attn, (h, w)))
        outside = torch.ones(t.feature_size, dtype=torch.bool)
        outside[:h, :w] = False
        assert not grid[..., outside].any()  # zeros outside the image's own grid
        assert torch.equal(t.cross_attn_valid(t.feature_size)[b], ~outside.flatten())
    assert t.query_embed is singles[0].query_embed
    # the in-process teacher on the padded batch gives exactly the same numbers
    inproc = teacher(batch.images, batch.mask)
    assert inproc.feature_size == t.feature_size and torch.equal(inproc.image_grids, t.image_grids)
    for name in ("logits", "boxes", "self_attn", "cross_attn", "reference_points"):
        torch.testing.assert_close(getattr(inproc, name), getattr(t, name), rtol=0, atol=1e-6)

    # through a DataLoader worker: the same batch (a worker runs torch on one thread: equal to rounding)
    loader = DataLoader(views, batch_sampler=[keys], collate_fn=PlanViews.collate, num_workers=1)
    got = next(iter(loader))
    assert isinstance(got, Batch) and torch.equal(got.images, batch.images)
    assert got.teacher.feature_size == t.feature_size and torch.equal(got.teacher.image_grids, t.image_grids)
    torch.testing.assert_close(got.teacher.cross_attn, t.cross_attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.teacher.logits, t.logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ the teacher


def test_in_process_teacher_sees_each_image_alone():
    teacher = tiny_teacher(attn="per_head")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 64, 96, generator=g)    # C5 grid 2x3
    b = torch.randn(3, 80, 48, generator=g)    # 3x2
    c = torch.randn(3, 128, 128, generator=g)  # 4x4
    alone = [teacher.view(x) for x in (a, b, c)]
    assert [o.feature_size for o in alone] == [(2, 3), (3, 2), (4, 4)]
    assert all(o.logits.shape[1] == 1 and o.image_grids is None for o in alone)

    images, mask = pad_images([a, b])
    regions = image_regions(images, mask)
    assert torch.equal(regions[0], a) and torch.equal(regions[1], b)
    two = teacher(images, mask)
    assert two.feature_size == (3, 3) and two.image_grids.tolist() == [[2, 3], [3, 2]]
    for j, solo in enumerate(alone[:2]):
        for name in ("logits", "boxes", "self_attn"):
            torch.testing.assert_close(getattr(two, name)[:, j:j + 1], getattr(solo, name), rtol=0, atol=1e-5)
        torch.testing.assert_close(two.reference_points[j:j + 1], solo.reference_points, rtol=0, atol=1e-5)
        h, w = solo.feature_size
        grid = grid_maps(two.cross_attn[:, j:j + 1], two.feature_size)
        torch.testing.assert_close(grid[..., :h, :w], grid_maps(solo.cross_attn, (h, w)), rtol=0, atol=1e-5)
        assert grid.sum() > 0 and not grid[..., h:, :].any() and not grid[..., :, w:].any()
    # the model itself on the padded batch would not give the image's own outputs: padding changes them
    from kd_detr.models import DetectorRequest

    with torch.no_grad():
        raw = teacher.model(images, mask, request=DetectorRequest(attention=True))
    assert not torch.allclose(raw["pred_logits"][1], alone[1].logits[-1, 0], atol=1e-3)

    # padding the batch further (a larger third image) changes nothing for the first two images
    images3, mask3 = pad_images([a, b, c])
    three = teacher(images3, mask3)
    assert three.feature_size == (4, 4) and three.image_grids.tolist() == [[2, 3], [3, 2], [4, 4]]
    for j in range(2):
        for name in ("logits", "boxes"):
            torch.testing.assert_close(getattr(three, name)[:, j], getattr(two, name)[:, j], rtol=0, atol=1e-5)
        h, w = alone[j].feature_size
        torch.testing.assert_close(grid_maps(three.cross_attn[:, j], three.feature_size)[..., :h, :w],
                                   grid_maps(two.cross_attn[:, j], two.feature_size)[..., :h, :w], rtol=0, atol=1e-5)
        valid = three.cross_attn_valid(three.feature_size)[j]
        assert int(valid.sum()) == h * w and not three.cross_attn[:, j][..., ~valid].any()
    torch.testing.assert_close(three.logits[:, 2:], alone[2].logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(three.cross_attn[:, 2:], alone[2].cross_attn, rtol=0, atol=1e-5)  # the full grid
    # a batch of one unpadded image is the view itself
    one = teacher(a[None], torch.zeros(1, 64, 96, dtype=torch.bool))
    assert torch.equal(one.logits, alone[0].logits) and one.image_grids.tolist() == [[2, 3]]

    bad = mask.clone()
    bad[1] = True
    with pytest.raises(ValueError, match="image 1 of the batch is all padding"):
        image_regions(images, bad)


def test_distill_on_a_view_plan_resumes_exactly(synth_data, tmp_path):
    from click.testing import CliRunner

    from kd_detr.cli import main
    from tests.support.runs import distill_args, read_log, save_teacher

    teacher = save_teacher(tmp_path, synth_data)
    runner = CliRunner()
    full, part = tmp_path / "full", tmp_path / "part"
    for out, iters, extra in ((full, 8, []), (part, 4, []), (part, 8, ["--resume", "auto"])):
        res = runner.invoke(main, distill_args(synth_data, out, teacher, "--views", "2",
                                               "--set", f"train.max_iters={iters}", *extra))
        assert res.exit_code == 0, res.output + repr(res.exception)
    a, b = [r for r in read_log(full) if "loss" in r], [r for r in read_log(part) if "loss" in r]
    assert [r["iteration"] for r in b] == list(range(1, 9))  # 6 batches per epoch: crosses an epoch boundary
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], ra["iteration"]
    record = json.loads((full / "config.json").read_text())
    assert record["config"]["view_plan"]["num_views"] == 2
    assert "batch_size" not in record["config"]["view_plan"]
