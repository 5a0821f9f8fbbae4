"""scaled_dot_product_attention: the flash-attention kernels (Triton; CUDA C++ on a GPU) and the
torch reference against torch's own function in float64 (DESIGN section 5's error rule), forward
and every gradient, over awkward sequence lengths, head dims, layouts, masks, GQA and dropout."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastnets
from fastnets import functional as FF
from fastnets.ops import attention as A
import parity
from parity import DEVICE, DOT_DTYPES, KERNEL_BACKENDS, assert_parity, assert_raises_like, ran_on, to_layout

ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]  # the reference is the CPU path of `auto`: tested too


def _qkv(B, Hq, L, S, E, Ev=None, Hk=None, dtype=torch.float32, layout="contiguous"):
    """Fresh random q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev] in a layout: "bshd" is the
    transposed [B, L, H, E] storage that attention layers produce; the others are parity.LAYOUTS."""
    Ev, Hk = Ev or E, Hk or Hq

    def make(*shape):
        t = torch.randn(*shape, device=DEVICE).to(dtype)
        if layout == "bshd":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        return to_layout(t, layout)

    return make(B, Hq, L, E), make(B, Hk, S, E), make(B, Hk, S, Ev)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with t's values and exactly its strides (its layout), requiring grad if t does."""
    if not t.requires_grad:
        return t
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        leaf.copy_(t)
    return leaf.requires_grad_()


def _run(fn, tensors, grad, **kw):
    """fn(*tensors, **kw) and the gradients of (out * grad).sum() for each tensor that needs one."""
    leaves = [_leaf(t) for t in tensors]
    out = fn(*leaves, **kw)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def check_parity(backend, q, k, v, *, mask=None, mask_grad=False, **kw):
    """Forward and gradients of q, k, v (and of a float mask when mask_grad) on `backend`, against
    torch's math composite in float64 (the oracle) and torch's own function in the same dtype."""
    tensors = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    if mask is not None:
        tensors.append(mask.requires_grad_(mask_grad))
    grad = None

    def call(fn):
        def f(q, k, v, m=None):
            return fn(q, k, v, attn_mask=m, **kw)
        return f

    with sdpa_kernel(SDPBackend.MATH):
        ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors]
        ref = call(F.scaled_dot_product_attention)(*ref_in)
        grad = torch.randn(ref.shape, device=DEVICE)
        ref.backward(grad.double())
        ref_grads = [t.grad for t in ref_in if t.requires_grad]
    stock, stock_grads = _run(call(F.scaled_dot_product_attention), tensors, grad.to(q.dtype))
    with ran_on(backend, "attention"):
        out, grads = _run(call(FF.scaled_dot_product_attention), tensors, grad.to(q.dtype))
    assert_parity(out, ref, stock, "output")
    for name, g, r, s in zip("qkvm", grads, ref_grads, stock_grads):
        assert_parity(g, r, s, f"grad of {name}")


# Every listed sequence length (1, 17, 97, 128, 200) and head dim (16, 32, 40, 64, 80, 128) appears,
# with L != S both ways, causal and not, every layout, fp32 and fp16 (bf16 tl.dot only on a GPU).
CASES = [  # B, Hq, L, S, E, causal, layout
    (1, 1, 1, 1, 16, False, "contiguous"),
    (2, 1, 17, 17, 32, True, "noncontiguous"),
    (1, 2, 97, 200, 40, True, "bshd"),
    (1, 1, 200, 97, 80, True, "contiguous"),
    (1, 2, 128, 128, 64, False, "channels_last"),
    (1, 1, 17, 128, 128, False, "noncontiguous"),
    (2, 1, 1, 97, 64, True, "bshd"),
    (1, 1, 97, 1, 16, False, "contiguous"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "B{}H{}L{}S{}E{}{}-{}".format(*c[:5], "-causal" if c[5] else "", c[6]))
def test_parity_shapes_layouts(backend, case):
    B, H, L, S, E, causal, layout = case
    # The reference computes in float32 whatever the dtype: float32 and bfloat16 are enough for it.
    for dtype in [torch.float32, torch.bfloat16] if backend == "torch" else DOT_DTYPES:
        q, k, v = _qkv(B, H, L, S, E, dtype=dtype, layout=layout)
        check_parity(backend, q, k, v, is_causal=causal)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="Triton is not installed")
