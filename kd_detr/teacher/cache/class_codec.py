"""How a cache stores the teacher's class logits: dense, or each query's top-k classes (soft labels).

Without attention maps the class logits dominate a cached view (official sizes: 6 layers x 300 queries x
91 classes fp16 = 0.33 MB), though almost every sigmoid score of a query is near zero. ``topk:k`` keeps,
per query and layer, the ``k`` largest logits (store dtype) with their class indices (``uint8`` when
``C <= 256``, else ``int16``; ``int32`` from 32768 classes) and one way to rebuild the other ``C - k``:

* ``floor``: nothing stored; they decode to the fixed logit :data:`FLOOR_LOGIT` (probability ~2e-9);
* ``mean_logit``: one ``rest`` logit per query and layer, the mean of its non-top-k logits;
* ``mean_prob``: one ``rest`` logit per query and layer, ``logit(mean(sigmoid(non-top-k logits)))``
  (the mean probability of the other classes, so their summed probability mass is kept).

Decoding rebuilds dense ``[L,B,N,C]`` float32 logits (top-k at their indices, the rest value elsewhere),
so the methods see the same tensors as from a dense cache. With ``k >= C`` every class is a top-k class
and the decode equals the dense cache's exactly.

Stored tensors (``topk`` only; a dense cache stores ``logits [L,B,N,C]`` as before):
``logits.values [L,B,N,k']`` (store dtype, largest first), ``logits.indices [L,B,N,k']``, ``logits.classes
[1]`` int32 (``C``: a batch decodes without the manifest), and ``logits.rest [L,B,N]`` (store dtype) for
``mean_logit`` / ``mean_prob``; ``k' = min(k, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLASS_REST_SCHEMES", "DEFAULT_CLASS_REST", "FLOOR_LOGIT", "class_index_dtype", "class_keys",
           "rest_logit", "encode_class_logits", "decode_class_logits", "class_bytes"]

CLASS_REST_SCHEMES = ("floor", "mean_logit", "mean_prob")
# Chosen by benchmarks/cache_class_topk.py (docs/teacher_cache.md): the smallest error of the D3ETR
# class KD term and of the total prediction KD at every k on the quickstart teacher's logits.
DEFAULT_CLASS_REST = "mean_prob"
# sigmoid(-20) ~ 2.1e-9: "probability 0" for a soft label, and exact in float16.
FLOOR_LOGIT = -20.0
# rest logits are clamped to +-_REST_CLAMP (a mean probability that under/overflows stays finite).
_REST_CLAMP = 30.0


def class_index_dtype(num_classes: int) -> torch.dtype:
    """``uint8`` for up to 256 classes, ``int16`` below 32768, else ``int32``."""
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes < 32768 else torch.int32


def class_keys(rest: str) -> tuple[str, ...]:
    """The tensor names a ``topk`` class store adds to a batch (instead of ``logits``)."""
    keys = ("logits.values", "logits.indices", "logits.classes")
    return keys + (("logits.rest",) if rest != "floor" else ())


def rest_logit(logits: Tensor, top_idx: Tensor, rest: str) -> Tensor:
    """The one logit standing for the non-top-k classes of each row: ``[..., C]``, ``top_idx [..., k]`` ->
    ``[...]`` float32. ``floor``: :data:`FLOOR_LOGIT`; ``mean_logit``: the mean of the other logits;
    ``mean_prob``: the logit of the mean of their sigmoids (computed in log space, stable for very
    negative logits). Rows with no other class (``k == C``) get :data:`FLOOR_LOGIT` (never used)."""
    if rest not in CLASS_REST_SCHEMES:
        raise ValueError(f"class rest scheme must be one of {CLASS_REST_SCHEMES}, got {rest!r}")
    x = logits.float()
    num_classes, k = x.shape[-1], top_idx.shape[-1]
    n_rest = num_classes - k
    if rest == "floor" or n_rest <= 0:
        return x.new_full(x.shape[:-1], FLOOR_LOGIT)
    is_top = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, top_idx.long(), True)
    if rest == "mean_logit":
        return x.masked_fill(is_top, 0.0).sum(-1) / n_rest
    # log mean sigmoid(x) and log mean sigmoid(-x) over the other classes; their difference is logit(mean p)
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    log_p = torch.where(is_top, neg_inf, F.logsigmoid(x)).logsumexp(-1) - math.log(n_rest)
    log_1mp = torch.where(is_top, neg_inf, F.logsigmoid(-x)).logsumexp(-1) - math.log(n_rest)
    return (log_p - log_1mp).clamp(-_REST_CLAMP, _REST_CLAMP)


def encode_class_logits(logits: Tensor, k: int, rest: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """``logits [L,B,N,C]`` -> the ``topk`` class tensors (see the module docstring), on ``logits``' device.

    Top-k by logit (= by probability), largest first (``torch.topk``); ``k' = min(k, C)``. The rest
    logit is computed from the float32 logits, then cast to ``dtype``.
    """
    if k < 1:
        raise ValueError(f"class topk needs k >= 1, got {k}")
    if rest not in CLASS_REST_SCHEMES:
        raise ValueError(f"class rest scheme must be one of {CLASS_REST_SCHEMES}, got {rest!r}")
    if logits.dim() != 4:
        raise ValueError(f"logits: expected [L,B,N,C], got shape {tuple(logits.shape)}")
    x = logits.detach()
    num_classes = x.shape[-1]
    kk = min(int(k), num_classes)
    values, indices = torch.topk(x.float(), kk, dim=-1, largest=True, sorted=True)
    out = {"logits.values": values.to(dtype).contiguous(),
           "logits.indices": indices.to(class_index_dtype(num_classes)).contiguous(),
           "logits.classes": torch.tensor([num_classes], dtype=torch.int32)}
    if rest != "floor":
        out["logits.rest"] = rest_logit(x, indices, rest).to(dtype).contiguous()
    return out


def _get(tensors: Mapping[str, Tensor], key: str) -> Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise KeyError(f"stored teacher batch has no tensor {key!r} (has: {sorted(tensors)})") from None


def decode_class_logits(tensors: Mapping[str, Tensor], rest: str) -> Tensor:
    """Inverse of :func:`encode_class_logits`: dense ``[L,B,N,C]`` float32 logits, the stored top-k
    values at their class indices and the rest value (``FLOOR_LOGIT`` or the stored ``logits.rest``)
    everywhere else."""
    values = _get(tensors, "logits.values").float()
    indices = _get(tensors, "logits.indices").long()
    num_classes = int(_get(tensors, "logits.classes").reshape(-1)[0])
    if values.shape != indices.shape:
        raise ValueError(f"logits: values {tuple(values.shape)} and indices {tuple(indices.shape)} differ")
    if indices.numel() and (int(indices.max()) >= num_classes or int(indices.min()) < 0):
        raise ValueError(f"logits: stored class indices outside [0, {num_classes})")
    if rest == "floor":
        dense = values.new_full((*values.shape[:-1], num_classes), FLOOR_LOGIT)
    else:
        fill = _get(tensors, "logits.rest").float()
        if fill.shape != values.shape[:-1]:
            raise ValueError(f"logits.rest {tuple(fill.shape)} does not match values {tuple(values.shape)}")
        dense = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).contiguous()
    return dense.scatter_(-1, indices, values)


def class_bytes(L: int, N: int, C: int, k: int, rest: str, element_size: int) -> int:
    """Bytes of the class tensors of one image view (``B = 1``): dense (``k == 0``) or ``topk:k``."""
    if k == 0:
        return L * N * C * element_size
    kk = min(k, C)
    idx = torch.empty((), dtype=class_index_dtype(C)).element_size()
    total = L * N * kk * (element_size + idx) + 4  # values, indices, classes int32 [1]
    if rest != "floor":
        total += L * N * element_size
    return total
