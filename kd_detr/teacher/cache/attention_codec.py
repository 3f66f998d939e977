"""How teacher outputs are stored in a cache: the store config and the tensor codec.

Attention maps dominate the size of a cached teacher output (docs/methods.md §6.4: per view, head-averaged
fp16 self-attention ≈ 1.1 MB and cross-attention ≈ 3–4 MB, 8x that per head), so they can be stored

* ``none``: not at all (recipes without attention distillation),
* ``full``: dense, in ``float16`` or ``float32``, averaged over heads (``mean``, ``H = 1``) or per head,
* ``topk:k[:REST]``: per query row the ``k`` largest probabilities and their key indices; on load the row
  is rebuilt densely with the other keys set by ``REST``: ``uniform`` (the default) spreads the row's
  remaining mass ``1 - sum(top-k)`` evenly over them, so the row keeps its mass and its tail; ``renorm``
  sets them to zero and rescales the top-k to sum 1 (what caches did before). Nothing more is stored for
  either. Measured by ``benchmarks/cache_store_kd.py`` (docs/teacher_cache.md): with ``topk:14`` on the
  quickstart teacher, ``renorm`` moves the self-attention KD term by 11.5% and ``uniform`` by 0.6%.

Class logits are stored dense (``--classes dense``, the default) or as each query's top-k classes plus
one value for the others (``--classes topk:k[:rest]``; codec in :mod:`.class_codec`).

The teacher's encoder output maps (feature distillation, ``[feature_kd]``) are stored on request only
(``--features``, :attr:`StoreConfig.features`), in the store dtype, each view's maps over its own grids:
``features [1,C,sum(h_l*w_l)]`` with ``feature_shapes [n,2]`` and ``feature_strides [n]`` (int32). They are large
(:func:`feature_bytes`: Conditional DETR R101 at 800x1066, ``d = 256``, stride 32: 435,212 bytes per view in
float16; RT-DETR R50 at 640x640, 256 channels, strides 8/16/32: 4,300,836 bytes).

Shapes: ``L`` decoder layers, ``B`` images of the padded batch, ``H`` heads, ``N`` teacher queries,
``K`` keys (``N`` for self-attention, ``S = h * w`` C5 tokens for cross-attention), ``C`` classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from kd_detr.teacher.outputs import TeacherOutputs

from .class_codec import (CLASS_REST_SCHEMES, DEFAULT_CLASS_REST, class_bytes, class_keys, decode_class_logits,
                          encode_class_logits)

__all__ = ["DTYPES", "ATTENTION_MODES", "ATTENTION_REST_SCHEMES", "DEFAULT_ATTENTION_SPEC", "DEFAULT_CLASSES_SPEC",
           "HEAD_MODES", "StoreConfig", "encode_attention", "decode_attention",
           "encode_batch", "decode_batch", "batch_keys", "bytes_per_view", "store_section_defaults",
           "encode_features", "decode_features", "feature_bytes", "FEATURE_KEYS"]

DTYPES = {"float16": torch.float16, "float32": torch.float32}
ATTENTION_MODES = ("none", "full", "topk")
ATTENTION_REST_SCHEMES = ("uniform", "renorm")  # how a topk row's other keys are rebuilt
DEFAULT_ATTENTION_REST = "uniform"

# What `kd-detr cache` stores unless told otherwise: the default d3etr recipe's cache at the official sizes in
# 244,820 bytes per view (within a 0.25 MB budget; 0.30x the 806,416 of topk:32 with dense classes), with
# every KD term within 1% of a dense float32 cache's (benchmarks/cache_store_kd.py, docs/teacher_cache.md).
DEFAULT_ATTENTION_SPEC = "topk:14"
DEFAULT_CLASSES_SPEC = "topk:4"
HEAD_MODES = ("mean", "per_head")

# int16 holds key indices up to 32767: enough for self-attention (300 queries) and for the C5 map of
# any image up to ~5700 px on a side; larger key counts fall back to int32.
_INT16_KEYS = 32768


@dataclass
class StoreConfig:
    """How a cache stores teacher outputs (the manifest's ``store`` section, without the model sizes).

    Attributes:
        dtype: ``float16`` | ``float32``: floating tensors (logits, boxes, reference points, attention).
        attention: ``none`` | ``full`` | ``topk``.
        topk: ``k`` for ``topk`` (normalised to 0 for the other modes, so that two configs storing the
            same thing compare equal).
        heads: ``mean`` (attention averaged over heads, stored with ``H = 1``) | ``per_head``.
        class_topk: class logits kept per query: ``0`` = all (dense, as caches always stored them),
            ``k > 0`` = the top ``k`` (``--classes topk:k``). Not ``classes``: the manifest's ``store``
            section already has ``classes``, the teacher's class count.
        class_rest: how the non-top-k classes are rebuilt (``floor`` | ``mean_logit`` | ``mean_prob``,
            see :mod:`.class_codec`); ``None`` picks the default scheme; normalised to ``"none"`` when dense.
        attn_rest: how a ``topk`` attention row's other keys are rebuilt (``uniform`` | ``renorm``, see the
            module docstring); ``None`` picks ``uniform``; normalised to ``"none"`` unless ``topk``.
        features: also store the teacher's encoder output maps (``--features``; feature distillation).
    """

    dtype: str = "float16"
    attention: str = "none"
    topk: int = 0
    heads: str = "mean"
    class_topk: int = 0
    class_rest: Optional[str] = None
    attn_rest: Optional[str] = None
    features: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"store attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.heads not in HEAD_MODES:
            raise ValueError(f"store heads must be one of {HEAD_MODES}, got {self.heads!r}")
        if self.attention == "topk":
            if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
                raise ValueError(f"store attention topk needs k >= 1, got topk={self.topk!r}")
            if self.attn_rest is None:
                self.attn_rest = DEFAULT_ATTENTION_REST
            elif self.attn_rest not in ATTENTION_REST_SCHEMES:
                raise ValueError(f"store attn_rest must be one of {ATTENTION_REST_SCHEMES}, got {self.attn_rest!r}")
        else:
            self.topk = 0
            self.attn_rest = "none"
        if not isinstance(self.features, bool):
            raise ValueError(f"store features must be true or false, got {self.features!r}")
        if isinstance(self.class_topk, bool) or not isinstance(self.class_topk, int) or self.class_topk < 0:
            raise ValueError(f"store class_topk must be 0 (dense) or k >= 1, got {self.class_topk!r}")
        if self.class_topk == 0:
            self.class_rest = "none"
        elif self.class_rest is None:
            self.class_rest = DEFAULT_CLASS_REST
        elif self.class_rest not in CLASS_REST_SCHEMES:
            raise ValueError(f"store class_rest must be one of {CLASS_REST_SCHEMES}, got {self.class_rest!r}")

    @classmethod
    def parse(cls, attention_spec: str, dtype: str = "float16", heads: str = "mean",
              classes: str = "dense", features: bool = False) -> "StoreConfig":
        """``none`` | ``full`` | ``topk:K[:REST]`` (the ``--attention`` option) and ``dense`` | ``topk:K[:REST]``
        (the ``--classes`` option) -> :class:`StoreConfig` (``features``: the ``--features`` flag)."""
        spec = str(attention_spec).strip().lower()
        usage = (f"--attention must be none, full or topk:K[:REST] (K a positive integer, REST one of "
                 f"{', '.join(ATTENTION_REST_SCHEMES)}), got {attention_spec!r}")
        class_topk, class_rest = cls.parse_classes(classes)
        common = dict(dtype=dtype, heads=heads, class_topk=class_topk, class_rest=class_rest, features=bool(features))
        if spec in ("none", "full"):
            return cls(attention=spec, topk=0, **common)
        if spec.startswith("topk:"):
            parts = spec.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ATTENTION_REST_SCHEMES):
                raise ValueError(usage)
            try:
                k = int(parts[1])
            except ValueError:
                raise ValueError(usage) from None
            if k < 1:
                raise ValueError(usage)
            return cls(attention="topk", topk=k, attn_rest=parts[2] if len(parts) == 3 else None, **common)
        raise ValueError(usage)

    @staticmethod
    def parse_classes(classes_spec: str) -> tuple[int, Optional[str]]:
        """``dense`` | ``topk:K`` | ``topk:K:REST`` (the ``--classes`` option) -> ``(class_topk, class_rest)``
        (``class_rest`` ``None`` = the default scheme)."""
        spec = str(classes_spec).strip().lower()
        usage = (f"--classes must be dense, topk:K or topk:K:REST (K a positive integer, REST one of "
                 f"{', '.join(CLASS_REST_SCHEMES)}), got {classes_spec!r}")
        if spec == "dense":
            return 0, None
        parts = spec.split(":")
        if parts[0] != "topk" or len(parts) not in (2, 3):
            raise ValueError(usage)
        try:
            k = int(parts[1])
        except ValueError:
            raise ValueError(usage) from None
        if k < 1 or (len(parts) == 3 and parts[2] not in CLASS_REST_SCHEMES):
            raise ValueError(usage)
        return k, (parts[2] if len(parts) == 3 else None)

    @property
    def spec(self) -> str:
        """The ``--attention`` spelling: ``none`` | ``full`` | ``topk:K:REST``."""
        return f"topk:{self.topk}:{self.attn_rest}" if self.attention == "topk" else self.attention

    @property
    def classes_spec(self) -> str:
        """The ``--classes`` spelling: ``dense`` | ``topk:K:REST``."""
        return f"topk:{self.class_topk}:{self.class_rest}" if self.class_topk else "dense"

    def describe(self) -> str:
        feats = ", encoder features" if self.features else ""
        if self.attention == "none":
            return f"attention none, {self.dtype}, classes {self.classes_spec}{feats}"
        return f"attention {self.spec}, {self.dtype}, heads {self.heads}, classes {self.classes_spec}{feats}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def attn_mode(self) -> str:
        """The :class:`InProcessTeacher` ``attn`` mode that produces what this config stores."""
        return "none" if self.attention == "none" else self.heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreConfig":
        """From a manifest ``store`` section; other keys (``layers``, ``queries``, ...) are ignored. A section
        without ``class_topk`` (a cache written before class top-k existed) reads as dense, one without
        ``features`` as storing none."""
        rest = d.get("class_rest")
        attn_rest = d.get("attn_rest")
        return cls(dtype=d.get("dtype", "float16"), attention=d.get("attention", "none"),
                   topk=int(d.get("topk") or 0), heads=d.get("heads", "mean"),
                   class_topk=int(d.get("class_topk") or 0), class_rest=None if rest in (None, "none") else rest,
                   attn_rest=None if attn_rest in (None, "none") else attn_rest,
                   features=bool(d.get("features", False)))


def store_section_defaults(store: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest ``store`` section with the fields added since format version 1 filled in with the values
    that mean "as before" (``class_topk = 0``, ``class_rest = "none"``: dense class logits), so that an
    older cache compares equal to a dense one field by field."""
    out = dict(store)
    out.setdefault("class_topk", 0)
    out.setdefault("class_rest", "none")
    out.setdefault("attn_rest", "renorm" if out.get("attention") == "topk" else "none")  # what topk decoded as
    out.setdefault("features", False)  # caches written before --features stored no encoder maps
    return out