def test_int64_offsets_variant(monkeypatch):
    """The kernels' int64 in-tile offsets (chosen when row * stride can reach 2^31) give the same
    results: forced on for a small input with a mask and dropout."""
    from fastnets.kernels import attention as K, attention_bwd as KB

    monkeypatch.setattr(K, "needs_int64", lambda *views: True)
    monkeypatch.setattr(KB, "needs_int64", lambda *views: True)
    q, k, v = _qkv(1, 2, 37, 29, 24, layout="bshd")
    check_parity("triton", q, k, v, mask=torch.randn(2, 37, 29, device=DEVICE), mask_grad=True, dropout_p=0.0)
    monkeypatch.undo()
    big = torch.empty_strided((1, 1, 2**11, 2**20), (0, 0, 2**20, 1), device="meta")  # rows * stride = 2^31
    assert K.needs_int64((big, 2**11, 2**20)) and not K.needs_int64((big, 2**10, 2**20))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_value_head_dim_differs_and_scale(backend):
    q, k, v = _qkv(1, 2, 33, 47, 40, Ev=24, dtype=torch.float16)
    check_parity(backend, q, k, v, scale=0.3)


def _padding_mask(B, S, dtype=torch.bool):
    keep = torch.rand(B, 1, 1, S, device=DEVICE) > 0.3
    keep[..., 0] = True
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, -math.inf).to(dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["bool_2d_fully_masked_rows", "bool_key_padding", "additive_bhls_fp32_on_fp16",
                                  "additive_1hls_same_dtype", "additive_with_inf_rows"])
def test_masks(backend, kind):
    B, H, L, S, E = 2, 2, 37, 53, 32
    dtype = torch.float16 if "fp16" in kind else torch.float32
    q, k, v = _qkv(B, H, L, S, E, dtype=dtype)
    if kind == "bool_2d_fully_masked_rows":
        mask = torch.rand(L, S, device=DEVICE) > 0.4
        mask[3] = False  # row 3 sees nothing: torch gives 0 and zero gradients
        mask[L - 1] = False
    elif kind == "bool_key_padding":
        mask = _padding_mask(B, S)
    elif kind == "additive_bhls_fp32_on_fp16":
        mask = torch.randn(B, H, L, S, device=DEVICE)
    elif kind == "additive_1hls_same_dtype":
        mask = torch.randn(1, H, L, S, device=DEVICE, dtype=dtype)[..., ::2, :]  # strided, and broadcast over B
        q = q[:, :, : mask.shape[2]]
    else:
        mask = torch.randn(L, S, device=DEVICE)
        mask[5] = -math.inf
        mask[:, 7] = -math.inf
    check_parity(backend, q, k, v, mask=mask)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_additive_mask_gradient(backend):
    """A float mask that requires grad gets its gradient (summed over its broadcast dimensions)."""
    q, k, v = _qkv(2, 2, 19, 23, 16)
    check_parity(backend, q, k, v, mask=torch.randn(1, 2, 19, 1, device=DEVICE).expand(1, 2, 19, 23).clone(),
                 mask_grad=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("heads", [(4, 2, 2), (6, 1, 1), (4, 2, 1)], ids=["g2", "mqa", "k2v1"])
def test_grouped_query_attention(backend, heads):
    hq, hk, hv = heads
    dtype = torch.float16 if backend != "torch" else torch.float32
    q = torch.randn(1, hq, 29, 32, device=DEVICE, dtype=dtype)
    k = torch.randn(1, hk, 41, 32, device=DEVICE, dtype=dtype)
    v = torch.randn(1, hv, 41, 16, device=DEVICE, dtype=dtype)
    check_parity(backend, q, k, v, enable_gqa=True, is_causal=hq == 6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shapes", [((3, 8), (5, 8), (5, 8)), ((2, 3, 8), (2, 5, 8), (2, 5, 8)),
                                    ((2, 1, 2, 3, 8), (1, 3, 1, 5, 8), (1, 3, 1, 5, 8)),
                                    ((1, 2, 3, 8), (2, 1, 5, 8), (2, 1, 5, 8))],
                         ids=["rank2", "rank3", "rank5-broadcast", "batch-and-head-broadcast"])
