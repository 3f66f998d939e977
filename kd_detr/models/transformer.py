"""Conditional DETR transformer: post-norm encoder and conditional decoder, with query groups.

Module and parameter names equal the official ones (``encoder.layers.i.self_attn.in_proj_weight``,
``decoder.layers.i.sa_qcontent_proj``, ``decoder.query_scale.layers.0`` ...), so official state
dicts load without renaming. Internally tensors are sequence-first (``[N, B, d]``) like the official
code; the public outputs are batch-first.

Query groups: the decoder can run several query groups through the same weights at once. Only the
decoder self-attention mixes queries, so it runs separately per group (a group never sees another
group's queries, and the primary group's self-attention is computed exactly as without groups);
all other decoder operations act per query and run on the concatenation.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import ConditionalAttention
from .position_encoding import sine_embed_points

__all__ = ["MLP", "Transformer", "TransformerEncoder", "TransformerEncoderLayer",
           "TransformerDecoder", "TransformerDecoderLayer"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (official ``MLP``; keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation should be relu or gelu, not {name!r}")


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: ``x = norm1(x + SA(x+pos, x+pos, x)); x = norm2(x + FFN(x))``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor], pos: Tensor) -> Tensor:
        """``src, pos [S,B,d]``, ``src_key_padding_mask [B,S]`` -> ``[S,B,d]``."""
        q = k = src + pos
        # need_weights=False lets torch use its fused attention kernel; the maps are not needed here.
        src2 = self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    """Stack of encoder layers; no final norm (official post-norm setting)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor], pos: Tensor) -> Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_key_padding_mask, pos)
        return out