# ----------------------------------------------------------------------------------------- attention


def _index_dtype(num_keys: int) -> torch.dtype:
    return torch.int16 if num_keys < _INT16_KEYS else torch.int32


def encode_attention(maps: Optional[Tensor], cfg: StoreConfig, prefix: str = "attn") -> dict[str, Tensor]:
    """Encode attention probabilities ``maps [L,B,H,N,K]`` for storage.

    Returns (on the device of ``maps``):
        ``none``: ``{}``;
        ``full``: ``{prefix: [L,B,H',N,K]}`` in ``cfg.dtype``;
        ``topk``: ``{prefix + ".values": [L,B,H',N,k]}`` in ``cfg.dtype`` and ``{prefix + ".indices":
        [L,B,H',N,k]}`` int16 (int32 when ``K >= 32768``), ``k = min(cfg.topk, K)``, largest first.
    ``H' = 1`` with ``heads == "mean"`` (heads averaged here if the teacher returned them), else ``H``.
    """
    if cfg.attention == "none":
        return {}
    if maps is None:
        raise ValueError(f"the cache stores attention ({cfg.spec}) but the teacher returned no {prefix} maps: "
                         f"run the teacher with attn={cfg.attn_mode!r}")
    if maps.dim() != 5:
        raise ValueError(f"{prefix}: expected attention maps [L,B,H,N,K], got shape {tuple(maps.shape)}")
    maps = maps.detach()
    if cfg.heads == "mean" and maps.shape[2] > 1:
        maps = maps.float().mean(2, keepdim=True)  # average in fp32 even for an fp16 teacher
    dt = cfg.torch_dtype
    if cfg.attention == "full":
        return {prefix: maps.to(dt).contiguous()}
    num_keys = maps.shape[-1]
    k = min(cfg.topk, num_keys)  # self-attention of a small query set may have fewer keys than k
    values, indices = torch.topk(maps, k, dim=-1, largest=True, sorted=True)
    return {f"{prefix}.values": values.to(dt).contiguous(),
            f"{prefix}.indices": indices.to(_index_dtype(num_keys)).contiguous()}