def test_ranks_and_broadcasting(backend, shapes):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    check_parity(backend, q, k, v, mask=torch.rand(3, 5, device=DEVICE) > 0.2)
    if q.dim() <= 3:
        assert FF.scaled_dot_product_attention(q, k, v).is_contiguous()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 7, 8), (1, 2, 0, 7, 8), (1, 2, 5, 0, 8), (1, 1, 5, 7, 0)],
                         ids=["B0", "L0", "S0", "E0"])
def test_empty_dimensions(backend, shape):
    """Empty batch or queries give empty outputs; no keys (S = 0) give zeros, as torch; E = 0
    gives uniform attention. Gradients are zeros where torch gives zeros."""
    B, H, L, S, E = shape
    q, k, v = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((B, H, L, E), (B, H, S, E), (B, H, S, 8)))
    expected = F.scaled_dot_product_attention(q, k, v)
    with fastnets.use_backend(backend):
        out = FF.scaled_dot_product_attention(q, k, v)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_and_inf_propagate_as_torch(backend):
    q, k, v = _qkv(1, 1, 7, 9, 16)
    q[0, 0, 2, 3] = math.nan  # one query row: its output row is NaN
    v[0, 0, 4, 1] = math.inf  # one value entry: that column of every output row is inf (or NaN)
    mask = torch.zeros(7, 9, device=DEVICE)
    mask[5, 2] = math.inf  # +inf score: torch gives a NaN row
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with ran_on(backend, "attention"):
        out = FF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Dropout

def test_philox_known_answer():
    """Philox4x32-10 with key 0 and counter 0 starts with 0x6627e8d5 (Random123's known-answer
    test), so element (0, 0, 0) of seed 0 has u = 0x6627e8 / 2^24 = 0.39904...: kept for p <= u."""
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    u = 0x6627E8 / 2**24
    assert A.philox_keep_mask(seed, 1, 1, 1, 1, u).item()
    assert not A.philox_keep_mask(seed, 1, 1, 1, 1, u + 1e-6).item()
    for backend in KERNEL_BACKENDS:
        assert A.dropout_mask(seed, 1, 1, 1, 1, u, backend).item()
        assert not A.dropout_mask(seed, 1, 1, 1, 1, u + 1e-6, backend).item()


