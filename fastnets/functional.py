"""The public functional API. Mirrors torch.nn.functional where a counterpart exists (same
argument names and defaults) and adds the fused ops. Each op family lives in fastnets/ops/."""
# One import line per op family, sorted.
from fastnets.ops.attention import scaled_dot_product_attention  # noqa: F401
from fastnets.ops.bias_act import bias_act, linear_act  # noqa: F401
from fastnets.ops.conv import conv_bn_act  # noqa: F401
from fastnets.ops.layer_norm import add_layer_norm, layer_norm  # noqa: F401
from fastnets.ops.lrn import local_response_norm  # noqa: F401
from fastnets.ops.norm_act import batch_norm_act  # noqa: F401
from fastnets.ops.pool import adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d  # noqa: F401
