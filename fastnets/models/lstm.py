"""An LSTM text classifier (no torchvision counterpart).

There is no LSTM kernel in this project: the recurrence is torch's nn.LSTM (cuDNN on a GPU).
fastnets runs the classifier head (linear + relu as one linear_act).

Shapes (N = batch, L = sequence length, E = embed_dim, H = hidden_size, d = 2 if bidirectional):
    tokens                             N x L (int64; padding_idx marks padding, at the end)
    embedding, dropout                 N x L x E
    nn.LSTM over the packed lengths    final hidden state per direction: N x dH
    dropout, fc1 + relu                N x H
    fc2                                N x num_classes
Every sequence needs at least one non-padding token (torch's pack_padded_sequence rejects empty
ones).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fastnets import functional as FF
from fastnets.models import _common as C

__all__ = ["LSTMClassifier", "lstm_classifier"]


class LSTMClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128, hidden_size: int = 256,
                 num_layers: int = 2, bidirectional: bool = True, dropout: float = 0.3, padding_idx: int = 0, *,
                 fused: bool = True):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_classes", num_classes), ("embed_dim", embed_dim),
                            ("hidden_size", hidden_size), ("num_layers", num_layers)):
            C.check_int(value, name)
        C.check_probability(dropout, "dropout")
        if not (isinstance(padding_idx, int) and 0 <= padding_idx < vocab_size):
            raise ValueError(f"padding_idx must be a token id in [0, {vocab_size}), got {padding_idx!r}")
        self.padding_idx, self.bidirectional, self.fused = padding_idx, bool(bidirectional), fused
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True, bidirectional=self.bidirectional,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden_size * (2 if self.bidirectional else 1), hidden_size)
        self.fc2 = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError("tokens must be an integer tensor of shape (batch, sequence)")
        lengths = (tokens != self.padding_idx).sum(1)
        x = self.dropout(self.embedding(tokens))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)                              # h: (layers * d) x N x H
        h = torch.cat([h[-2], h[-1]], 1) if self.bidirectional else h[-1]
        h = self.dropout(h)
        if self.fused:
            h = FF.linear_act(h, self.fc1.weight, self.fc1.bias, "relu")
        else:
            h = F.relu(self.fc1(h))
        return self.fc2(h)


def lstm_classifier(vocab_size: int = 30522, num_classes: int = 2, **kwargs) -> LSTMClassifier:
    """A 2-layer bidirectional LSTM text classifier."""
    return LSTMClassifier(vocab_size, num_classes, **kwargs)