def test_dropout_mask_launches_in_chunks_along_grid_z(monkeypatch):
    """(batch x heads) goes on grid z, whose limit is 65535: the Triton hook splits it into launches
    (shown here with a limit of 2, so that 2 x 3 heads take three launches) and the mask is unchanged."""
    if "triton" not in KERNEL_BACKENDS:
        pytest.skip("the Triton backend is not available")
    from fastnets.kernels import attention as KA
    monkeypatch.setattr(KA, "GRID_Z_MAX", 2)
    seed = A.draw_seed(DEVICE)
    keep = A.dropout_mask(seed, 2, 3, 9, 11, 0.4, "triton")
    assert torch.equal(keep, A.philox_keep_mask(seed, 2, 3, 9, 11, 0.4))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_mask_is_philox_in_the_kernels_and_has_the_right_rate(backend):
    seed = A.draw_seed(DEVICE)
    for p in (0.1, 0.5):
        keep = A.dropout_mask(seed, 2, 3, 37, 129, p, backend)
        if backend != "torch":  # the kernels' RNG, bit for bit (the reference has its own generator)
            assert torch.equal(keep, A.philox_keep_mask(seed, 2, 3, 37, 129, p))
        n = keep.numel()
        # Kept fraction within 5 standard deviations of 1 - p (a fair test fails ~1 in 3.5 million).
        assert abs(keep.float().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
        # No structure along rows, columns or heads: each slice keeps about 1 - p as well.
        for dim in (1, 2, 3):
            frac = keep.float().mean(dim=[d for d in (0, 1, 2, 3) if d != dim])
            m = n // keep.shape[dim]
            assert (frac - (1 - p)).abs().max().item() <= 5 * math.sqrt(p * (1 - p) / m)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("variant", ["causal", "gqa_additive_mask"])
def test_dropout_equals_reference_with_the_kernels_own_mask(backend, variant):
    """Forward and gradients with dropout equal the float64 composite given the same keep mask."""
    B, H, L, S, E, p = 1, 2, 45, 70, 32, 0.3
    Hk = 1 if variant == "gqa_additive_mask" else H
    q, k, v = _qkv(B, H, L, S, E, Hk=Hk, dtype=torch.float16 if backend != "torch" else torch.float32)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    causal = variant == "causal"
    mask = None if causal else torch.randn(B, 1, L, S, device=DEVICE)
    grad = torch.randn(B, H, L, E, device=DEVICE)
    torch.manual_seed(123)
    with ran_on(backend, "attention"):
        out, grads = _run(FF.scaled_dot_product_attention, [q, k, v], grad.to(q.dtype), dropout_p=p,
                          is_causal=causal, attn_mask=mask, enable_gqa=Hk != H)
    torch.manual_seed(123)
    keep = A.dropout_mask(A.draw_seed(DEVICE), B, H, L, S, p, backend)

    def composite(q, k, v, keep):
        k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(E)
        if causal:
            s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(), -math.inf)
        else:
            s = s + mask.to(s.dtype)
        return (torch.softmax(s, -1) * keep / (1 - p)) @ v

    ref, ref_grads = _run(composite, [t.double().requires_grad_() for t in (q, k, v)], grad.double(), keep=keep)
    stock, stock_grads = _run(composite, [q, k, v], grad.to(q.dtype), keep=keep.to(q.dtype))
    assert_parity(out, ref, stock, "output")
    for name, g, r, s in zip("qkv", grads, ref_grads, stock_grads):
        assert_parity(g, r, s, f"grad of {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_reproducible_under_manual_seed(backend):
    q, k, v = _qkv(1, 1, 23, 31, 16)
    outs = []
    with ran_on(backend, "attention"):
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            outs.append(FF.scaled_dot_product_attention(q, k, v, dropout_p=0.4))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_one_gives_zeros(backend):
    q, k, v = _qkv(1, 1, 5, 6, 16)
    q.requires_grad_()
    with ran_on(backend, "attention"):
        out = FF.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))


# ----------------------------------------------------------------------------------------------
# Bad input: torch's exception types.

def _stock_math(*a, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*a, **kw)


