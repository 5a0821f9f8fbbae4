"""Vision Transformer ViT-B/16 (Dosovitskiy et al., 2020), torchvision's arguments and state_dict keys.

Shapes at a 224x224 input, ViT-B/16 (D = hidden_dim = 768, 12 heads, MLP 3072, 12 layers):
    input                                      N x 3 x 224 x 224
    conv_proj 16x16/16 (patch embedding)       N x D x 14 x 14  ->  N x 196 x D
    prepend class_token                        N x 197 x D
    + encoder.pos_embedding, dropout           N x 197 x D
    12 x encoder block                         N x 197 x D
        ln_1, self-attention (12 heads), dropout, + input      flash attention
        ln_2, mlp (fc 3072 gelu, dropout, fc D, dropout), + x   fused add + layer-norm; fc + gelu
    encoder.ln                                 N x 197 x D
    class token, heads.head                    N x num_classes

Fused: the layer-norms are fastnets LayerNorm, the attention fastnets MultiheadAttention (flash
attention kernels), the residual add and ln_2 one fastnets add_layer_norm, the MLP's first linear +
GELU one linear_act.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from fastnets import functional as FF
from fastnets.models import _common as C

__all__ = ["VisionTransformer", "EncoderBlock", "Encoder", "vit_b_16"]


class MLPBlock(nn.Sequential):
    """fc -> GELU -> dropout -> fc -> dropout (keys 0.*, 3.*), torchvision's initialization."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        """Checkpoints from before torchvision's MLPBlock version 2 name the linears linear_1 and
        linear_2 (now 0 and 3)."""
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            for i in range(2):
                for kind in ("weight", "bias"):
                    old = f"{prefix}linear_{i + 1}.{kind}"
                    if old in state_dict:
                        state_dict[f"{prefix}{3 * i}.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def fused_forward(self, x):
        """The same as forward, with fc + GELU as one fastnets linear_act."""
        fc1, _, drop1, fc2, drop2 = self
        return drop2(fc2(drop1(FF.linear_act(x, fc1.weight, fc1.bias, "gelu"))))


class EncoderBlock(nn.Module):
    """Pre-norm Transformer block: x = input + attn(ln_1(input)); return x + mlp(ln_2(x))."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 eps: float = 1e-6, *, fused: bool = True):
        super().__init__()
        L = C.layers(fused)
        self.num_heads = num_heads
        self.ln_1 = L.LayerNorm(hidden_dim, eps=eps)
        self.self_attention = L.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = L.LayerNorm(hidden_dim, eps=eps)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)
        self.fused = fused

    def forward(self, input: torch.Tensor):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        if self.fused:
            ln = self.ln_2
            x, y = FF.add_layer_norm(x, input, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            return x + self.mlp.fused_forward(y)
        x = x + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                 eps: float = 1e-6, *, fused: bool = True):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))  # as BERT
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout, eps,
                                                fused=fused))
            for i in range(num_layers)))
        self.ln = C.layers(fused).LayerNorm(hidden_dim, eps=eps)

    def forward(self, input: torch.Tensor):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


def _layer_norm_eps(norm_layer) -> float:
    probe = norm_layer(1, device="meta") if callable(norm_layer) else None
    if type(probe) is not nn.LayerNorm:
        raise ValueError("norm_layer: fastnets' ViT runs nn.LayerNorm as a fastnets kernel; pass nn.LayerNorm or a "
                         f"functools.partial of it, got {norm_layer!r}")
    return probe.eps


class VisionTransformer(nn.Module):
    """torchvision's VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim,
    mlp_dim, dropout, attention_dropout, num_classes, representation_size, norm_layer,
    conv_stem_configs) plus keyword-only `fused`. norm_layer: nn.LayerNorm or a partial of it;
    conv_stem_configs: only None (the patch-embedding conv)."""

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0, num_classes: int = 1000,
                 representation_size: int | None = None, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 conv_stem_configs=None, *, fused: bool = True):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("hidden_dim", hidden_dim), ("mlp_dim", mlp_dim),
                            ("num_classes", num_classes)):
            C.check_int(value, name)
        C.check_probability(dropout, "dropout")
        C.check_probability(attention_dropout, "attention_dropout")
        torch._assert(image_size % patch_size == 0, "Input shape indivisible by patch size! "
                      f"(image_size={image_size}, patch_size={patch_size})")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        if conv_stem_configs is not None:
            raise ValueError("conv_stem_configs: fastnets' ViT has only the patch-embedding stem; pass None")
        eps = _layer_norm_eps(norm_layer)
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_dim, self.mlp_dim = hidden_dim, mlp_dim
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.num_classes, self.representation_size = num_classes, representation_size
        self.norm_layer = norm_layer
        self.fused = fused
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(self.seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout, eps, fused=fused)
        if representation_size is None:
            heads = OrderedDict(head=nn.Linear(hidden_dim, num_classes))
        else:
            C.check_int(representation_size, "representation_size")
            heads = OrderedDict(pre_logits=nn.Linear(hidden_dim, representation_size), act=nn.Tanh(),
                                head=nn.Linear(representation_size, num_classes))
        self.heads = nn.Sequential(heads)

        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        if representation_size is not None:
            nn.init.trunc_normal_(self.heads.pre_logits.weight, std=math.sqrt(1 / hidden_dim))
            nn.init.zeros_(self.heads.pre_logits.bias)
        nn.init.zeros_(self.heads.head.weight)  # torchvision starts the classifier at zero
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        if self.fused:
            x = C.fused_conv_bn_act(x, self.conv_proj, None, None)
        else:
            x = self.conv_proj(x)
        return x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


def vit_b_16(*, weights=None, progress: bool = True, **kwargs) -> VisionTransformer:
    """ViT-B/16: patch 16, 12 layers, 12 heads, hidden 768, MLP 3072; image_size (default 224) as kwarg."""
    C.check_weights(weights, progress)
    image_size = kwargs.pop("image_size", 224)
    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                             mlp_dim=3072, **kwargs)