class TransformerDecoderLayer(nn.Module):
    """Conditional DETR decoder layer (post-norm).

    Self-attention: ``q = W_qc f + W_qp o``, ``k = W_kc f + W_kp o``, ``v = W_v f``.
    Cross-attention: per head, the content part ``W'_qc f`` (``+ W'_qp o`` in the first layer only)
    is concatenated with the spatial part ``W_sine p_q``; keys concatenate ``W'_kc m`` (``+ W'_kp P``
    in the first layer only) with ``W'_kp P``. ``ca_qpos_proj`` exists in the first layer only
    (the official decoder sets it to ``None`` elsewhere).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ConditionalAttention(d_model, nhead, dropout=dropout, vdim=d_model)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj: Optional[nn.Linear] = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ConditionalAttention(d_model * 2, nhead, dropout=dropout, vdim=d_model)

        self.nhead = nhead
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor],
                pos: Tensor, query_pos: Tensor, query_sine_embed: Tensor, is_first: bool,
                group_sizes: Optional[Sequence[int]] = None, need_weights: bool = False,
                ) -> tuple[Tensor, Optional[list[Tensor]], Optional[Tensor]]:
        """
        Args:
            tgt, query_pos, query_sine_embed: ``[N,B,d]`` (all groups concatenated along ``N``).
            memory, pos: ``[S,B,d]``; memory_key_padding_mask: ``[B,S]`` True = pad.
            group_sizes: sizes of the concatenated query groups (``None``: one group).

        Returns:
            ``(tgt [N,B,d], self-attention maps (one ``[B,H,Ng,Ng]`` per group) or None,
            cross-attention map ``[B,H,N,S]`` or None, candidates [N,B,d])``: the candidates are the
            features after cross-attention, before the FFN.
        """
        # ---- self-attention (within each query group) ----
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        v = self.sa_v_proj(tgt)
        if group_sizes is None or len(group_sizes) == 1:
            tgt2, sa_w = self.self_attn(q, k, v, need_weights=need_weights)
            sa_maps = [sa_w] if need_weights else None
        else:
            outs, sa_maps = [], ([] if need_weights else None)
            start = 0
            for size in group_sizes:
                sl = slice(start, start + size)
                o, w = self.self_attn(q[sl], k[sl], v[sl], need_weights=need_weights)
                outs.append(o)
                if need_weights:
                    sa_maps.append(w)
                start += size
            tgt2 = torch.cat(outs, dim=0)
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        # ---- conditional cross-attention ----
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        num_queries, bs, d = q_content.shape
        hw = k_content.shape[0]
        k_pos = self.ca_kpos_proj(pos)
        if is_first:
            # Only the first layer adds the positional query/key terms to the content parts
            # (later layers carry position through the concatenated spatial part only).
            q = q_content + self.ca_qpos_proj(query_pos)
            k = k_content + k_pos
        else:
            q, k = q_content, k_content
        hd = d // self.nhead
        q = q.view(num_queries, bs, self.nhead, hd)
        sine = self.ca_qpos_sine_proj(query_sine_embed).view(num_queries, bs, self.nhead, hd)
        q = torch.cat([q, sine], dim=3).view(num_queries, bs, d * 2)
        k = k.view(hw, bs, self.nhead, hd)
        k_pos = k_pos.view(hw, bs, self.nhead, hd)
        k = torch.cat([k, k_pos], dim=3).view(hw, bs, d * 2)
        tgt2, ca_map = self.cross_attn(q, k, v, key_padding_mask=memory_key_padding_mask,
                                       need_weights=need_weights)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        candidates = tgt  # the object candidates cross-attention just produced (MS-DETR supervises these)

        # ---- FFN ----
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        return tgt, sa_maps, ca_map, candidates


class TransformerDecoder(nn.Module):
    """Conditional decoder: fixed reference points, ``query_scale`` on p_s, shared final ``norm``."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int = 256,
                 temperature: int = 10000):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)
        self.d_model = d_model
        self.temperature = temperature
        for layer_id in range(1, num_layers):
            self.layers[layer_id].ca_qpos_proj = None

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor], pos: Tensor,
                query_pos: Tensor, reference_points: Tensor, group_sizes: Optional[Sequence[int]] = None,
                need_weights: bool = False, return_candidates: bool = False) -> dict[str, Any]:
        """
        Args:
            tgt, query_pos: ``[N,B,d]``; memory, pos: ``[S,B,d]``; memory_key_padding_mask ``[B,S]``.
            reference_points: ``[N,B,2]`` in sigmoid space ``(x, y)``.
            return_candidates: also return each layer's features after cross-attention (before the FFN).

        Returns dict: ``hs [L,N,B,d]`` (every layer's output through the shared final norm),
        ``self_attn``: per layer a list of per-group ``[B,H,Ng,Ng]`` maps, ``cross_attn``: per layer
        ``[B,H,N,S]`` (both only with ``need_weights``); with ``return_candidates``: ``candidates
        [L,N,B,d]`` (raw, not through the final norm).
        """
        # Reference points are fixed across layers, so the sine embedding is computed once.
        sine = sine_embed_points(reference_points, self.d_model // 2, self.temperature)
        output = tgt
        intermediate, sa_all, ca_all, candidates = [], [], [], []
        for layer_id, layer in enumerate(self.layers):
            # The first layer uses p_s as is; later layers scale it by an MLP of the raw (un-normed)
            # previous output, as the official decoder does.
            query_sine_embed = sine if layer_id == 0 else sine * self.query_scale(output)
            output, sa, ca, cand = layer(output, memory, memory_key_padding_mask, pos, query_pos, query_sine_embed,
                                   is_first=layer_id == 0, group_sizes=group_sizes, need_weights=need_weights)
            intermediate.append(self.norm(output))
            if return_candidates:
                candidates.append(cand)
            if need_weights:
                sa_all.append(sa)
                ca_all.append(ca)
        out = {"hs": torch.stack(intermediate), "self_attn": sa_all, "cross_attn": ca_all}
        if return_candidates:
            out["candidates"] = torch.stack(candidates)
        return out


class Transformer(nn.Module):
    """Encoder + conditional decoder; all matrices Xavier-uniform initialised (official)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", temperature: int = 10000):
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, d_model, temperature)
        self.d_model = d_model
        self.nhead = nhead
        self.dec_layers = num_decoder_layers
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _group_inputs(self, group: dict[str, Tensor], bs: int, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Validate one extra group; returns sequence-first ``(content, pos, reference)``."""
        d = self.d_model
        unknown = set(group) - {"query_pos", "query_content", "reference_points"}
        if unknown or "query_pos" not in group:
            raise ValueError(f"extra_groups[{index}] needs 'query_pos' (optional 'query_content', "
                             f"'reference_points'); got keys {sorted(group)}")
        qp = group["query_pos"]
        if qp.dim() == 2 and qp.shape[1] == d:
            qp = qp.unsqueeze(1).repeat(1, bs, 1)
        elif qp.dim() == 3 and qp.shape[0] == bs and qp.shape[2] == d:
            qp = qp.transpose(0, 1)
        else:
            raise ValueError(f"extra_groups[{index}]['query_pos'] must be [N,{d}] or [{bs},N,{d}], "
                             f"got {list(qp.shape)}")
        n = qp.shape[0]
        content = group.get("query_content")
        if content is None:
            content = torch.zeros_like(qp)
        else:
            if list(content.shape) != [bs, n, d]:
                raise ValueError(f"extra_groups[{index}]['query_content'] must be [{bs},{n},{d}], "
                                 f"got {list(content.shape)}")
            content = content.transpose(0, 1)
        ref = group.get("reference_points")
        if ref is None:
            ref = self.decoder.ref_point_head(qp).sigmoid()
        else:
            if list(ref.shape) != [bs, n, 2]:
                raise ValueError(f"extra_groups[{index}]['reference_points'] must be [{bs},{n},2], "
                                 f"got {list(ref.shape)}")
            ref = ref.transpose(0, 1)
        return content, qp, ref

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                extra_groups: Optional[Sequence[dict[str, Tensor]]] = None,
                return_attn: bool = False, return_memory: bool = False,
                return_candidates: bool = False) -> dict[str, Any]:
        """
        Args:
            src: projected C5 features ``[B,d,h,w]``; mask: ``[B,h,w]`` True = pad;
            query_embed: ``[Q,d]`` positional queries of the primary group (``None``: only the extra
                groups, e.g. a decoder pass of auxiliary queries); pos_embed ``[B,d,h,w]``;
            extra_groups: see :meth:`ConditionalDETR.forward`.
            return_memory: also return ``memory [S,B,d]`` and ``pos_embed [S,B,d]`` (encoder output).
            return_candidates: also return ``candidates [L,B,N,d]`` (see :class:`TransformerDecoder`).

        Returns dict: ``hs [L,B,N,d]``, ``reference_points [B,N,2]`` (N = all groups concatenated,
        primary first), ``group_sizes``, ``memory_mask [B,S]`` and with ``return_attn``
        ``self_attn`` (one ``[L,B,H,Ng,Ng]`` per group) and ``cross_attn [L,B,H,N,S]``.
        """
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos_embed)
        out = self.decode(memory, mask, pos_embed, query_embed, extra_groups, return_attn, return_candidates)
        if return_memory:
            out["memory"], out["pos_embed"] = memory, pos_embed
        return out

    def decode(self, memory: Tensor, mask: Tensor, pos_embed: Tensor, query_embed: Optional[Tensor],
               extra_groups: Optional[Sequence[dict[str, Tensor]]] = None, return_attn: bool = False,
               return_candidates: bool = False) -> dict[str, Any]:
        """The decoder on given encoder output ``memory [S,B,d]`` (``mask [B,S]``, ``pos_embed [S,B,d]``).

        Same outputs as :meth:`forward` (without ``memory``); ``query_embed=None`` runs the extra
        groups only.
        """
        bs = memory.shape[1]
        contents, poses, refs, group_sizes = [], [], [], []
        if query_embed is not None:
            query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
            contents.append(torch.zeros_like(query_pos))
            poses.append(query_pos)
            refs.append(self.decoder.ref_point_head(query_pos).sigmoid())
            group_sizes.append(query_pos.shape[0])
        for i, group in enumerate(extra_groups or []):
            c, p, r = self._group_inputs(group, bs, i)
            dtype = memory.dtype if not contents else contents[0].dtype
            contents.append(c.to(dtype))
            poses.append(p.to(dtype))
            refs.append(r.to(refs[0].dtype if refs else r.dtype))
            group_sizes.append(p.shape[0])
        if not group_sizes:
            raise ValueError("decode needs query_embed or at least one extra group")
        if len(group_sizes) == 1:
            tgt, query_pos, reference = contents[0], poses[0], refs[0]
        else:
            tgt, query_pos, reference = torch.cat(contents), torch.cat(poses), torch.cat(refs)
        dec = self.decoder(tgt, memory, mask, pos_embed, query_pos, reference,
                           group_sizes=group_sizes, need_weights=return_attn, return_candidates=return_candidates)
        out: dict[str, Any] = {
            "hs": dec["hs"].transpose(1, 2).contiguous(),
            "reference_points": reference.transpose(0, 1).contiguous(),
            "group_sizes": group_sizes,
            "memory_mask": mask,
        }
        if return_attn:
            out["self_attn"] = [torch.stack([layer_maps[g] for layer_maps in dec["self_attn"]])
                                for g in range(len(group_sizes))]
            out["cross_attn"] = torch.stack(dec["cross_attn"])
        if return_candidates:
            out["candidates"] = dec["candidates"].transpose(1, 2).contiguous()
        return out