BAD = {
    "head_dims_differ": lambda f: f(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 8)),
    "dtypes_differ": lambda f: f(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8)),
    "mask_does_not_broadcast": lambda f: f(*_qkv(1, 2, 3, 4, 8), attn_mask=torch.ones(3, 5, dtype=torch.bool)),
    "mask_more_dims": lambda f: f(*_qkv(1, 2, 3, 4, 8), attn_mask=torch.ones(2, 1, 1, 3, 4, dtype=torch.bool)),
    "mask_int_dtype": lambda f: f(*_qkv(1, 2, 3, 4, 8), attn_mask=torch.ones(3, 4, dtype=torch.int32)),
    "mask_other_float_dtype": lambda f: f(*_qkv(1, 2, 3, 4, 8, dtype=torch.float16),
                                          attn_mask=torch.ones(3, 4).bfloat16()),
    "negative_dropout": lambda f: f(*_qkv(1, 2, 3, 4, 8), dropout_p=-0.1),
    "dropout_above_one": lambda f: f(*_qkv(1, 2, 3, 4, 8), dropout_p=1.5),
    "dropout_none": lambda f: f(*_qkv(1, 2, 3, 4, 8), dropout_p=None),
    "causal_with_mask": lambda f: f(*_qkv(1, 2, 3, 4, 8), attn_mask=torch.ones(3, 4, dtype=torch.bool), is_causal=True),
    "heads_mismatch_without_gqa": lambda f: f(torch.randn(1, 4, 3, 8), torch.randn(1, 2, 4, 8),
                                              torch.randn(1, 2, 4, 8)),
    "gqa_heads_do_not_divide": lambda f: f(torch.randn(1, 3, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                                           enable_gqa=True),
    "gqa_rank2": lambda f: f(torch.randn(3, 8), torch.randn(4, 8), torch.randn(4, 8), enable_gqa=True),
    "rank1": lambda f: f(torch.randn(8), torch.randn(8), torch.randn(8)),
    "integer_inputs": lambda f: f(*(torch.ones(1, 1, 3, 8, dtype=torch.long),) * 3),
    "key_value_lengths_differ": lambda f: f(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8)),
    "batch_mismatch": lambda f: f(torch.randn(2, 2, 3, 8), torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)),
    "not_a_tensor": lambda f: f([1.0], torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_like_torch(name):
    make = BAD[name]
    for backend in ALL_BACKENDS:
        with fastnets.use_backend(backend):
            # torch's CPU dispatcher sends negative dropout to a kernel that raises; its math
            # composite is the reference for the rest (it raises for a mask with is_causal).
            stock = F.scaled_dot_product_attention if name == "negative_dropout" else _stock_math
            assert_raises_like(lambda: make(FF.scaled_dot_product_attention), lambda: make(stock))


def test_backend_limits_are_explained():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with fastnets.use_backend("triton"), pytest.raises(fastnets.BackendError, match="float64"):
        FF.scaled_dot_product_attention(q, q, q)
    q = torch.randn(1, 1, 4, 300)
    with fastnets.use_backend("triton"), pytest.raises(fastnets.BackendError, match="head dims 300"):
        FF.scaled_dot_product_attention(q, q, q)
    with ran_on("torch", "attention"):  # auto on a CPU tensor: the reference, float64 included
        out = FF.scaled_dot_product_attention(q.double(), q.double(), q.double())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.double(), q.double(), q.double()))


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile (on the CPU through the reference registration: the
# interpreter cannot run fake tensors; the Triton and CUDA registrations are checked on a GPU).

def _op_args(device, dtype=torch.float32, mask=True, dropout=False):
    q, k, v = (torch.randn(1, 2, n, 16, device=device, dtype=dtype, requires_grad=True) for n in (5, 7, 7))
    m = torch.randn(1, 1, 5, 7, device=device).expand(1, 2, 5, 7) if mask else None
    rng = A.draw_seed(device) if dropout else None
    return q, k, v, m, rng, 0.25 if dropout else 0.0, not mask, 0.25


def _opcheck(backend, device):
    for kw in (dict(), dict(mask=False, dropout=True)):
        args = _op_args(device, **kw)
        torch.library.opcheck(A.fwd_ops[backend], args)
        out, lse = A.fwd_ops[backend](*args)
        q, k, v, m, rng, p, causal, scale = args
        bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, m, rng, p, causal,
                    scale, m is not None)
        torch.library.opcheck(A.bwd_ops[backend], bwd_args)


def test_opcheck_reference_registration():
    _opcheck("torch", DEVICE)


