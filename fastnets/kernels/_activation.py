"""Activations inside Triton kernels (codes as fastnets/ops/_activation.py). x is float32.
Comparisons are written so that NaN falls through unchanged, as in torch (relu(NaN) is NaN)."""
import triton
import triton.language as tl


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    if ACT == 1:  # relu
        x = tl.where(x < 0, 0.0, x)
    elif ACT == 2:  # relu6
        x = tl.where(x < 0, 0.0, tl.where(x > 6, 6.0, x))
    elif ACT == 3:  # silu
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 4:  # gelu, exact (erf)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 5:  # sigmoid
        x = 1.0 / (1.0 + tl.exp(-x))
    return x


@triton.jit
def act_bwd(z, g, ACT: tl.constexpr):
    """d act(z) / dz * g, z the pre-activation (float32)."""
    if ACT == 1:
        g = tl.where(z <= 0, 0.0, g)  # NaN passes the gradient, as torch's threshold_backward
    elif ACT == 2:
        g = tl.where((z <= 0) | (z >= 6), 0.0, g)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = g * s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = g * (cdf + z * pdf)
    elif ACT == 5:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = g * s * (1.0 - s)
    return g
