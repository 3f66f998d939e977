"""Teacher cache storage layer: attention codec round trips, per-view outputs stacked into a batch, writer/reader
of one entry per (image, view) (format 2), integrity, sizes."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open

from kd_detr.teacher import TeacherOutputs
from kd_detr.teacher.cache import (CacheError, CacheReader, CacheWriter, StoreConfig, bytes_per_view, cache_info,
                                   decode_attention, decode_batch, encode_attention, encode_batch, verify_cache)
from kd_detr.teacher.cache.attention_codec import batch_keys
from kd_detr.teacher.outputs import embed_grid
from tests.support.cache_store import (B, C, FS, GRIDS, H, L, N, S, build_cache, encode_view, make_header,
                                      make_outputs)


def roundtrip(out: TeacherOutputs, cfg: StoreConfig) -> TeacherOutputs:
    enc = encode_batch(out, torch.arange(out.logits.shape[1]), cfg)
    return decode_batch(enc, cfg, out.query_embed)


# ------------------------------------------------------------------------------------------- config


def test_store_config_parse_and_dict():
    cfg = StoreConfig.parse("topk:32", dtype="float32", heads="per_head")
    assert (cfg.attention, cfg.topk, cfg.dtype, cfg.heads) == ("topk", 32, "float32", "per_head")
    assert (cfg.attn_rest, cfg.spec) == ("uniform", "topk:32:uniform")  # the default way to rebuild a row
    assert cfg.attn_mode == "per_head"
    assert StoreConfig.from_dict(cfg.to_dict()) == cfg
    renorm = StoreConfig.parse("topk:8:renorm")
    assert (renorm.topk, renorm.attn_rest, renorm.spec) == (8, "renorm", "topk:8:renorm")
    assert StoreConfig.from_dict(renorm.to_dict()) == renorm and renorm != StoreConfig.parse("topk:8")
    assert StoreConfig.parse("full").attn_mode == "mean"
    assert StoreConfig.parse("none", heads="per_head").attn_mode == "none"
    assert StoreConfig.parse("full").topk == 0 and StoreConfig.parse("full").attn_rest == "none"
    for bad in ("topk", "topk:0", "topk:x", "topk:3:zero", "topk:3:uniform:x", "dense", ""):
        with pytest.raises(ValueError, match="--attention"):
            StoreConfig.parse(bad)
    with pytest.raises(ValueError):
        StoreConfig.parse("full", dtype="bfloat16")
    with pytest.raises(ValueError):
        StoreConfig.parse("full", heads="max")


# ------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("heads", ["mean", "per_head"])
def test_full_float32_is_bit_identical(heads):
    out = make_outputs()
    cfg = StoreConfig.parse("full", dtype="float32", heads=heads)
    back = roundtrip(out, cfg)
    sa, ca = out.self_attn, out.cross_attn
    if heads == "mean":
        sa, ca = sa.mean(2, keepdim=True), ca.mean(2, keepdim=True)
    assert back.self_attn.shape == (L, B, 1 if heads == "mean" else H, N, N)
    for a, b in ((back.self_attn, sa), (back.cross_attn, ca), (back.logits, out.logits), (back.boxes, out.boxes),
                 (back.reference_points, out.reference_points), (back.gt_assignment, out.gt_assignment)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.feature_size == FS and back.query_embed is out.query_embed


def test_full_float16_close():
    out = make_outputs()
    cfg = StoreConfig.parse("full", dtype="float16", heads="per_head")
    enc = encode_batch(out, torch.arange(B), cfg)
    assert enc["self_attn"].dtype == torch.float16 and enc["logits"].dtype == torch.float16
    assert enc["feature_size"].dtype == torch.int32 and enc["image_index"].dtype == torch.int64
    back = decode_batch(enc, cfg, out.query_embed)
    assert back.cross_attn.dtype == torch.float32
    torch.testing.assert_close(back.self_attn, out.self_attn, atol=1e-3, rtol=0)
    torch.testing.assert_close(back.cross_attn, out.cross_attn, atol=1e-3, rtol=0)
    torch.testing.assert_close(back.logits, out.logits, atol=1e-2, rtol=1e-3)
    assert torch.equal(back.gt_assignment, out.gt_assignment)


@pytest.mark.parametrize("rest", ["uniform", "renorm"])
def test_topk_all_keys_close(rest):
    out = make_outputs()
    cfg = StoreConfig.parse(f"topk:{S}:{rest}", heads="per_head")  # k = every cross key; self-attention k clips to N
    enc = encode_batch(out, torch.arange(B), cfg)
    assert enc["self_attn.values"].shape == (L, B, H, N, N)
    assert enc["cross_attn.indices"].shape == (L, B, H, N, S) and enc["cross_attn.indices"].dtype == torch.int16
    back = decode_batch(enc, cfg, out.query_embed)
    torch.testing.assert_close(back.self_attn, out.self_attn, atol=2e-3, rtol=0)
    torch.testing.assert_close(back.cross_attn, out.cross_attn, atol=2e-3, rtol=0)
    # renorm: rows sum to 1 exactly; uniform (nothing left to spread): up to the float16 rounding of the values
    atol = 1e-5 if rest == "renorm" else 2e-3
    torch.testing.assert_close(back.cross_attn.sum(-1), torch.ones(L, B, H, N), atol=atol, rtol=0)


@pytest.mark.parametrize("rest", ["uniform", "renorm"])
def test_topk2_keeps_two_largest_hand_checked(rest):
    maps = torch.zeros(1, 1, 1, 2, 4)
    maps[0, 0, 0, 0] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    # second row: all zero (e.g. a query whose stored values vanish): no NaN either way
    cfg = StoreConfig.parse(f"topk:2:{rest}", dtype="float32")
    enc = encode_attention(maps, cfg, "attn")
    assert set(enc) == {"attn.values", "attn.indices"}  # nothing more stored for either scheme
    assert enc["attn.indices"][0, 0, 0, 0].tolist() == [1, 3]
    dense = decode_attention(enc, cfg, 4, "attn")
    assert not dense.isnan().any()
    if rest == "renorm":  # the two kept, rescaled to sum 1; zeros elsewhere; a zero row stays zero
        torch.testing.assert_close(dense[0, 0, 0, 0], torch.tensor([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]))
        assert torch.equal(dense[0, 0, 0, 1], torch.zeros(4))
    else:  # the two kept as they are; the remaining mass 0.3 spread evenly over the two other keys
        torch.testing.assert_close(dense[0, 0, 0, 0], torch.tensor([0.15, 0.4, 0.15, 0.3]))
        row = dense[0, 0, 0, 1]
        kept = enc["attn.indices"][0, 0, 0, 1].long()
        assert torch.equal(row[kept], torch.zeros(2)) and float(row.sum()) == pytest.approx(1.0)


def test_topk_mean_heads_averaged_first():
    out = make_outputs()
    cfg = StoreConfig.parse("topk:3", dtype="float32", heads="mean")
    enc = encode_batch(out, torch.arange(B), cfg)
    assert enc["cross_attn.values"].shape == (L, B, 1, N, 3)
    ref = out.cross_attn.mean(2, keepdim=True)
    torch.testing.assert_close(enc["cross_attn.values"], ref.topk(3, dim=-1).values)


def test_none_mode_and_required_gt_assignment():
    out = make_outputs()
    cfg = StoreConfig.parse("none")
    enc = encode_batch(out, torch.arange(B), cfg)
    assert not any("attn" in k for k in enc)
    back = decode_batch(enc, cfg, out.query_embed)
    assert back.self_attn is None and back.cross_attn is None and back.gt_assignment is not None
    with pytest.raises(ValueError, match="gt_assignment"):
        encode_batch(TeacherOutputs(**{**out.__dict__, "gt_assignment": None}), torch.arange(B), cfg)
    with pytest.raises(ValueError, match="attn='mean'"):
        encode_batch(TeacherOutputs(**{**out.__dict__, "self_attn": None}), torch.arange(B),
                     StoreConfig.parse("full"))


# ------------------------------------------------------------------------ per-view outputs, stacked


def test_embed_grid_hand_checked():
    maps = torch.arange(1, 7, dtype=torch.float32).reshape(1, 6)  # a 2x3 grid [[1, 2, 3], [4, 5, 6]]
    assert embed_grid(maps, (2, 3), (3, 4)).tolist() == [[1, 2, 3, 0,
                                                          4, 5, 6, 0,
                                                          0, 0, 0, 0]]
    assert embed_grid(maps, (2, 3), (2, 4)).tolist() == [[1, 2, 3, 0, 4, 5, 6, 0]]
    assert embed_grid(maps, (2, 3), (3, 3)).tolist() == [[1, 2, 3, 4, 5, 6, 0, 0, 0]]
    many = torch.rand(2, 3, 5, 6)  # leading dims are kept
    big = embed_grid(many, (2, 3), (3, 4))
    assert big.shape == (2, 3, 5, 12)
    assert torch.equal(big.reshape(2, 3, 5, 3, 4)[..., :2, :3], many.reshape(2, 3, 5, 2, 3))
    assert float(big.sum()) == pytest.approx(float(many.sum()))
    assert embed_grid(many, (2, 3), (2, 3)) is many  # the same grid: the maps themselves
    for size in ((3, 2), (1, 4)):
        with pytest.raises(ValueError, match="does not fit"):
            embed_grid(maps, (2, 3), size)


def _hand_view(seed: int, fs: tuple[int, int]) -> TeacherOutputs:
    out = make_outputs(seed=seed, batch=1, fs=fs)
    out.cross_attn[0, 0, 0, 0] = torch.arange(1, fs[0] * fs[1] + 1, dtype=torch.float32)
    return out


def test_stack_views_embeds_each_image_grid_hand_checked():
    a, b = _hand_view(1, (2, 3)), _hand_view(2, (3, 2))
    t = TeacherOutputs.stack_views([a, b])
    assert t.feature_size == (3, 3)  # the largest h and the largest w
    assert t.image_grids.dtype == torch.int64 and t.image_grids.tolist() == [[2, 3], [3, 2]]
    assert t.cross_attn.shape == (L, 2, H, N, 9)
    assert t.cross_attn[0, 0, 0, 0].tolist() == [1, 2, 3,
                                                 4, 5, 6,
                                                 0, 0, 0]
    assert t.cross_attn[0, 1, 0, 0].tolist() == [1, 2, 0,
                                                 3, 4, 0,
                                                 5, 6, 0]
    assert torch.equal(t.cross_attn[:, 0].reshape(L, H, N, 3, 3)[..., :2, :], a.cross_attn[:, 0].reshape(L, H, N, 2, 3))
    assert torch.equal(t.cross_attn[:, 1].reshape(L, H, N, 3, 3)[..., :, :2], b.cross_attn[:, 0].reshape(L, H, N, 3, 2))
    for name in ("logits", "boxes", "self_attn"):
        assert torch.equal(getattr(t, name), torch.cat([getattr(a, name), getattr(b, name)], 1)), name
    for name in ("reference_points", "gt_assignment"):
        assert torch.equal(getattr(t, name), torch.cat([getattr(a, name), getattr(b, name)], 0)), name
    assert t.query_embed is a.query_embed

    valid = t.cross_attn_valid((3, 3))
    assert valid.dtype == torch.bool and valid.int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0],
                                                                  [1, 1, 0, 1, 1, 0, 1, 1, 0]]
    assert not t.cross_attn[:, 0][..., ~valid[0]].any() and not t.cross_attn[:, 1][..., ~valid[1]].any()
    # a student's grid larger than the batch's (e.g. a bigger padded batch): positions and zeros exactly
    assert t.cross_attn_valid((3, 4)).int().tolist() == [[1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0],
                                                         [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]]
    on = t.cross_attn_on((3, 4))
    assert on.shape == (L, 2, H, N, 12)
    assert on[0, 0, 0, 0].tolist() == [1, 2, 3, 0, 4, 5, 6, 0, 0, 0, 0, 0]
    assert on[0, 1, 0, 0].tolist() == [1, 2, 0, 0, 3, 4, 0, 0, 5, 6, 0, 0]
    assert t.cross_attn_on((3, 3)) is t.cross_attn
    with pytest.raises(ValueError, match="does not fit"):
        t.cross_attn_on((2, 2))

    # one view alone: itself, with its grid recorded
    one = TeacherOutputs.stack_views([a])
    assert one.feature_size == (2, 3) and one.image_grids.tolist() == [[2, 3]]
    assert torch.equal(one.cross_attn, a.cross_attn) and torch.equal(one.logits, a.logits)
    # image_grids travel on the wire
    back = TeacherOutputs.from_wire(t.to_wire(), t.query_embed)
    assert torch.equal(back.image_grids, t.image_grids) and back.feature_size == (3, 3)
    # no attention maps: still stacked, grids recorded
    plain = [TeacherOutputs(**{**v.__dict__, "cross_attn": None, "self_attn": None}) for v in (a, b)]
    s = TeacherOutputs.stack_views(plain)
    assert s.cross_attn is None and s.self_attn is None and s.cross_attn_on((3, 4)) is None
    assert s.image_grids.tolist() == [[2, 3], [3, 2]]


def test_stack_views_refusals_and_padded_batch_outputs():
    with pytest.raises(ValueError, match="at least one"):
        TeacherOutputs.stack_views([])
    with pytest.raises(ValueError, match="single-image outputs, got batch 3"):
        TeacherOutputs.stack_views([make_outputs(batch=1), make_outputs(batch=3)])
    a = make_outputs(seed=1, batch=1)
    with pytest.raises(ValueError, match="some views have self_attn"):
        TeacherOutputs.stack_views([a, TeacherOutputs(**{**a.__dict__, "self_attn": None})])
    # outputs of a padded batch (no image_grids): every position counts; another grid cannot be compared
    padded = make_outputs()
    assert padded.image_grids is None and padded.cross_attn_valid(FS) is None
    assert padded.cross_attn_on(FS) is padded.cross_attn
    with pytest.raises(ValueError, match="cannot be compared"):
        padded.cross_attn_on((4, 4))


# ------------------------------------------------------------------------------------ writer/reader


def _manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_write_and_read_back(tmp_path):
    cfg = StoreConfig.parse("full", dtype="float32", heads="per_head")
    root = tmp_path / "c"
    w, originals, q = build_cache(root, cfg)
    assert w.done() == {"shard-00000.safetensors", "shard-00001.safetensors"}
    assert w.done_views() == {(0, 0), (1, 0), (4, 0), (0, 1)}
    r = CacheReader(root)
    assert r.keys() == [(0, 0), (0, 1), (1, 0), (4, 0)]  # (image, view), sorted
    assert r.has(4, 0) and r.has(0, 1) and not r.has(1, 1) and not r.has(2, 0) and not r.has(0, 4)
    assert r.missing([(0, 0), (1, 1), (2, 0), (4, 0)]) == [(1, 1), (2, 0)]
    assert torch.equal(r.queries(), q)
    for (i, k), out in originals.items():
        raw = r.entry(i, k)
        assert set(raw) == set(batch_keys(cfg)) and raw["image_index"].tolist() == [i]
        t = r.view_outputs(i, k)
        assert t.logits.shape == (L, 1, N, C) and t.feature_size == GRIDS[i] and t.image_grids is None
        for name in ("logits", "boxes", "self_attn", "cross_attn", "reference_points", "gt_assignment"):
            a, b = getattr(t, name), getattr(out, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (i, k, name)  # full float32: bit-identical
        assert torch.equal(t.query_embed, q)
    # a batch of any composition stacks the stored views like the teacher's own per-view outputs
    keys = [(4, 0), (0, 1), (1, 0)]
    got = TeacherOutputs.stack_views([r.view_outputs(i, k) for i, k in keys])
    want = TeacherOutputs.stack_views([originals[key] for key in keys])
    assert got.feature_size == want.feature_size == (4, 4)
    assert got.image_grids.tolist() == [[4, 2], [3, 4], [2, 3]]
    assert torch.equal(got.cross_attn, want.cross_attn) and torch.equal(got.logits, want.logits)
    with pytest.raises(CacheError, match=r"incomplete.*no view 1 of image 1 .*kd-detr cache"):
        r.entry(1, 1)
    with pytest.raises(CacheError, match=r"incomplete.*no view 0 of image 2 "):
        r.view_outputs(2, 0)

    m = _manifest(root)
    assert m["format_version"] == 2 and "batch_size" not in m["plan"]
    e0, e1 = m["shards"]
    assert set(e0) == {"file", "sha256", "bytes", "view", "images", "image_ids"}
    assert (e0["file"], e0["view"], e0["images"], e0["image_ids"]) == ("shard-00000.safetensors", 0, [0, 1, 4],
                                                                       [100, 101, 104])
    assert (e1["file"], e1["view"], e1["images"], e1["image_ids"]) == ("shard-00001.safetensors", 1, [0], [100])
    # shard tensors are named i{i}.{key}; the header records the view and its images
    with safe_open(str(root / "shard-00000.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {f"i{i}.{key}" for i in (0, 1, 4) for key in batch_keys(cfg)}
        meta = f.metadata()
        assert meta["view"] == "0" and json.loads(meta["images"]) == [0, 1, 4]
    assert verify_cache(root) == []
    # writing queries again: same tensor is fine, another one is refused
    w.write_queries(q.clone())
    with pytest.raises(CacheError, match="queries"):
        w.write_queries(q + 1)


def test_writer_refuses_bad_entries_and_duplicate_views(tmp_path):
    cfg = StoreConfig.parse("none")
    root = tmp_path / "c"
    w = CacheWriter(root, make_header(cfg))
    m = _manifest(root)
    assert m["shards"] == [] and m["format"] == "kd-detr-teacher-cache" and m["format_version"] == 2
    enc = encode_view(0, 0, cfg)
    # refused before anything is written: a missing key, ...
    with pytest.raises(ValueError, match=r"view 0 of image 0 lacks \['gt_assignment'\]"):
        w.write_shard("shard-00000.safetensors", 0, {0: {k: v for k, v in enc.items() if k != "gt_assignment"}},
                      [100])
    # ... an entry that is not one view alone of its own image (another image, a padded batch of 3), ...
    with pytest.raises(ValueError, match=r"image 1 holds image_index \[0\]"):
        w.write_shard("shard-00000.safetensors", 0, {1: enc}, [101])
    with pytest.raises(ValueError, match=r"image 0 holds image_index \[0, 1, 2\]"):
        w.write_shard("shard-00000.safetensors", 0, {0: encode_batch(make_outputs(), torch.arange(B), cfg)}, [100])
    # ... image ids that do not match the entries, no entries, a bad name
    with pytest.raises(ValueError, match="2 image_ids for 1 image views"):
        w.write_shard("shard-00000.safetensors", 0, {0: enc}, [100, 101])
    with pytest.raises(ValueError, match="no image views"):
        w.write_shard("shard-00000.safetensors", 0, {}, [])
    with pytest.raises(ValueError, match="plain"):
        w.write_shard("../shard-00000.safetensors", 0, {0: enc}, [100])
    assert not (root / "shard-00000.safetensors").exists() and _manifest(root)["shards"] == []

    w.write_shard("shard-00000.safetensors", 0, {0: enc}, [100])
    with pytest.raises(CacheError, match="write-once"):
        w.write_shard("shard-00000.safetensors", 0, {0: enc}, [100])
    # the same (image, view) twice is refused, naming the shard that has it
    with pytest.raises(CacheError, match=r"view 0 of images \[0\] is already in \['shard-00000.safetensors'\]"):
        w.write_shard("shard-00001.safetensors", 0, {0: enc, 1: encode_view(1, 0, cfg)}, [100, 101])
    assert not (root / "shard-00001.safetensors").exists()
    # the same image in another view, another image in the same view: fine
    w.write_shard("shard-00001.safetensors", 1, {0: encode_view(0, 1, cfg)}, [100])
    w.write_shard("shard-00002.safetensors", 0, {1: encode_view(1, 0, cfg)}, [101])
    assert len(_manifest(root)["shards"]) == 3 and w.done_views() == {(0, 0), (0, 1), (1, 0)}
    assert CacheReader(root).keys() == [(0, 0), (0, 1), (1, 0)]


def test_version_1_manifest_is_refused_with_the_rebuild_message(tmp_path):
    root = tmp_path / "c"
    build_cache(root)[0].close()
    m = _manifest(root)
    m["format_version"] = 1  # what a format-1 cache looks like: batches of a fixed batch size
    m["plan"]["batch_size"] = 4
    for entry in m["shards"]:
        entry["batches"] = entry.pop("images")
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError) as e:
        CacheReader(root)
    msg = str(e.value)
    assert "cache format version 1, this kd-detr reads version 2" in msg
    assert "per padded batch" in msg and "any batch size" in msg
    assert msg.endswith("rebuild the cache with `kd-detr cache`") and "\n" not in msg
    problems = verify_cache(root)
    assert len(problems) == 1 and "per padded batch" in problems[0] and "rebuild" in problems[0]
    with pytest.raises(CacheError, match=r"per padded batch.*rebuild the cache"):
        CacheWriter(root, make_header(StoreConfig.parse("topk:3")))  # no resume of a version-1 cache either


def test_reader_expect_mismatch(tmp_path):
    build_cache(tmp_path / "c")
    CacheReader(tmp_path / "c", expect={"teacher": {"checkpoint_sha256": "ab" * 32}, "plan": {"num_views": 2},
                                        "store": {"attention": "topk", "topk": 3}})
    with pytest.raises(CacheError) as e:
        CacheReader(tmp_path / "c", expect={"teacher": {"checkpoint_sha256": "ef" * 32}, "plan": {"num_views": 4}})
    msg = str(e.value)
    assert "teacher.checkpoint_sha256: cache has '" + "ab" * 32 + "', this run needs '" + "ef" * 32 + "'" in msg
    assert "plan.num_views: cache has 2, this run needs 4" in msg


def test_missing_manifest_and_bad_format(tmp_path):
    with pytest.raises(CacheError, match="kd-detr cache"):
        CacheReader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "kd-detr-teacher-cache", "format_version": 99}))
    with pytest.raises(CacheError, match="version 99") as e:
        CacheReader(tmp_path)
    assert "padded batch" not in str(e.value)  # the version-1 explanation is for version 1 only
    assert verify_cache(tmp_path) and "version" in verify_cache(tmp_path)[0]


def test_corrupt_shard_detected(tmp_path):
    build_cache(tmp_path / "c")
    path = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data; size unchanged
    path.write_bytes(bytes(data))
    problems = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0] and "SHA-256" in problems[0]
    r = CacheReader(tmp_path / "c")
    r.entry(0, 0)  # the other shard is fine
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        r.entry(0, 1)
    CacheReader(tmp_path / "c", verify_shards=False).entry(0, 1)  # trusting the file reads it


def test_missing_shard_detected(tmp_path):
    build_cache(tmp_path / "c")
    (tmp_path / "c" / "shard-00000.safetensors").unlink()
    problems = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and "shard-00000.safetensors" in problems[0] and "missing" in problems[0]
    with pytest.raises(CacheError, match="shard-00000.safetensors"):
        CacheReader(tmp_path / "c").entry(4, 0)
    CacheReader(tmp_path / "c").entry(0, 1)  # the other shard is fine


def test_every_listed_image_view_is_checked(tmp_path):
    root = tmp_path / "c"
    build_cache(root)[0].close()
    good = (root / "manifest.json").read_text()
    # the manifest lists an image whose tensors the (intact) shard does not hold: its header's images disagree
    m = json.loads(good)
    m["shards"][0]["images"].append(5)
    m["shards"][0]["image_ids"].append(105)
    (root / "manifest.json").write_text(json.dumps(m))
    problems = verify_cache(root)
    assert len(problems) == 2
    assert problems[0] == "shard-00000.safetensors: its header says images [0, 1, 4] (the manifest: [0, 1, 4, 5])"
    assert problems[1].startswith("shard-00000.safetensors: view 0 of image 5 lacks [")
    r = CacheReader(root)
    assert r.has(5, 0)
    with pytest.raises(CacheError, match=r"shard-00000.safetensors: its header says images \[0, 1, 4\] .*refused"):
        r.entry(5, 0)
    # an image view listed in two shards: which copy would be right?
    m = json.loads(good)
    m["shards"][1]["view"] = 0
    (root / "manifest.json").write_text(json.dumps(m))
    for problems in ([str(pytest.raises(CacheError, CacheReader, root).value)], verify_cache(root)):
        assert len(problems) == 1
        assert ("view 0 of image 0 is listed in both shard-00000.safetensors and shard-00001.safetensors"
                in problems[0])


def test_resume_and_header_mismatch(tmp_path):
    cfg = StoreConfig.parse("topk:3")
    root = tmp_path / "c"
    build_cache(root, cfg)[0].close()
    w = CacheWriter(root, make_header(cfg))
    assert w.done() == {"shard-00000.safetensors", "shard-00001.safetensors"}
    assert w.done_views() == {(0, 0), (1, 0), (4, 0), (0, 1)}
    w.close()
    with pytest.raises(CacheError) as e:
        CacheWriter(root, make_header(cfg, sha="ef" * 32, num_views=4))
    msg = str(e.value)
    assert "another teacher/data/plan" in msg and "teacher.checkpoint_sha256" in msg and "plan.num_views" in msg
    assert "'" + "ab" * 32 + "'" in msg and "'" + "ef" * 32 + "'" in msg
    with pytest.raises(CacheError, match="store.topk"):
        CacheWriter(root, make_header(StoreConfig.parse("topk:8")))


def test_orphan_shard_not_done_and_rewritten(tmp_path):
    cfg = StoreConfig.parse("none")
    root = tmp_path / "c"
    w = CacheWriter(root, make_header(cfg))
    w.write_queries(make_outputs().query_embed)
    w.write_shard("shard-00000.safetensors", 0, {0: encode_view(0, 0, cfg)}, [100])
    (root / "shard-00001.safetensors").write_bytes(b"half-written garbage")  # crash before the manifest write
    w.close()
    w2 = CacheWriter(root, make_header(cfg))
    assert w2.done() == {"shard-00000.safetensors"} and w2.done_views() == {(0, 0)}
    assert not CacheReader(root).has(1, 0)
    entry = w2.write_shard("shard-00001.safetensors", 0, {1: encode_view(1, 0, cfg)}, [101])
    assert entry["bytes"] == (root / "shard-00001.safetensors").stat().st_size and entry["images"] == [1]
    assert CacheReader(root).has(1, 0) and verify_cache(root) == []


def test_reader_entries_of_images_sharing_a_name_prefix(tmp_path):
    # images 1, 11 and 12 in one shard: the tensors of image 1 are "i1.*", not also "i11.*" / "i12.*"
    cfg = StoreConfig.parse("topk:3")
    w = CacheWriter(tmp_path / "c", {**make_header(cfg), "dataset": {**make_header(cfg)["dataset"], "images": 13}})
    w.write_queries(make_outputs().query_embed)
    originals = {i: make_outputs(seed=i, batch=1) for i in (12, 1, 11)}
    w.write_shard("shard-00000.safetensors", 0, {i: encode_batch(o, torch.tensor([i]), cfg)
                                                 for i, o in originals.items()}, image_ids=[1, 11, 12])
    r = CacheReader(tmp_path / "c")
    for i in (1, 11, 12):
        raw = r.entry(i, 0)
        assert set(raw) == set(batch_keys(cfg)) and raw["image_index"].tolist() == [i]
        assert torch.equal(r.view_outputs(i, 0).boxes, originals[i].boxes.half().float())


def test_writer_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        CacheWriter(tmp_path, make_header(StoreConfig.parse("none")))


def test_reader_pickles(tmp_path):
    _, originals, _ = build_cache(tmp_path / "c")
    r = CacheReader(tmp_path / "c")
    r.entry(0, 0)  # opens a handle: must not break pickling
    r2 = pickle.loads(pickle.dumps(r))
    t = r2.view_outputs(4, 0)
    assert t.cross_attn.shape == (L, 1, 1, N, 8) and t.feature_size == (4, 2)
    assert torch.equal(t.gt_assignment, originals[(4, 0)].gt_assignment)
    assert torch.equal(copy.deepcopy(r).entry(1, 0)["image_index"], torch.tensor([1]))


def test_cache_info(tmp_path):
    build_cache(tmp_path / "c")
    info = cache_info(tmp_path / "c")
    assert "topk:3" in info and "float16" in info and "mean" in info
    assert "K=2 views per image" in info and "B=" not in info
    assert "2 shards, 4 image views" in info and "images per view: 0: 3, 1: 1" in info
    assert "batches" not in info
    assert "per image view" in info and "bytes" in info


# -------------------------------------------------------------------------------------------- sizes


def test_bytes_per_view_matches_encoded_tensors():
    for spec, heads in (("none", "mean"), ("full", "per_head"), ("topk:3", "mean"), ("topk:40", "per_head")):
        cfg = StoreConfig.parse(spec, heads=heads)
        enc = encode_batch(make_outputs(batch=1), torch.arange(1), cfg)
        actual = sum(t.numel() * t.element_size() for t in enc.values())
        assert bytes_per_view(cfg, L=L, N=N, C=C, H=H, S=S) == actual, spec


def test_bytes_per_view_official_sizes():
    topk32 = bytes_per_view(StoreConfig.parse("topk:32"), L=6, N=300, C=91, H=8, S=25 * 34)
    full_mean = bytes_per_view(StoreConfig.parse("full"), L=6, N=300, C=91, H=8, S=25 * 34)
    assert topk32 < 1_000_000 < full_mean
    assert bytes_per_view("full") == full_mean  # the defaults are the official sizes
