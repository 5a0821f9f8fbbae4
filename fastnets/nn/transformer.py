"""`TransformerEncoderLayer` and `TransformerEncoder`: torch.nn's (same constructors, attributes and
state_dicts), with the layer's pieces on fastnets kernels:
- self-attention: fastnets.nn.MultiheadAttention (flash attention, masks as broadcast views);
- post-norm (norm_first=False): norm1(x + sa(x)) and norm2(x + ff(x)) as one add + layer-norm
  pass each (fastnets.functional.layer_norm(..., residual=));
- pre-norm (norm_first=True): norm1(x), then the residual add and norm2 in one pass
  (fastnets.functional.add_layer_norm gives the sum for the residual stream and its norm);
- feed-forward: linear1 + bias + relu/gelu as fastnets.functional.linear_act (a matmul, then one
  fused bias + activation pass), dropout, linear2.
A custom activation callable (neither relu nor gelu) runs as stock linear1 then the callable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import transformer as _stock

from fastnets.nn.attention import MultiheadAttention
from fastnets.ops.bias_act import linear_act
from fastnets.ops.layer_norm import add_layer_norm, layer_norm


def _activation_name(activation) -> str | None:
    """"relu" or "gelu" (exact) for the activations the fused kernel applies, else None."""
    if isinstance(activation, str):
        return activation if activation in ("relu", "gelu") else None
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return "gelu"
    return None


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """Drop-in for torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048,
    dropout=0.1, activation=relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device=None, dtype=None): same submodules, parameters (initialized by torch's own
    code, so the same seed gives the same weights) and state_dict keys; forward(src, src_mask=None,
    src_key_padding_mask=None, is_causal=False) with torch's semantics, on fused kernels (see the
    module docstring). Stock PyTorch's nested-tensor fast path is not taken: padding is masked."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        # The stock self-attention module, parameters untouched, becomes the fastnets subclass
        # (which adds no state): weights and state_dict are exactly torch's.
        self.self_attn.__class__ = MultiheadAttention

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            a = self._sa_block(self._norm(self.norm1, x), src_mask, src_key_padding_mask, is_causal)
            x, h = add_layer_norm(a, x, self.norm2.normalized_shape, self.norm2.weight, self.norm2.bias,
                                  self.norm2.eps)  # x + a for the residual stream, and norm2 of it
            return x + self._ff_block(h)
        x = self._norm(self.norm1, self._sa_block(x, src_mask, src_key_padding_mask, is_causal), residual=x)
        return self._norm(self.norm2, self._ff_block(x), residual=x)

    @staticmethod
    def _norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x + residual) in one pass (the layer's own LayerNorm parameters and eps)."""
        return layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, residual=residual)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        act = _activation_name(self.activation)
        if act is not None:
            h = linear_act(x, self.linear1.weight, self.linear1.bias, act)
        else:
            h = self.activation(self.linear1(x))
        return self.dropout2(self.linear2(self.dropout(h)))


class TransformerEncoder(nn.TransformerEncoder):
    """Drop-in for torch.nn.TransformerEncoder(encoder_layer, num_layers, norm=None,
    enable_nested_tensor=True, mask_check=True): the same layer copies and state_dict; forward(src,
    mask=None, src_key_padding_mask=None, is_causal=None) with torch's semantics (its causal-mask
    detection included) but without the nested-tensor conversion, which would bypass the layers'
    kernels: padding is masked inside attention instead. Give it a fastnets TransformerEncoderLayer
    for the fused path (a stock layer runs as stock)."""

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(mask), other_name="mask",
                                                 target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
                                 check_other=False)
        first = self.layers[0]
        batch_first = first.self_attn.batch_first if hasattr(first, "self_attn") else False
        seq_len = _stock._get_seq_len(src, batch_first)
        is_causal = _stock._detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output