def _get(tensors: Mapping[str, Tensor], key: str) -> Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise KeyError(f"stored teacher batch has no tensor {key!r} (has: {sorted(tensors)})") from None


def decode_attention(tensors: Mapping[str, Tensor], cfg: StoreConfig, num_keys: int,
                     prefix: str = "attn") -> Optional[Tensor]:
    """Inverse of :func:`encode_attention`: ``[L,B,H',N,K]`` float32 (``K = num_keys``), or ``None``.

    ``topk`` with ``attn_rest = "uniform"``: the stored values at their key indices, and the row's remaining
    mass ``max(0, 1 - sum(values))`` spread evenly over its other ``K - k`` keys (a row then sums to 1 up to
    the store dtype's rounding). ``"renorm"``: the values scattered into zeros and each row divided by its
    sum (a row whose stored values sum to 0 stays 0). ``full`` maps are only cast to float32 (a float32 cache
    gives back the teacher's exact numbers).
    """
    if cfg.attention == "none":
        return None
    if cfg.attention == "full":
        maps = _get(tensors, prefix)
        if maps.shape[-1] != num_keys:
            raise ValueError(f"{prefix}: stored maps have {maps.shape[-1]} keys, expected {num_keys}")
        return maps.float()
    values = _get(tensors, f"{prefix}.values").float()
    indices = _get(tensors, f"{prefix}.indices").long()
    if values.shape != indices.shape:
        raise ValueError(f"{prefix}: values {tuple(values.shape)} and indices {tuple(indices.shape)} differ")
    if indices.numel() and (int(indices.max()) >= num_keys or int(indices.min()) < 0):
        raise ValueError(f"{prefix}: stored key indices outside [0, {num_keys})")
    if cfg.attn_rest == "uniform":
        others = num_keys - values.shape[-1]
        rest = (1 - values.sum(-1, keepdim=True)).clamp_min(0) / others if others > 0 else values.new_zeros(())
        return rest.expand(*values.shape[:-1], num_keys).clone().scatter_(-1, indices, values)
    dense = values.new_zeros(*values.shape[:-1], num_keys).scatter_(-1, indices, values)
    total = dense.sum(-1, keepdim=True)
    return dense / torch.where(total > 0, total, torch.ones_like(total))


