"""A small hand-built teacher cache: random teacher outputs of fixed shapes (``L`` layers, batch ``B``, ``N``
queries, ``C`` classes, ``H`` heads, a ``FS`` C5 grid of ``S`` tokens), a manifest header, and a two-shard cache
written with :class:`~kd_detr.teacher.cache.CacheWriter` (:func:`build_cache`)."""

from __future__ import annotations

import torch

from kd_detr.teacher import TeacherOutputs
from kd_detr.teacher.cache import CacheWriter, StoreConfig, encode_batch

L, B, N, C, H = 2, 3, 5, 4, 2
FS = (3, 4)
S = FS[0] * FS[1]


def make_outputs(seed: int = 0, batch: int = B, fs: tuple[int, int] = FS) -> TeacherOutputs:
    g = torch.Generator().manual_seed(seed)
    sa = torch.randn(L, batch, H, N, N, generator=g).softmax(-1)
    ca_logits = torch.randn(L, batch, H, N, fs[0] * fs[1], generator=g)
    ca_logits[..., -2:] = float("-inf")  # padded keys: probability 0, as in a padded batch
    return TeacherOutputs(
        logits=torch.randn(L, batch, N, C, generator=g),
        boxes=torch.rand(L, batch, N, 4, generator=g),
        self_attn=sa, cross_attn=ca_logits.softmax(-1),
        query_embed=torch.randn(N, 8, generator=g),
        reference_points=torch.rand(batch, N, 2, generator=g),
        feature_size=tuple(fs),
        gt_assignment=torch.randint(-1, 3, (batch, N), generator=g),
    )


def make_header(cfg: StoreConfig, sha: str = "ab" * 32, num_views: int = 2) -> dict:
    return {
        "teacher": {"name": "toy", "model": "conditional_detr_r50", "checkpoint": "t.pth",
                    "checkpoint_sha256": sha, "card": None},
        "dataset": {"annotations": "ann.json", "annotations_sha256": "cd" * 32, "images": 6,
                    "image_size": [64, 64], "label_map": None},
        "plan": {"num_views": num_views, "seed": 0, "policy": {"name": "resize"}, "fingerprint": "fp" * 8},
        "store": {**cfg.to_dict(), "layers": L, "queries": N, "classes": C},
    }


# The small cache of build_cache: view 0 of images 0, 1, 4 (handed to the writer unsorted) in shard 0, view 1
# of image 0 in shard 1; each view has a C5 grid of its own (views of different sizes).
GRIDS = {0: FS, 1: (2, 3), 4: (4, 2)}
SHARDS = (("shard-00000.safetensors", 0, (4, 0, 1)), ("shard-00001.safetensors", 1, (0,)))


def view_outputs(i: int, k: int) -> TeacherOutputs:
    """The teacher outputs that build_cache stores for view ``k`` of image ``i`` (``B = 1``)."""
    return make_outputs(seed=10 * k + i, batch=1, fs=GRIDS.get(i, FS))


def encode_view(i: int, k: int, cfg: StoreConfig) -> dict:
    """The stored tensors of view ``k`` of image ``i`` (``image_index [i]``)."""
    return encode_batch(view_outputs(i, k), torch.tensor([i]), cfg)


def build_cache(root, cfg=None):
    """Two shards: view 0 of images {0, 1, 4} and view 1 of image {0} (image ids 100 + i).
    Returns ``(writer, {(i, k): TeacherOutputs}, query_embed)``."""
    cfg = cfg or StoreConfig.parse("topk:3")
    w = CacheWriter(root, make_header(cfg))
    q = make_outputs().query_embed
    w.write_queries(q)
    originals = {}
    for name, view, images in SHARDS:
        entries = {}
        for i in images:
            originals[(i, view)] = view_outputs(i, view)
            entries[i] = encode_batch(originals[(i, view)], torch.tensor([i]), cfg)
        w.write_shard(name, view, entries, image_ids=[100 + i for i in sorted(images)])
    return w, originals, q
