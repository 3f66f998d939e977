"""Multi-head attention on already-projected queries/keys/values (Conditional DETR decoder).

The official decoder attention has no in-projections (the ``sa_*``/``ca_*`` linears are applied
outside) and only an ``out_proj``; it returns weights averaged over heads *after* dropout. For
distillation we return the per-head probabilities *before* dropout instead; the attention output
itself is computed exactly as in the official module (same scaling, masking, dropout placement).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConditionalAttention"]


class ConditionalAttention(nn.Module):
    """Attention without input projections.

    Args:
        embed_dim: width ``E`` of queries and keys (``2d`` in the conditional cross-attention,
            where content and spatial parts are concatenated per head).
        num_heads: ``H``; the per-head query/key width is ``E/H`` and logits are scaled by
            ``(E/H)^-0.5``.
        dropout: dropout on the attention probabilities (training only).
        vdim: width of values and of the output (``out_proj`` is ``Linear(vdim, vdim)``).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, vdim: Optional[int] = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout = dropout
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim or self.vdim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} and vdim={self.vdim} must be divisible by num_heads={num_heads}")
        self.out_proj = nn.Linear(self.vdim, self.vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            query: ``[Q, B, E]``; key: ``[S, B, E]``; value: ``[S, B, vdim]`` (sequence-first, as official).
            key_padding_mask: ``[B, S]`` bool, True = ignore this key.
            need_weights: also return the probabilities.

        Returns:
            ``(output [Q, B, vdim], probs [B, H, Q, S] or None)``; ``probs`` are per head, before
            dropout, rows sum to 1 and masked keys are exactly 0.
        """
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim or key.shape[2] != self.embed_dim or value.shape[2] != self.vdim:
            raise ValueError(
                f"attention widths: query {embed_dim}, key {key.shape[2]}, value {value.shape[2]} "
                f"vs embed_dim {self.embed_dim}, vdim {self.vdim}"
            )
        h = self.num_heads
        v_head_dim = self.vdim // h
        q = query * float(self.head_dim) ** -0.5
        q = q.contiguous().view(tgt_len, bsz * h, self.head_dim).transpose(0, 1)
        k = key.contiguous().view(src_len, bsz * h, self.head_dim).transpose(0, 1)
        v = value.contiguous().view(src_len, bsz * h, v_head_dim).transpose(0, 1)

        logits = torch.bmm(q, k.transpose(1, 2))  # [B*H, Q, S]
        if key_padding_mask is not None:
            logits = logits.view(bsz, h, tgt_len, src_len).masked_fill(
                key_padding_mask[:, None, None, :], float("-inf")
            ).view(bsz * h, tgt_len, src_len)
        probs = torch.softmax(logits, dim=-1)
        dropped = F.dropout(probs, p=self.dropout, training=self.training)
        out = torch.bmm(dropped, v)  # [B*H, Q, vdim/H]
        out = out.transpose(0, 1).contiguous().view(tgt_len, bsz, self.vdim)
        out = self.out_proj(out)
        weights = probs.view(bsz, h, tgt_len, src_len) if need_weights else None
        return out, weights