# ------------------------------------------------------------------------------------------ batches

# Keys every stored batch has, whatever the attention mode.
_BASE_KEYS = ("logits", "boxes", "reference_points", "feature_size", "image_index", "gt_assignment")
# Keys of the encoder output maps (``StoreConfig.features``).
FEATURE_KEYS = ("features", "feature_shapes", "feature_strides")


def batch_keys(cfg: StoreConfig) -> tuple[str, ...]:
    """The tensor names of one stored batch (without the ``b{j}.`` shard prefix)."""
    base: tuple[str, ...] = _BASE_KEYS
    if cfg.class_topk:
        base = tuple(k for k in base if k != "logits") + class_keys(cfg.class_rest)
    if cfg.attention == "none":
        attn: tuple[str, ...] = ()
    elif cfg.attention == "full":
        attn = ("self_attn", "cross_attn")
    else:
        attn = ("self_attn.values", "self_attn.indices", "cross_attn.values", "cross_attn.indices")
    return base + attn + (FEATURE_KEYS if cfg.features else ())


def encode_batch(outputs: TeacherOutputs, image_index: Tensor, cfg: StoreConfig) -> dict[str, Tensor]:
    """Teacher outputs of one padded batch -> the tensors stored for it (on the outputs' device).

    Args:
        outputs: logits ``[L,B,N,C]``, boxes ``[L,B,N,4]``, reference_points ``[B,N,2]``, attention
            ``[L,B,H,N,N]`` / ``[L,B,H,N,S]`` (unless ``cfg.attention == "none"``), ``gt_assignment
            [B,N]`` (required: the cache replaces the teacher's Hungarian matching).
        image_index: ``[B]`` dataset indices of the batch, in batch order.
    Returns:
        ``logits`` (or with ``cfg.class_topk`` the ``logits.*`` tensors of :mod:`.class_codec`), ``boxes``,
        ``reference_points`` in ``cfg.dtype``; ``feature_size [2]`` int32;
        ``image_index [B]`` int64; ``gt_assignment [B,N]`` int64; attention keys of :func:`batch_keys`.
    """
    if outputs.gt_assignment is None:
        raise ValueError("TeacherOutputs.gt_assignment is None: the cache stores the teacher's last-layer "
                         "GT assignment; compute it (Hungarian matching on the batch targets) before encoding")
    L, B, N = outputs.logits.shape[:3]
    image_index = torch.as_tensor(image_index, dtype=torch.int64)
    if tuple(image_index.shape) != (B,):
        raise ValueError(f"image_index must be [B={B}], got shape {tuple(image_index.shape)}")
    if tuple(outputs.gt_assignment.shape) != (B, N):
        raise ValueError(f"gt_assignment must be [B={B},N={N}], got {tuple(outputs.gt_assignment.shape)}")
    h, w = (int(x) for x in outputs.feature_size)
    for name, maps, keys in (("self_attn", outputs.self_attn, N), ("cross_attn", outputs.cross_attn, h * w)):
        if maps is not None and cfg.attention != "none" and (maps.shape[:2] != (L, B) or maps.shape[3:] != (N, keys)):
            raise ValueError(f"{name} must be [L={L},B={B},H,N={N},{keys}], got {tuple(maps.shape)}")
    dt = cfg.torch_dtype
    wire = outputs.to_wire()  # the one wire format; stored with the cache's dtype and attention codec
    out = {k: wire[k].detach().to(dt).contiguous() for k in ("boxes", "reference_points")}
    if cfg.class_topk:
        out.update(encode_class_logits(wire["logits"], cfg.class_topk, cfg.class_rest, dt))
    else:
        out["logits"] = wire["logits"].detach().to(dt).contiguous()
    out["feature_size"] = wire["feature_size"]
    out["image_index"] = image_index.contiguous()
    out["gt_assignment"] = wire["gt_assignment"].detach().to(torch.int64).contiguous()
    out.update(encode_attention(wire.get("self_attn"), cfg, "self_attn"))
    out.update(encode_attention(wire.get("cross_attn"), cfg, "cross_attn"))
    if cfg.features:
        out.update(encode_features(outputs, dt))
    return out