def test_compile_fullgraph_through_reference():
    q, k, v = _qkv(1, 2, 9, 11, 16)
    mask = torch.rand(9, 11) > 0.2

    def f(q, k, v):
        return FF.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)

    with fastnets.use_backend("torch"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


# ----------------------------------------------------------------------------------------------
# Native GPU tests: realistic sizes, bf16, both kernel backends.

GPU_CASES = [  # B, Hq, Hkv, L, S, E, causal
    (2, 8, 8, 1025, 1025, 64, True), (1, 4, 4, 2048, 2048, 128, False), (1, 4, 1, 1000, 1537, 256, True),
    (2, 8, 2, 513, 2049, 80, False), (4, 2, 2, 4096, 4096, 128, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_parity_large(backend, case, dtype):
    B, H, Hk, L, S, E, causal = case
    q, k, v = _qkv(B, H, L, S, E, Hk=Hk, dtype=dtype, layout="bshd")
    check_parity(backend, q, k, v, is_causal=causal, enable_gqa=H != Hk)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_masks_dropout_determinism(backend):
    q, k, v = _qkv(2, 4, 777, 1100, 64, dtype=torch.bfloat16)
    check_parity(backend, q, k, v, mask=_padding_mask(2, 1100, torch.bfloat16))
    check_parity(backend, q, k, v, mask=torch.randn(777, 1100, device=DEVICE), mask_grad=True)
    keep = A.dropout_mask(A.draw_seed(DEVICE), 2, 4, 777, 1100, 0.2, backend)
    assert abs(keep.float().mean().item() - 0.8) < 5 * math.sqrt(0.16 / keep.numel())
    grads = []
    for _ in range(2):  # the backward has no atomics: bitwise the same twice
        torch.manual_seed(3)
        with ran_on(backend, "attention"):
            _, g = _run(FF.scaled_dot_product_attention, [t.requires_grad_() for t in (q, k, v)],
                        torch.ones(2, 4, 777, 64, device=DEVICE, dtype=torch.bfloat16), dropout_p=0.2)
        grads.append(g)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_opcheck_and_compile(backend):
    _opcheck(backend, DEVICE)
    q, k, v = _qkv(2, 4, 300, 300, 64, dtype=torch.bfloat16)
    with fastnets.use_backend(backend):
        compiled = torch.compile(lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v), FF.scaled_dot_product_attention(q, k, v, is_causal=True))


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels' operand tiles by 16-byte cp.async copies (csrc/attention.cu
# load_tile_async: rows contiguous, head dims and row strides multiples of 16 bytes, aligned
# pointers; the forward overlaps the next K tile and the current V tile with the math) and the
# plain loads they fall back to (E = 60 for 16-bit types, odd E, strided views, a misaligned input).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("E,layout,causal", [(64, "contiguous", False), (64, "bshd", True), (128, "contiguous", True),
                                             (256, "bshd", False), (32, "contiguous", False),
                                             (60, "contiguous", True), (33, "contiguous", False),
                                             (64, "noncontiguous", False)])
def test_cuda_async_copy_and_plain_load_paths_gpu(dtype, E, layout, causal):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    q, k, v = _qkv(2, 4, 77, 93 if not causal else 77, E, dtype=dtype, layout=layout)
    check_parity("cuda", q, k, v, is_causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_cuda_misaligned_inputs_gpu(dtype):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    q, k, v = (parity.misaligned(t) for t in _qkv(2, 4, 77, 93, 64, dtype=dtype))
    with torch.no_grad():
        with ran_on("cuda", "attention"):
            out = FF.scaled_dot_product_attention(q, k, v)
        ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
        stock = F.scaled_dot_product_attention(q, k, v)
    assert_parity(out, ref, stock)


# GPU: the CUDA backward's delta = rowsum(dO * O) by 16-byte loads (csrc/attention.cu
# attn_bwd_delta_vec_kernel: last dims contiguous, Ev and the other strides multiples of 8 (16-bit)
# or 4 (fp32), aligned pointers; 8 lanes per row) and the warp-per-row kernel it falls back to
# (Ev = 20 for 16-bit types, a misaligned dO). Ev = 136: two steps per row, the second partial;
# B * H * L = 616 rows: the last block of 16 rows partly filled.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("Ev,misaligned_grad", [(40, False), (136, False), (20, False), (64, True)])
def test_cuda_delta_vector_and_scalar_paths_gpu(dtype, Ev, misaligned_grad):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 77, 93, 64, Ev=Ev, dtype=dtype))
    grad = torch.randn(2, 4, 77, Ev, device=DEVICE)
    with sdpa_kernel(SDPBackend.MATH):
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_in)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    stock = F.scaled_dot_product_attention(q, k, v)
    stock_grads = torch.autograd.grad(stock, (q, k, v), grad.to(dtype))
    g = parity.misaligned(grad.to(dtype)) if misaligned_grad else grad.to(dtype)
    with ran_on("cuda", "attention"):
        out = FF.scaled_dot_product_attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), g)
    assert_parity(out, ref, stock, "output")
    for name, gr, r, s in zip("qkv", grads, ref_grads, stock_grads):
        assert_parity(gr, r, s, f"grad of {name}")
