"""A text classifier on a Transformer encoder (no torchvision counterpart): token and learned
position embeddings, a stack of Transformer encoder layers (BERT-style, pre-norm by default),
mean pooling over the non-padding tokens, a linear classifier.

Shapes (N = batch, L = sequence length <= max_len, D = d_model):
    tokens                                     N x L (int64; padding_idx marks padding)
    embedding + pos_embedding[:, :L], dropout  N x L x D
    num_layers x TransformerEncoderLayer       N x L x D      (padding masked out of attention)
    norm (pre-norm only)                       N x L x D
    mean over non-padding tokens               N x D
    classifier                                 N x num_classes

Fused: the layers are fastnets.nn.TransformerEncoderLayer (flash attention, fused add +
layer-norm, linear + activation), the final norm fastnets.nn.LayerNorm. Stock (fused=False): the
same modules from torch.nn, same state_dict. Every sequence needs at least one non-padding token
(a fully padded row has nothing to attend to and nothing to average; torch gives NaN there).
"""
from __future__ import annotations

import torch
from torch import nn

from fastnets.models import _common as C

__all__ = ["TextTransformerClassifier", "text_transformer"]


class TextTransformerClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 256, nhead: int = 8, num_layers: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.1, max_len: int = 512, padding_idx: int = 0,
                 activation: str = "gelu", norm_first: bool = True, layer_norm_eps: float = 1e-5, *,
                 fused: bool = True):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_classes", num_classes), ("d_model", d_model),
                            ("nhead", nhead), ("num_layers", num_layers), ("dim_feedforward", dim_feedforward),
                            ("max_len", max_len)):
            C.check_int(value, name)
        C.check_probability(dropout, "dropout")
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        if not (isinstance(padding_idx, int) and 0 <= padding_idx < vocab_size):
            raise ValueError(f"padding_idx must be a token id in [0, {vocab_size}), got {padding_idx!r}")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        L = C.layers(fused)
        self.padding_idx, self.max_len, self.norm_first = padding_idx, max_len, bool(norm_first)
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.pos_embedding = nn.Parameter(torch.empty(1, max_len, d_model).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            L.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                      batch_first=True, norm_first=norm_first)
            for _ in range(num_layers))
        self.norm = L.LayerNorm(d_model, eps=layer_norm_eps) if norm_first else None
        self.classifier = nn.Linear(d_model, num_classes)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[padding_idx].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError("tokens must be an integer tensor of shape (batch, sequence), got "
                             f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__} "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else ''}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_len {self.max_len}")
        padding = tokens == self.padding_idx                      # N x L, True at padding
        x = self.dropout(self.embedding(tokens) + self.pos_embedding[:, :tokens.shape[1]])
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        if self.norm is not None:
            x = self.norm(x)
        keep = (~padding).unsqueeze(-1).to(x.dtype)               # N x L x 1
        pooled = (x * keep).sum(1) / keep.sum(1)
        return self.classifier(pooled)


def text_transformer(vocab_size: int = 30522, num_classes: int = 2, **kwargs) -> TextTransformerClassifier:
    """A Transformer encoder text classifier (defaults: BERT's vocabulary size, 2 classes, 4 layers
    of width 256)."""
    return TextTransformerClassifier(vocab_size, num_classes, **kwargs)
