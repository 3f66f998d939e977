"""Teacher cache storage layer: attention codec round trips, writer/reader, integrity, sizes."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from kd_detr.teacher import TeacherOutputs
from kd_detr.teacher.cache import (CacheError, CacheReader, CacheWriter, StoreConfig, bytes_per_view, cache_info,
                                   decode_attention, decode_batch, encode_attention, encode_batch, verify_cache)

L, B, N, C, H = 2, 3, 5, 4, 2
FS = (3, 4)
S = FS[0] * FS[1]


def make_outputs(seed: int = 0, batch: int = B) -> TeacherOutputs:
    g = torch.Generator().manual_seed(seed)
    sa = torch.randn(L, batch, H, N, N, generator=g).softmax(-1)
    ca_logits = torch.randn(L, batch, H, N, S, generator=g)
    ca_logits[..., -2:] = float("-inf")  # padded keys: probability 0, as in a padded batch
    return TeacherOutputs(
        logits=torch.randn(L, batch, N, C, generator=g),
        boxes=torch.rand(L, batch, N, 4, generator=g),
        self_attn=sa, cross_attn=ca_logits.softmax(-1),
        query_embed=torch.randn(N, 8, generator=g),
        reference_points=torch.rand(batch, N, 2, generator=g),
        feature_size=FS,
        gt_assignment=torch.randint(-1, 3, (batch, N), generator=g),
    )


def roundtrip(out: TeacherOutputs, cfg: StoreConfig) -> TeacherOutputs:
    enc = encode_batch(out, torch.arange(out.logits.shape[1]), cfg)
    return decode_batch(enc, cfg, out.query_embed)


# ------------------------------------------------------------------------------------------- config


def test_store_config_parse_and_dict():
    cfg = StoreConfig.parse("topk:32", dtype="float32", heads="per_head")
    assert (cfg.attention, cfg.topk, cfg.dtype, cfg.heads, cfg.spec) == ("topk", 32, "float32", "per_head", "topk:32")
    assert cfg.attn_mode == "per_head"
    assert StoreConfig.from_dict(cfg.to_dict()) == cfg
    assert StoreConfig.parse("full").attn_mode == "mean"
    assert StoreConfig.parse("none", heads="per_head").attn_mode == "none"
    assert StoreConfig.parse("full").topk == 0
    for bad in ("topk", "topk:0", "topk:x", "dense", ""):
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


def test_topk_all_keys_close_after_renormalisation():
    out = make_outputs()
    cfg = StoreConfig.parse(f"topk:{S}", heads="per_head")  # k = every cross key; self-attention k clips to N
    enc = encode_batch(out, torch.arange(B), cfg)
    assert enc["self_attn.values"].shape == (L, B, H, N, N)
    assert enc["cross_attn.indices"].shape == (L, B, H, N, S) and enc["cross_attn.indices"].dtype == torch.int16
    back = decode_batch(enc, cfg, out.query_embed)
    torch.testing.assert_close(back.self_attn, out.self_attn, atol=2e-3, rtol=0)
    torch.testing.assert_close(back.cross_attn, out.cross_attn, atol=2e-3, rtol=0)
    torch.testing.assert_close(back.cross_attn.sum(-1), torch.ones(L, B, H, N), atol=1e-5, rtol=0)


def test_topk2_keeps_two_largest_renormalised():
    maps = torch.zeros(1, 1, 1, 2, 4)
    maps[0, 0, 0, 0] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    # second row: all zero (e.g. a query whose stored values vanish): stays zero, no NaN
    cfg = StoreConfig.parse("topk:2", dtype="float32")
    enc = encode_attention(maps, cfg, "attn")
    assert set(enc) == {"attn.values", "attn.indices"}
    assert enc["attn.indices"][0, 0, 0, 0].tolist() == [1, 3]
    dense = decode_attention(enc, cfg, 4, "attn")
    torch.testing.assert_close(dense[0, 0, 0, 0], torch.tensor([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]))
    assert torch.equal(dense[0, 0, 0, 1], torch.zeros(4))


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


# ------------------------------------------------------------------------------------ writer/reader


def make_header(cfg: StoreConfig, sha: str = "ab" * 32, num_views: int = 2) -> dict:
    return {
        "teacher": {"name": "toy", "model": "conditional_detr_r50", "checkpoint": "t.pth",
                    "checkpoint_sha256": sha, "card": None},
        "dataset": {"annotations": "ann.json", "annotations_sha256": "cd" * 32, "images": 6,
                    "image_size": [64, 64], "label_map": None},
        "plan": {"num_views": num_views, "batch_size": B, "seed": 0, "policy": {"name": "resize"},
                 "fingerprint": "fp" * 8},
        "store": {**cfg.to_dict(), "layers": L, "queries": N, "classes": C},
    }


def build_cache(root, cfg=None):
    """Two shards: view 0 batches {0, 1} and view 1 batch {0}."""
    cfg = cfg or StoreConfig.parse("topk:3")
    w = CacheWriter(root, make_header(cfg))
    q = make_outputs().query_embed
    w.write_queries(q)
    originals = {}
    for name, view, js in (("shard-00000.safetensors", 0, [0, 1]), ("shard-00001.safetensors", 1, [0])):
        batches = {}
        for j in js:
            out = make_outputs(seed=10 * view + j)
            originals[(view, j)] = out
            batches[j] = encode_batch(out, torch.arange(B) + 3 * j, cfg)
        w.write_shard(name, view, batches, image_ids=list(range(100, 100 + B * len(js))))
    return w, originals, q


def test_write_and_read_back(tmp_path):
    cfg = StoreConfig.parse("full", dtype="float32", heads="per_head")
    w, originals, q = build_cache(tmp_path / "c", cfg)
    assert w.done() == {"shard-00000.safetensors", "shard-00001.safetensors"}
    r = CacheReader(tmp_path / "c")
    assert r.keys() == [(0, 0), (0, 1), (1, 0)] and r.has(0, 1) and not r.has(1, 1)
    assert r.missing([(0, 0), (1, 1), (2, 0)]) == [(1, 1), (2, 0)]
    assert torch.equal(r.queries(), q)
    for (view, j), out in originals.items():
        raw = r.batch(view, j)
        assert torch.equal(raw["image_index"], torch.arange(B) + 3 * j)
        t = r.teacher_outputs(view, j)
        assert torch.equal(t.cross_attn, out.cross_attn) and torch.equal(t.logits, out.logits)
        assert t.feature_size == FS and torch.equal(t.gt_assignment, out.gt_assignment)
    with pytest.raises(CacheError, match=r"incomplete.*batch 1 of view 1"):
        r.batch(1, 1)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [e["file"] for e in m["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert m["shards"][0]["batches"] == [0, 1] and m["shards"][0]["image_ids"] == list(range(100, 106))
    assert verify_cache(tmp_path / "c") == []
    # writing queries again: same tensor is fine, another one is refused
    w.write_queries(q.clone())
    with pytest.raises(CacheError, match="queries"):
        w.write_queries(q + 1)


def test_manifest_lists_only_complete_shards(tmp_path):
    cfg = StoreConfig.parse("none")
    w = CacheWriter(tmp_path / "c", make_header(cfg))
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["shards"] == [] and m["format"] == "kd-detr-teacher-cache"
    # a batch lacking a required key is refused before anything is written
    enc = encode_batch(make_outputs(), torch.arange(B), cfg)
    with pytest.raises(ValueError, match="gt_assignment"):
        w.write_shard("shard-00000.safetensors", 0, {0: {k: v for k, v in enc.items() if k != "gt_assignment"}},
                      list(range(B)))
    assert not (tmp_path / "c" / "shard-00000.safetensors").exists()
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"] == []
    w.write_shard("shard-00000.safetensors", 0, {0: enc}, list(range(B)))
    with pytest.raises(CacheError, match="write-once"):
        w.write_shard("shard-00000.safetensors", 0, {0: enc}, list(range(B)))
    with pytest.raises(CacheError, match="already in"):
        w.write_shard("shard-00001.safetensors", 0, {0: enc}, list(range(B)))
    assert len(json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]) == 1


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
    with pytest.raises(CacheError, match="version"):
        CacheReader(tmp_path)
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
    r.batch(0, 0)  # the other shard is fine
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        r.batch(1, 0)
    CacheReader(tmp_path / "c", verify_shards=False).batch(1, 0)  # trusting the file reads it


def test_missing_shard_detected(tmp_path):
    build_cache(tmp_path / "c")
    (tmp_path / "c" / "shard-00000.safetensors").unlink()
    problems = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and "shard-00000.safetensors" in problems[0] and "missing" in problems[0]
    with pytest.raises(CacheError, match="shard-00000.safetensors"):
        CacheReader(tmp_path / "c").batch(0, 1)


def test_resume_and_header_mismatch(tmp_path):
    cfg = StoreConfig.parse("topk:3")
    root = tmp_path / "c"
    build_cache(root, cfg)
    w = CacheWriter(root, make_header(cfg))
    assert w.done() == {"shard-00000.safetensors", "shard-00001.safetensors"}
    assert w.done_batches() == {(0, 0), (0, 1), (1, 0)}
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
    enc = encode_batch(make_outputs(), torch.arange(B), cfg)
    w.write_shard("shard-00000.safetensors", 0, {0: enc}, list(range(B)))
    (root / "shard-00001.safetensors").write_bytes(b"half-written garbage")  # crash before the manifest write
    w2 = CacheWriter(root, make_header(cfg))
    assert w2.done() == {"shard-00000.safetensors"}
    assert not CacheReader(root).has(0, 1)
    entry = w2.write_shard("shard-00001.safetensors", 0, {1: enc}, list(range(B)))
    assert entry["bytes"] == (root / "shard-00001.safetensors").stat().st_size
    assert CacheReader(root).has(0, 1) and verify_cache(root) == []


def test_writer_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        CacheWriter(tmp_path, make_header(StoreConfig.parse("none")))


def test_reader_pickles(tmp_path):
    _, originals, _ = build_cache(tmp_path / "c")
    r = CacheReader(tmp_path / "c")
    r.batch(0, 0)  # opens a handle: must not break pickling
    r2 = pickle.loads(pickle.dumps(r))
    t = r2.teacher_outputs(1, 0)
    assert t.cross_attn.shape == (L, B, 1, N, S)
    assert torch.equal(t.gt_assignment, originals[(1, 0)].gt_assignment)
    copy.deepcopy(r).batch(0, 1)


def test_cache_info(tmp_path):
    build_cache(tmp_path / "c")
    info = cache_info(tmp_path / "c")
    assert "topk:3" in info and "float16" in info and "mean" in info
    assert "2 shards" in info and "3 batches" in info and "9 image views" in info
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
