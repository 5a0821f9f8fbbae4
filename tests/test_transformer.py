"""fastnets.nn.MultiheadAttention, TransformerEncoderLayer and TransformerEncoder against torch's
own modules with the same state_dict: outputs and every gradient (inputs and parameters) under
DESIGN section 5's error rule, in train mode (dropout 0) and eval mode, on each backend."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets import nn as fnn
from parity import DEVICE, KERNEL_BACKENDS, assert_parity, assert_raises_like, ran_on

ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]


def _cast(x, dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(dtype).requires_grad_(x.requires_grad)
    return x


def module_parity(ours, stock, make_call, backend, dtype=torch.float32, train=False, op=None):
    """ours and stock hold the same state; make_call(module, cast) runs the module on inputs built
    with cast (which maps a float tensor to this run's dtype) and returns (output, leaves), the
    input tensors that need gradients. Compares output and gradients of the leaves and of every
    parameter: ours in `dtype`, stock in `dtype`, and stock in float64 as the reference."""
    ours.load_state_dict(stock.state_dict())
    ours.zero_grad(set_to_none=True)
    mods = {"ref": copy.deepcopy(stock).double(), "stock": copy.deepcopy(stock).to(dtype), "ours": ours.to(dtype)}
    results, grad = {}, None
    for name in ("ref", "stock", "ours"):
        mod = mods[name].train(train)
        run_dtype = torch.float64 if name == "ref" else dtype
        if name == "ours":
            with ran_on(backend, op):
                out, leaves = make_call(mod, lambda x, d=run_dtype: _cast(x, d))
                out.backward(grad.to(run_dtype))
        else:
            out, leaves = make_call(mod, lambda x, d=run_dtype: _cast(x, d))
            if grad is None:
                grad = torch.randn(out.shape, device=DEVICE, dtype=torch.float64)
            out.backward(grad.to(run_dtype))
        results[name] = (out.detach(), [t.grad for t in leaves],
                         {k: p.grad for k, p in mod.named_parameters() if p.grad is not None})
    (o, g, pg), (r, rg, rpg), (s, sg, spg) = results["ours"], results["ref"], results["stock"]
    assert_parity(o, r, s, "output")
    for i, (a, b, c) in enumerate(zip(g, rg, sg)):
        assert_parity(a, b, c, f"grad of input {i}")
    assert pg.keys() == rpg.keys(), f"parameters with gradients differ: {sorted(pg)} vs {sorted(rpg)}"
    for k in pg:
        assert_parity(pg[k], rpg[k], spg[k], f"grad of {k}")


def _x(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# MultiheadAttention

def _bool_padding(N, S, fully_masked_batch=False):
    pad = torch.rand(N, S, device=DEVICE) < 0.3
    pad[:, 0] = False
    if fully_masked_batch:
        pad[-1] = True  # every key of the last sequence is padding: torch gives 0 attention output
    return pad


MHA_CASES = {
    # name: (constructor kwargs, builder of (call kwargs-maker))
    "self_batch_first_key_padding": dict(ctor=dict(batch_first=True), L=13, S=13, self_attn=True,
                                         kpm=lambda N, S: _bool_padding(N, S, fully_masked_batch=True)),
    "cross_kdim_vdim_float_mask_seq_first": dict(ctor=dict(kdim=24, vdim=40), L=11, S=17,
                                                 attn_mask=lambda N, L, S, H: torch.randn(L, S, device=DEVICE)),
    "bool_3d_mask_and_padding": dict(ctor=dict(batch_first=True), L=9, S=14, kv_same=True,
                                     attn_mask=lambda N, L, S, H: torch.rand(N * H, L, S, device=DEVICE) < 0.2,
                                     kpm=lambda N, S: _bool_padding(N, S)),
    "causal_hint": dict(ctor=dict(batch_first=True), L=15, S=15, self_attn=True, causal=True,
                        attn_mask=lambda N, L, S, H: nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)),
    "no_bias_unbatched": dict(ctor=dict(bias=False), L=7, S=10, unbatched=True,
                              kpm=lambda N, S: _bool_padding(1, S)[0]),
}


def _mha_call(case, N, E, H):
    L, S = case["L"], case["S"]
    kdim, vdim = case["ctor"].get("kdim", E), case["ctor"].get("vdim", E)
    bf = case["ctor"].get("batch_first", False)
    def shape(n, e):
        return (n, e) if case.get("unbatched") else ((N, n, e) if bf else (n, N, e))

    xq, xk, xv = _x(*shape(L, E)), _x(*shape(S, kdim)), _x(*shape(S, vdim))
    kpm = case["kpm"](N, S) if "kpm" in case else None
    mask = case["attn_mask"](N, L, S, H) if "attn_mask" in case else None

    def make_call(mod, cast):
        q = cast(xq)
        if case.get("self_attn"):
            k = v = q
        else:
            k = cast(xk)
            v = k if case.get("kv_same") else cast(xv)
        leaves = [t for t in {id(t): t for t in (q, k, v)}.values()]
        out, w = mod(q, k, v, key_padding_mask=kpm, need_weights=False,
                     attn_mask=cast(mask) if mask is not None else None, is_causal=case.get("causal", False))
        assert w is None
        return out, leaves

    return make_call


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_matches_torch(backend, name):
    case = MHA_CASES[name]
    N, E, H = 2, 32, 4
    torch.manual_seed(1)
    stock = nn.MultiheadAttention(E, H, **case["ctor"], device=DEVICE)
    with torch.no_grad():  # non-zero biases, so that their gradients and uses are tested
        for p in stock.parameters():
            if p.dim() == 1:
                p.normal_()
    ours = fnn.MultiheadAttention(E, H, **case["ctor"], device=DEVICE)
    make_call = _mha_call(case, N, E, H)
    for train in (False, True):  # dropout 0: train mode computes the same function
        module_parity(ours, stock, make_call, backend, train=train, op="attention")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_multihead_attention_half(backend):
    case = MHA_CASES["self_batch_first_key_padding"]
    stock = nn.MultiheadAttention(32, 2, batch_first=True, device=DEVICE)
    module_parity(fnn.MultiheadAttention(32, 2, batch_first=True, device=DEVICE), stock, _mha_call(case, 2, 32, 2),
                  backend, dtype=torch.float16, op="attention")


def test_multihead_attention_dropout_in_training_only():
    mha = fnn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 9, 16)
    with fastnets.use_backend("torch"):
        mha.eval()
        a, b = mha(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0]
        assert torch.equal(a, b)  # eval: no dropout
        mha.train()
        torch.manual_seed(5)
        c = mha(x, x, x, need_weights=False)[0]
        torch.manual_seed(5)
        assert torch.equal(c, mha(x, x, x, need_weights=False)[0]) and not torch.allclose(a, c)


@pytest.mark.parametrize("ctor", [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True)],
                         ids=["need_weights", "add_bias_kv", "add_zero_attn"])
def test_multihead_attention_stock_paths(ctor):
    """need_weights=True (torch's default), add_bias_kv and add_zero_attn run torch's own code."""
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(16, 2, batch_first=True, **ctor)
    ours = fnn.MultiheadAttention(16, 2, batch_first=True, **ctor)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 5, 16)
    need = not ctor
    for avg in (True, False):
        with fastnets.use_backend("triton"), fastnets._dispatch.trace() as launched:
            out, w = ours(x, x, x, need_weights=need, average_attn_weights=avg)
        expected, expected_w = stock(x, x, x, need_weights=need, average_attn_weights=avg)
        assert not launched
        assert torch.equal(out, expected) and (w is None and expected_w is None or torch.equal(w, expected_w))


def test_multihead_attention_state_dict_and_repr_are_torchs():
    for kw in (dict(), dict(kdim=8, vdim=12, bias=False), dict(add_bias_kv=True)):
        torch.manual_seed(0)
        stock = nn.MultiheadAttention(16, 4, **kw)
        torch.manual_seed(0)
        ours = fnn.MultiheadAttention(16, 4, **kw)
        assert isinstance(ours, nn.MultiheadAttention)
        assert list(ours.state_dict()) == list(stock.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), stock.state_dict().values()))


def _self(m, x=None, **kw):
    """Self-attention call without weights (the flash path) on a [3, 2, 16] sequence-first input."""
    x = torch.randn(3, 2, 16) if x is None else x
    return m(x, x, x, need_weights=False, **kw)


MHA_BAD = {
    "query_4d": lambda m: _self(m, torch.randn(1, 2, 3, 16)),
    "key_2d_for_batched_query": lambda m: m(torch.randn(3, 2, 16), torch.randn(3, 16), torch.randn(3, 16),
                                            need_weights=False),
    "padding_mask_wrong_shape": lambda m: _self(m, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
    "attn_mask_wrong_2d_shape": lambda m: _self(m, attn_mask=torch.zeros(3, 4)),
    "attn_mask_wrong_3d_shape": lambda m: _self(m, attn_mask=torch.zeros(3, 3, 3)),
    "int_attn_mask": lambda m: _self(m, attn_mask=torch.zeros(3, 3, dtype=torch.int64)),
    "causal_hint_without_mask": lambda m: _self(m, is_causal=True),
    "wrong_embed_dim": lambda m: _self(m, torch.randn(3, 2, 8)),
}


@pytest.mark.parametrize("name", list(MHA_BAD))
def test_multihead_attention_bad_input_raises_like_torch(name):
    torch.manual_seed(0)
    stock, ours = nn.MultiheadAttention(16, 4), fnn.MultiheadAttention(16, 4)
    assert_raises_like(lambda: MHA_BAD[name](ours), lambda: MHA_BAD[name](stock))


# ----------------------------------------------------------------------------------------------
# TransformerEncoderLayer and TransformerEncoder

LAYER_CASES = {
    "post_norm_relu_seq_first_padding": dict(ctor=dict(), padding=True),
    "pre_norm_gelu_batch_first_causal": dict(ctor=dict(activation="gelu", batch_first=True, norm_first=True),
                                             causal=True),
    "post_norm_callable_gelu_no_bias": dict(ctor=dict(activation=F.gelu, batch_first=True, bias=False), padding=True),
    "pre_norm_custom_activation_float_mask": dict(ctor=dict(activation=torch.tanh, norm_first=True), float_mask=True),
}


def _layer_call(case, N, L, E):
    bf = case["ctor"].get("batch_first", False)
    x = _x(N, L, E) if bf else _x(L, N, E)
    pad = _bool_padding(N, L) if case.get("padding") else None
    mask = None
    if case.get("causal"):
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    elif case.get("float_mask"):
        mask = torch.randn(L, L, device=DEVICE)

    def make_call(mod, cast):
        xi = cast(x)
        out = mod(xi, src_mask=cast(mask) if mask is not None else None, src_key_padding_mask=pad,
                  is_causal=bool(case.get("causal")))
        return out, [xi]

    return make_call


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_encoder_layer_matches_torch(backend, name):
    case = LAYER_CASES[name]
    N, L, E, H, FF = 2, 11, 32, 4, 48
    torch.manual_seed(2)
    stock = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, device=DEVICE, **case["ctor"])
    with torch.no_grad():  # non-trivial layer-norm affine parameters and biases
        for p in stock.parameters():
            if p.dim() == 1:
                p.normal_()
    ours = fnn.TransformerEncoderLayer(E, H, FF, dropout=0.0, device=DEVICE, **case["ctor"])
    for train in (True, False):
        # Every fastnets op inside (attention, layer-norm, bias + activation) on this backend.
        module_parity(ours, stock, _layer_call(case, N, L, E), backend, train=train)


def test_encoder_layer_same_init_and_state_dict_as_torch():
    for kw in (dict(), dict(norm_first=True, bias=False, activation="gelu", batch_first=True)):
        torch.manual_seed(0)
        stock = nn.TransformerEncoderLayer(16, 4, 32, **kw)
        torch.manual_seed(0)
        ours = fnn.TransformerEncoderLayer(16, 4, 32, **kw)
        assert isinstance(ours, nn.TransformerEncoderLayer) and isinstance(ours.self_attn, fnn.MultiheadAttention)
        assert list(ours.state_dict()) == list(stock.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), stock.state_dict().values()))
        stock.load_state_dict(ours.state_dict())  # both ways


def test_encoder_layer_dropout_applies_in_training():
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True)
    x = torch.randn(2, 6, 16)
    with fastnets.use_backend("torch"):
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(1)
        assert torch.equal(a, layer(x)) and not torch.allclose(a, layer.eval()(x))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_encoder_matches_torch_outside_padding(backend):
    """A 2-layer encoder with a final norm. Stock torch's nested-tensor fast path (eval mode with a
    padding mask) returns 0 at padded positions where the layers compute values; the positions
    that are not padding must agree, and in training mode everything must."""
    N, L, E = 2, 9, 16
    torch.manual_seed(3)
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True), 2,
                                  norm=nn.LayerNorm(E), enable_nested_tensor=False)
    ours = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True), 2,
                                  norm=nn.LayerNorm(E), enable_nested_tensor=False)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(N, L, E)
    pad = _bool_padding(N, L)
    keep = ~pad
    with ran_on(backend, "attention"):
        out = ours(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out[keep], stock(x, src_key_padding_mask=pad)[keep], rtol=1e-4, atol=1e-4)
    nested = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True), 2,
                                   norm=nn.LayerNorm(E)).eval()
    nested.load_state_dict(stock.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out[keep], nested(x, src_key_padding_mask=pad)[keep], rtol=1e-4, atol=1e-4)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    module_parity(ours, stock, lambda m, cast: (m(cast(x).requires_grad_(), mask=cast(mask), is_causal=True), []),
                  backend, train=True, op="attention")


LAYER_BAD = {
    "heads_do_not_divide": lambda cls: cls(10, 3),
    "src_wrong_rank": lambda cls: cls(16, 2)(torch.randn(2, 3, 4, 16)),
    "padding_mask_wrong_shape": lambda cls: cls(16, 2)(torch.randn(5, 2, 16),
                                                       src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
    "causal_hint_without_mask": lambda cls: cls(16, 2)(torch.randn(5, 2, 16), is_causal=True),
    "int_mask": lambda cls: cls(16, 2)(torch.randn(5, 2, 16), src_mask=torch.zeros(5, 5, dtype=torch.int32)),
}


@pytest.mark.parametrize("name", list(LAYER_BAD))
def test_encoder_layer_bad_input_raises_like_torch(name):
    make = LAYER_BAD[name]
    assert_raises_like(lambda: make(fnn.TransformerEncoderLayer), lambda: make(nn.TransformerEncoderLayer))


# ----------------------------------------------------------------------------------------------
# Native GPU: realistic sizes, bf16 and fp16, both kernel backends.

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_first", [False, True])
def test_gpu_encoder_layer(backend, dtype, norm_first):
    N, L, E, H = 8, 333, 512, 8
    torch.manual_seed(0)
    stock = nn.TransformerEncoderLayer(E, H, 4 * E, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first, device=DEVICE)
    ours = fnn.TransformerEncoderLayer(E, H, 4 * E, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first, device=DEVICE)
    case = dict(ctor=dict(batch_first=True), padding=True)
    module_parity(ours, stock, _layer_call(case, N, L, E), backend, dtype=dtype, train=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_multihead_attention_vit_shape(backend):
    """ViT-B/16's attention: 197 tokens, 768 wide, 12 heads of 64."""
    case = dict(ctor=dict(batch_first=True), L=197, S=197, self_attn=True)
    stock = nn.MultiheadAttention(768, 12, batch_first=True, device=DEVICE)
    module_parity(fnn.MultiheadAttention(768, 12, batch_first=True, device=DEVICE), stock,
                  _mha_call(case, 16, 768, 12), backend, dtype=torch.bfloat16, op="attention")
