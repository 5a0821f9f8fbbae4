"""`MultiheadAttention`: torch.nn.MultiheadAttention (same constructor, attributes, state_dict and
forward arguments) whose attention runs on fastnets' flash-attention kernels
(fastnets.functional.scaled_dot_product_attention) whenever no attention weights are asked for."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastnets.ops.attention import scaled_dot_product_attention


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True,
    add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
    dtype=None).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) has torch's semantics: batch_first or not,
    unbatched inputs, boolean or float key_padding_mask ([N, S]) and attn_mask ([L, S] or
    [N * num_heads, L, S]), kdim/vdim (separate projections), the is_causal hint, dropout in
    training. With need_weights=False it runs the in-projection (one matmul when query, key and
    value are the same tensor), the flash-attention kernels (masks passed as broadcast views, never
    expanded to N * num_heads copies) and the out-projection.

    The stock torch path runs instead (torch's exact code) where the kernels do not apply:
    need_weights=True (torch's default: the weights matrix is the output asked for),
    add_bias_kv=True, add_zero_attn=True, and nested-tensor inputs.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (need_weights or self.bias_k is not None or self.bias_v is not None or self.add_zero_attn
                or any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value))):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._flash_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _flash_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        # torch's own checks and mask canonicalization (bool masks become -inf float masks in the
        # query's dtype), as nn.MultiheadAttention.forward and F.multi_head_attention_forward do.
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint says attn_mask is the causal mask: the kernels apply it themselves
        else:
            is_causal = False

        same_qkv, same_kv = query is key and key is value, key is value
        # Everything below works batch-first: [N, L, E].
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S = key.shape[1]
        H = self.num_heads
        hd = E // H
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")

        q, k, v = self._in_projection(query, key, value, same_qkv, same_kv)
        # [N, L, E] -> [N, H, L, hd]: strided views, the kernels read them as they are.
        q = q.view(N, L, H, hd).transpose(1, 2)
        k = k.view(N, S, H, hd).transpose(1, 2)
        v = v.view(N, S, H, hd).transpose(1, 2)

        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                mask = attn_mask  # broadcast over batch and heads by strides
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (N * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(N * H, L, S)}.")
                mask = attn_mask.view(N, H, L, S)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, S, N)
            kpm = key_padding_mask.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm

        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(N, L, E)  # the kernels lay the output out as [N, L, H, hd]: a view
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def _in_projection(self, query, key, value, same_qkv: bool, same_kv: bool):
        """The q, k, v projections, as F.multi_head_attention_forward computes them."""
        E = self.embed_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if same_qkv:  # self-attention: one matmul, three views of its output
            qkv = F.linear(query, w, b)
            return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        if same_kv:
            q = F.linear(query, w[:E], b[:E] if b is not None else None)
            kv = F.linear(key, w[E:], b[E:] if b is not None else None)
            return q, kv[..., :E], kv[..., E:]
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        wq, wk, wv = w.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
