"""Drop-in modules: same constructor arguments and state_dict keys as their torch.nn counterparts,
and fused modules that keep the state_dict keys of the stock sequence they replace."""
# One import line per op family, sorted.
from fastnets.nn.attention import MultiheadAttention  # noqa: F401
from fastnets.nn.conv import ConvAct2d, ConvBNAct2d  # noqa: F401
from fastnets.nn.layer_norm import LayerNorm  # noqa: F401
from fastnets.nn.lrn import LocalResponseNorm  # noqa: F401
from fastnets.nn.norm_act import BatchNormAct2d  # noqa: F401
from fastnets.nn.pool import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, MaxPool2d  # noqa: F401
from fastnets.nn.transformer import TransformerEncoder, TransformerEncoderLayer  # noqa: F401
