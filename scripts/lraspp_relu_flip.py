"""Issue 11: why torchvision's LRASPP showed a large fp32 training-gradient gap after fuse().

The recipe of the issue (lraspp_mobilenet_v3_large, weights=None, batch-norm gamma ~ U[0.5, 1.5] and
beta ~ N(0, 0.2), train mode, batch 2 at 96x96, inputs after torch.manual_seed(s), s = 1, 2, 3), run
with the kernels' formulation through the torch reference (statistics from the convolution,
batch_norm_act_train with the given statistics, the pre-activation recomputed in the backward:
_dispatch.kernel_formulation, the path the CPU took when the issue was filed), compared with a
float64 copy of the stock model. It prints:
  1. the stem weight gradient's relative error, stock fp32 and fused fp32, per seed;
  2. for the worst seed, the parameters whose gradient is off, nearest the output first;
  3. the activation input nearest to the ReLU kink in the first wrong layer, in float64 and in the
     fused fp32 run;
  4. the fused fp32 error against the float64 reference with that single ReLU element switched off
     as the fp32 run has it (a forward hook zeroes its output);
  5. the fused model in float64 against stock float64 (the formulation itself, without rounding).

    python scripts/lraspp_relu_flip.py > benchmarks/results/lraspp-relu-flip-<date>/run.log
"""
from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import _thirdparty  # noqa: E402

import fastnets  # noqa: E402
from fastnets import _dispatch  # noqa: E402


def rel(a, b):
    """Relative L2 error."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def worst(a, r):
    """The worst parameter gradient, among those that are not zero in exact arithmetic (a per-channel
    shift followed, through 1x1 convolutions or additions, by a training-mode batch-norm has a
    gradient of exactly 0: its float64 value, ~1e-12, is rounding noise)."""
    n = max((k for k in r if r[k].norm().item() > 1e-9), key=lambda k: rel(a[k], r[k]))
    return f"{rel(a[n], r[n]):.2e} ({n}, reference norm {r[n].norm().item():.1e})"


def step(model, x, dt, hook=None):
    """Gradients (name -> float64) of one training step with a fixed random output weighting, and
    the input/output of classifier.cbr (the head's conv -> batch-norm -> ReLU)."""
    cap = {}
    h = model.classifier.cbr.register_forward_hook(
        lambda mod, i, o: cap.update(out=o.detach().double()))
    extra = model.classifier.cbr[1].register_forward_hook(hook) if hook is not None else None
    model.zero_grad(set_to_none=True)
    out = model(x.to(dt))["out"]
    g = torch.Generator().manual_seed(99)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(dt))
    h.remove()
    if extra is not None:
        extra.remove()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}, cap


def main():
    tv = _thirdparty.torchvision()
    torch.manual_seed(0)
    m = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.2)
    m.train()
    ref = copy.deepcopy(m).double()
    fused = fastnets.fuse(copy.deepcopy(m))
    fused64 = copy.deepcopy(fused).double()
    stem = "backbone.0.0.weight"
    print(f"torch {torch.__version__}; fuse(): {len(fused.fuse_summary.fused)} patterns fused")
    pick = None
    with _dispatch.use_backend("torch"), _dispatch.kernel_formulation():
        for s in (1, 2, 3):
            torch.manual_seed(s)
            x = torch.randn(2, 3, 96, 96)
            r, rc = step(ref, x, torch.float64)
            st, _ = step(m, x, torch.float32)
            fz, fc = step(fused, x, torch.float32)
            e_st, e_fz = rel(st[stem], r[stem]), rel(fz[stem], r[stem])
            print(f"1. seed {s}: {stem} relative error: stock fp32 {e_st:.2e}, fused fp32 {e_fz:.2e}")
            if pick is None or e_fz > pick[1]:
                pick = (s, e_fz, x, r, st, fz, rc, fc)
        s, _, x, r, st, fz, rc, fc = pick
        print(f"2. seed {s}: parameters whose fused gradient error exceeds 3x stock's, nearest the output first:")
        bad = [n for n in r if rel(fz[n], r[n]) > 3 * rel(st[n], r[n]) + 1e-6]
        for n in bad[::-1][:6]:
            print(f"   {n:36s} stock {rel(st[n], r[n]):.2e} fused {rel(fz[n], r[n]):.2e}")
        print(f"   ... {len(bad)} parameters in all")
        zr, zf = rc["out"], fc["out"]
        flips = ((zr > 0) != (zf > 0)).nonzero().tolist()
        print(f"3. classifier.cbr ReLU outputs on different sides of the kink (float64 vs fused fp32): {len(flips)}")
        for idx in flips:
            print(f"   element {tuple(idx)}: float64 {zr[tuple(idx)].item():.3e}, fused fp32 {zf[tuple(idx)].item():.3e}; "
                  f"max |output| of the layer {zr.abs().max().item():.2f}")
        scale = zr.abs().max().item()

        def as_fp32(mod, inputs, out):
            # The batch-norm's output (the ReLU's input), with each flipped element moved to the
            # fp32 run's side of the kink (its sign changed: a change of ~1e-6 in value).
            out = out.clone()
            for idx in flips:
                want_positive = bool((zf[tuple(idx)] > 0).item())
                if (out[tuple(idx)] > 0).item() != want_positive:
                    out[tuple(idx)] = -out[tuple(idx)]
            return out

        r2, _ = step(ref, x, torch.float64, hook=as_fp32)
        print(f"4. seed {s}: fused fp32 {stem} error against the float64 reference with those {len(flips)} "
              f"ReLU input(s) moved to fp32's side of the kink: {rel(fz[stem], r2[stem]):.2e} "
              f"(stock fp32 against the unmodified reference: {rel(st[stem], r[stem]):.2e}); "
              f"worst parameter: {worst(fz, r2)}")
        f64, _ = step(fused64, x, torch.float64)
        print(f"5. seed {s}: fused float64 against stock float64 (the formulation, no rounding): "
              f"worst parameter gradient {worst(f64, r)}")
        print(f"   layer scale {scale:.2f}: the flipped element sits {zr[tuple(flips[0])].item() / scale:.1e} "
              f"of it from the kink, the size of fp32 rounding in a 960-term dot product" if flips else "")


if __name__ == "__main__":
    main()