def encode_features(outputs: TeacherOutputs, dtype: torch.dtype) -> dict[str, Tensor]:
    """The encoder output maps of one view (``B = 1``, each over the view's own grid) -> ``features
    [1,C,sum(h_l*w_l)]`` in ``dtype``, ``feature_shapes [n,2]`` and ``feature_strides [n]`` int32."""
    if outputs.features is None:
        raise ValueError("the cache stores the teacher's encoder feature maps (--features) but the teacher "
                         "returned none: run the teacher with features=True")
    maps = outputs.features
    if maps[0].shape[0] != 1:
        raise ValueError(f"encoder feature maps are stored per view (B = 1), got B = {maps[0].shape[0]}")
    if outputs.feature_grids is not None and any(
            tuple(int(x) for x in g) != tuple(m.shape[-2:]) for m, g in zip(maps, outputs.feature_grids[0])):
        raise ValueError("encoder feature maps must be over the view's own grid (TeacherOutputs.feature_grids)")
    return {"features": torch.cat([m.detach().flatten(2) for m in maps], -1).to(dtype).contiguous(),
            "feature_shapes": torch.tensor([list(m.shape[-2:]) for m in maps], dtype=torch.int32),
            "feature_strides": torch.tensor([int(s) for s in outputs.feature_strides], dtype=torch.int32)}


