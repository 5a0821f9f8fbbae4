"""The shared activation helpers (reference and Triton) against torch's own functions and autograd."""
import pytest
import torch

from fastnets.ops import _activation as A
from parity import DEVICE, KERNEL_BACKENDS


def _inputs():
    x = torch.randn(257, dtype=torch.float64) * 4
    return torch.cat([x, torch.tensor([0.0, 6.0, -0.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)])


@pytest.mark.parametrize("name", A.NAMES)
def test_reference_grad_matches_autograd(name):
    z = _inputs()[:-2]  # keeps NaN; torch's autograd of the smooth ones at +-inf is NaN
    z = (z if name in ("relu", "relu6", None) else z[:-1]).requires_grad_()
    act = A.code(name)
    y = A.apply(z, act)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, z, g) if y.requires_grad else (g,)
    torch.testing.assert_close(A.grad(z.detach(), g, act), expected, equal_nan=True)


def test_unknown_activation_names_the_argument():
    with pytest.raises(ValueError, match="activation must be one of"):
        A.code("tanhh")
    assert A.code("ReLU") == 1 and A.code(None) == 0


if "triton" in KERNEL_BACKENDS:
    import triton
    import triton.language as tl

    from fastnets.kernels._activation import act_bwd, act_fwd

    @triton.jit
    def _act_kernel(z_ptr, g_ptr, y_ptr, dz_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        # z, g: [n] float32 inputs; y = act(z), dz = act'(z) * g: [n] float32 outputs
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        z = tl.load(z_ptr + offs, mask=m)
        g = tl.load(g_ptr + offs, mask=m)
        tl.store(y_ptr + offs, act_fwd(z, ACT), mask=m)
        tl.store(dz_ptr + offs, act_bwd(z, g, ACT), mask=m)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("name", A.NAMES)
def test_triton_activation_matches_torch(name):
    z = _inputs().float().to(DEVICE)
    g = torch.randn_like(z)
    y, dz = torch.empty_like(z), torch.empty_like(z)
    act = A.code(name)
    _act_kernel[(triton.cdiv(z.numel(), 128),)](z, g, y, dz, z.numel(), ACT=act, BLOCK=128)
    expected = A.apply(z, act)
    if name == "gelu":  # torch's CPU gelu gives NaN at +inf (its CUDA one gives inf): skip the infinities
        keep = ~torch.isinf(z)
        y, expected = y[keep], expected[keep]
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=2e-6, atol=1e-6)
    keep = ~torch.isinf(z) if name in ("relu", "relu6", None) else torch.isfinite(z)
    torch.testing.assert_close(dz[keep], A.grad(z, g, act)[keep], rtol=2e-5, atol=1e-6, equal_nan=True)