def decode_features(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Inverse of :func:`encode_features`: the wire keys ``features.<l>`` (``[1,C,h_l,w_l]`` float32) and
    ``feature_strides``."""
    flat = _get(tensors, "features").float()
    shapes = [(int(h), int(w)) for h, w in _get(tensors, "feature_shapes").tolist()]
    if sum(h * w for h, w in shapes) != flat.shape[-1]:
        raise ValueError(f"features: {flat.shape[-1]} stored positions, the shapes {shapes} say otherwise")
    wire: dict[str, Any] = {"feature_strides": _get(tensors, "feature_strides")}
    for level, part in enumerate(flat.split([h * w for h, w in shapes], -1)):
        wire[f"features.{level}"] = part.reshape(*flat.shape[:-1], *shapes[level])
    return wire


def decode_batch(tensors: Mapping[str, Tensor], cfg: StoreConfig, query_embed: Tensor) -> TeacherOutputs:
    """Stored tensors of one batch -> :class:`TeacherOutputs` (float32; attention ``None`` for ``none``).

    ``query_embed [N,d]`` is stored once per cache (``queries.safetensors``), not per batch. With
    ``cfg.class_topk`` the logits are rebuilt dense ``[L,B,N,C]`` (:func:`.class_codec.decode_class_logits`).
    """
    logits = decode_class_logits(tensors, cfg.class_rest) if cfg.class_topk else _get(tensors, "logits").float()
    n = logits.shape[2]
    if query_embed.shape[0] != n:
        raise ValueError(f"the cache's query_embed has {query_embed.shape[0]} queries, its batches {n}")
    h, w = (int(x) for x in _get(tensors, "feature_size").tolist())
    wire = {"logits": logits, "boxes": _get(tensors, "boxes").float(),
            "reference_points": _get(tensors, "reference_points").float(),
            "feature_size": _get(tensors, "feature_size"), "gt_assignment": _get(tensors, "gt_assignment").long()}
    for key, num_keys in (("self_attn", n), ("cross_attn", h * w)):
        maps = decode_attention(tensors, cfg, num_keys, key)
        if maps is not None:
            wire[key] = maps
    if cfg.features:
        wire.update(decode_features(tensors))
    return TeacherOutputs.from_wire(wire, query_embed)


# -------------------------------------------------------------------------------------------- sizes


def feature_bytes(channels: int, grids: Any, dtype: str = "float16") -> int:
    """Exact bytes of the encoder output maps stored for one view (``--features``): ``channels x sum(h*w)``
    values in ``dtype`` plus ``feature_shapes`` and ``feature_strides`` (int32). ``grids``: each level's
    ``(h, w)`` on the view (e.g. ``[(80, 80), (40, 40), (20, 20)]`` for a 640x640 input at strides 8/16/32)."""
    e = torch.empty((), dtype=DTYPES[dtype]).element_size()
    grids = [(int(h), int(w)) for h, w in grids]
    return channels * sum(h * w for h, w in grids) * e + len(grids) * (2 * 4 + 4)


def bytes_per_view(cfg: Union[StoreConfig, str], L: int = 6, N: int = 300, C: int = 91, H: int = 8,
                   S: int = 25 * 34, feature_channels: int = 256, feature_grids: Any = ((25, 34),)) -> int:
    """Exact bytes of the tensors stored for one image view (a batch of one image, ``B = 1``).

    Counts the tensor data of :func:`encode_batch` (``feature_size`` included), not the safetensors
    JSON header. Defaults are the official Conditional DETR R50 sizes: 6 layers, 300 queries,
    91 classes, 8 heads, ``S = 25 * 34`` C5 tokens for an 800x1066 input. ``cfg`` may be an
    ``--attention`` spec (fp16, mean heads, dense classes). With ``cfg.features``: plus the encoder output maps
    of ``feature_channels`` over ``feature_grids`` (:func:`feature_bytes`; default the C5 memory, ``d = 256``).
    """
    if isinstance(cfg, str):
        cfg = StoreConfig.parse(cfg)
    e = torch.empty((), dtype=cfg.torch_dtype).element_size()
    total = class_bytes(L, N, C, cfg.class_topk, cfg.class_rest, e)  # logits
    total += (L * N * 4 + N * 2) * e  # boxes, reference points
    total += 2 * 4 + 8 + N * 8  # feature_size int32 [2], image_index int64 [1], gt_assignment int64 [N]
    heads = 1 if cfg.heads == "mean" else H
    for keys in (N, S):  # self-attention, cross-attention
        if cfg.attention == "full":
            total += L * heads * N * keys * e
        elif cfg.attention == "topk":
            k = min(cfg.topk, keys)
            idx = torch.empty((), dtype=_index_dtype(keys)).element_size()
            total += L * heads * N * k * (e + idx)
    if cfg.features:
        total += feature_bytes(feature_channels, feature_grids, cfg.dtype)
    return total
