"""The model cases: every model of the family, inference at a few batch sizes and a training step,
in images (or sequences) per second, with the peak memory of one call beside the speed.

The pair compared is the natural one: the stock form of a model (`fastnets.models.<name>(fused=False)`:
torchvision's architecture built from torch.nn layers, torchvision's state_dict) and the same
model after `fastnets.fuse()` (or, before fuse() exists, `fastnets.models.<name>()` loaded with
the stock weights). Variants, for each (model, inference or training, batch):
    eager              stock, NCHW (the baseline of every speedup)
    eager_cl           stock, channels_last (image models)
    compile            torch.compile of the stock model (channels_last for image models)
    fastnets           the fused model, channels_last input, backend `auto` (on a CPU: the torch
                       reference path, with its folded batch-norms)
    fastnets_graphs    the fused model's inference replayed from a CUDA graph (GPU)
    fastnets_compile   torch.compile of the fused model
Inference runs the model converted to the run's dtype under torch.no_grad(); a training step is
zero_grad, forward and cross-entropy under autocast(dtype) with float32 weights (AMP; plain float32
on a CPU), backward and an SGD step with momentum (no GradScaler: the same for both sides).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastnets.bench import harness, roofline


@dataclasses.dataclass
class ModelCase:
    name: str                 # the fastnets.models builder
    kind: str = "image"       # "image" (N, 3, S, S) or "text" (N, L) token ids
    size: int = 224           # image side or sequence length
    min_size: int = 32        # the smallest image side the architecture takes
    gpu: bool = False         # in the default set on a GPU
    cpu: bool = False         # in the default set on a CPU
    quick: bool = False       # in the --quick subset on a GPU
    cpu_quick: bool = False   # in the --quick subset on a CPU
    compile: bool = False     # compiled under --compile auto on a GPU (compiling costs about a minute)
    cpu_train: bool = False   # its training step is in the default set on a CPU
    kwargs: dict = dataclasses.field(default_factory=dict)

    def size_for(self, override: int | None) -> int:
        return max(self.min_size, override) if (override and self.kind == "image") else self.size


# The text models' builders (fastnets/models/text_transformer.py, lstm.py).
TEXT_MODELS = ("text_transformer", "lstm_classifier")


def _family() -> list[ModelCase]:
    eff = {"efficientnet_b0": 224, "efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300,
           "efficientnet_b4": 380, "efficientnet_b5": 456, "efficientnet_b6": 528, "efficientnet_b7": 600}
    cases = [  # the default sets in this order (cheap ones early: a time budget cuts from the end)
        ModelCase("resnet50", gpu=True, cpu=True, quick=True, cpu_quick=True, compile=True, cpu_train=True),
        ModelCase("alexnet", min_size=63, gpu=True, cpu=True),
        *(ModelCase(n, kind="text", size=256, gpu=True, cpu=True) for n in TEXT_MODELS),
        ModelCase("vgg16", gpu=True),
        ModelCase("vgg11_bn", cpu=True),
        ModelCase("googlenet", gpu=True, cpu=True),
        ModelCase("densenet121", min_size=32, gpu=True, cpu=True),
        ModelCase("efficientnet_b0", gpu=True, cpu=True),
        ModelCase("vit_b_16", min_size=224, gpu=True, cpu=True, quick=True),
    ]
    cases.append(ModelCase("alexnet_2012", size=227, min_size=67))  # the paper's form, with LRN, at 227x227
    named = {c.name for c in cases}
    for name in ("zfnet", "vgg11", "vgg13", "vgg13_bn", "vgg16_bn", "vgg19", "vgg19_bn", "resnet18", "resnet34",
                 "resnet101", "resnet152", "densenet161", "densenet169", "densenet201"):
        if name not in named:
            cases.append(ModelCase(name, min_size=63 if name == "zfnet" else 32))
    cases += [ModelCase(n, size=s) for n, s in eff.items() if n not in named]
    return cases

CASES = _family()


def select(names: list[str] | None, device: torch.device, quick: bool) -> list[ModelCase]:
    """Models by name; the default set of this device for None (its quick subset under --quick);
    every model of the family for ["all"]."""
    if names == ["all"]:
        return list(CASES)
    if not names:
        if device.type == "cuda":
            return [c for c in CASES if c.gpu and (c.quick or not quick)]
        return [c for c in CASES if c.cpu and (c.cpu_quick or not quick)]
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {', '.join(unknown)}; `--list` shows them")
    return [by_name[n] for n in names]


# ----------------------------------------------------------------------------------------------
# Building the pair.

def _builder(name: str) -> Callable:
    try:
        import fastnets.models as M
    except ImportError as exc:
        raise harness.Skip(f"fastnets.models cannot be imported yet ({exc})") from exc
    fn = getattr(M, name, None)
    if fn is None:
        raise harness.Skip(f"fastnets.models.{name} does not exist yet")
    if "fused" not in inspect.signature(fn).parameters and not _takes_kwargs(fn):
        raise harness.Skip(f"fastnets.models.{name} has no `fused` argument, so no stock form to compare with")
    return fn


def _takes_kwargs(fn) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def build_stock(case: ModelCase, device: torch.device) -> torch.nn.Module:
    """The stock form in float32 on `device`, with random weights (speed does not depend on them).
    Parameters the builder initializes to zero (ViT's head and class token, say) get small random
    values too, so that the check of a fastnets variant compares outputs that are not all zero."""
    builder = _builder(case.name)
    torch.manual_seed(0)
    with torch.device(device):
        model = builder(fused=False, **case.kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def fastnets_of(case: ModelCase, stock: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The fastnets model with the stock model's weights, and how it was made."""
    import fastnets

    fuse = getattr(fastnets, "fuse", None)
    if fuse is not None:
        return fuse(stock), "fastnets.fuse(stock)"
    builder = _builder(case.name)
    with torch.device(next(stock.parameters()).device):
        model = builder(fused=True, **case.kwargs)
    model.load_state_dict(stock.state_dict(), strict=True)
    source = f"fastnets.models.{case.name}(fused=True) with the stock weights (fastnets.fuse does not exist yet)"
    return model.train(stock.training), source


def make_input(case: ModelCase, model: torch.nn.Module, batch: int, size: int, device, dtype) -> torch.Tensor:
    if case.kind == "text":  # token ids from 1: 0 is the padding index of the text models
        return torch.randint(1, _vocab_size(model), (batch, size), device=device)
    return torch.randn(batch, 3, size, size, device=device).to(dtype)


def _vocab_size(model: torch.nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    raise harness.Skip(f"{type(model).__name__}: no nn.Embedding to take the vocabulary size from")


def _num_classes(model: torch.nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return last[-1].out_features if last else 1000


def _loss(out, target) -> torch.Tensor:
    """Cross-entropy of the logits; auxiliary heads (GoogLeNet in training) weighted 0.3."""
    if isinstance(out, torch.Tensor):
        return F.cross_entropy(out.float(), target)
    heads = [t for t in out if isinstance(t, torch.Tensor)]
    return F.cross_entropy(heads[0].float(), target) + 0.3 * sum(F.cross_entropy(h.float(), target) for h in heads[1:])


def _without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with every dropout (and stochastic depth) probability set to 0, so that a
    training-mode forward is deterministic and two models can be compared."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or (
                type(m).__name__ == "StochasticDepth" and isinstance(getattr(m, "p", None), float)):
            m.p = 0.0
        for name in ("dropout", "dropout_p", "attention_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model


def _first(out):
    return out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))


# ----------------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class Settings:
    dtype: torch.dtype | None          # None: fp16 on a GPU, fp32 on a CPU
    batches: list[int]
    train_batch: int | None            # None: no training step
    compile_mode: str                  # "auto", "all" or "none"
    image_size: int | None = None
    quick: bool = False
    train_all: bool = False            # train every model run (models named explicitly), not only the defaults'
    repeat: int = 1                    # timed runs per configuration (--repeat): their spread is reported

    def dtype_on(self, device: torch.device) -> torch.dtype:
        return self.dtype or (torch.float16 if device.type == "cuda" else torch.float32)


VARIANTS = {  # name -> (label, side)
    "eager": ("stock eager NCHW", "stock"),
    "eager_cl": ("stock eager channels_last", "stock"),
    "compile": ("torch.compile (stock)", "stock"),
    "fastnets": ("fastnets", "fastnets"),
    "fastnets_graphs": ("fastnets + CUDA graphs", "fastnets"),
    "fastnets_compile": ("fastnets + torch.compile", "fastnets"),
}

# A configuration started within the budget runs its variants to the end unless the run reaches
# this multiple of the budget (a model call takes seconds on a loaded CPU).
OVERRUN = 1.5

# What one torch.compile of a model is expected to take (a large model, a training step's forward
# and backward graphs): none is started with less time left in the budget.
COMPILE_RESERVE_S = {"inference": 60.0, "training": 150.0}

# The check of a fastnets variant (DESIGN section 5's rule, on a whole model): against the stock
# model run in float64 on the same weights and input, its relative error is at most twice the
# stock model's own error in the run's dtype, plus this floor. Inference compares the first
# CHECK_ROWS samples of the timed call's output (samples are independent in eval mode); a training
# step's forward compares the whole batch (batch statistics couple the samples).
CHECK_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CHECK_ROWS = 8


def _compile_why(case: ModelCase, st: Settings, device, mode: str, batch: int) -> str | None:
    if st.compile_mode == "none":
        return "torch.compile is off in this run (--compile none, or --quick)"
    if st.compile_mode == "all":
        return None
    if device.type != "cuda":
        return ("on a CPU, inductor compiles a model for minutes on this machine and compares no fastnets kernel "
                "(--compile all, or --bench-compile all under pytest, runs it anyway)")
    if not case.compile:
        return "compiled by default only for the headline models (--compile all compiles every model)"
    if mode == "inference" and batch != max(st.batches):
        return "compiled by default at the largest batch only (--compile all for every batch)"
    return None


def run(session: harness.Session, cases: list[ModelCase], st: Settings) -> None:
    """Times every model: each configuration's eager, fused and CUDA-graph variants first, then the
    torch.compile variants while the budget lasts."""
    compiles = []
    for case in cases:
        train = [st.train_batch] if st.train_batch else []
        if train and session.device.type != "cuda" and not (case.cpu_train or st.train_all):
            session.skip(f"{case.name} training", "the default run on a CPU trains ResNet-50 only "
                         "(naming models with --models trains them too)")
            train = []
        for mode, batches in (("inference", st.batches), ("training", train)):
            for batch in batches:
                cname = _case_name(case, mode, batch, st, session.device)
                if session.budget.exhausted():
                    session.skip(cname, "the run's time budget was spent (--budget)")
                    continue
                todo = ["eager", "eager_cl", "fastnets", "fastnets_graphs"]
                _run_config(session, case, mode, batch, st, todo)
                session.case_done()
                compiles.append((case, mode, batch))
    for case, mode, batch in compiles:
        _run_config(session, case, mode, batch, st, ["compile", "fastnets_compile"])
        session.case_done()


def _case_name(case, mode, batch, st, device) -> str:
    dtype = st.dtype_on(device)
    dname = roofline.DTYPE_NAMES[dtype]
    if mode == "training":
        dname = f"amp-{dname}" if dtype != torch.float32 and device.type == "cuda" else "fp32"
    return f"{case.name} {mode} b{batch} {dname}"


def _run_config(session: harness.Session, case: ModelCase, mode: str, batch: int, st: Settings,
                variants: list[str]) -> None:
    device = session.device
    dtype = st.dtype_on(device)
    cname = _case_name(case, mode, batch, st, device)
    ms = {v: harness.Measurement("model", cname, v, *VARIANTS[v], baseline="eager") for v in variants}
    static = static_skip(case, mode, batch, st, device)
    for v, m in ms.items():
        reason = static.get(v)
        if reason is None and session.gpu_lost:
            reason = f"the CUDA context was lost earlier ({session.gpu_lost})"
        if reason is None and v.endswith("compile") and session.budget.exhausted(reserve=COMPILE_RESERVE_S[mode]):
            reason = "the run's time budget was spent before this compile variant (--budget)"
        if reason:
            m.status, m.reason = "skipped", reason
    calls = None
    if any(m.status == "ok" for m in ms.values()):
        try:
            calls = Calls(case, mode, batch, case.size_for(st.image_size), dtype, device)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built is a result
            status, reason = _failure(session, exc)
            for m in ms.values():
                if m.status == "ok":
                    m.status, m.reason = status, reason
    if calls is not None and any(m.status == "ok" and v.startswith("fastnets") for v, m in ms.items()):
        try:  # before the stock model's turn, which releases it
            calls.reference()
        except Exception as exc:  # noqa: BLE001
            status, reason = _failure(session, exc)
            for v, m in ms.items():
                if m.status == "ok" and v.startswith("fastnets"):
                    m.status, m.reason = status, f"the float64 reference for the check failed: {reason}"
    interleaved = []  # on a CPU: (variant, measurement, timed call), timed together below
    for v, m in ms.items():
        if m.status == "ok" and session.budget.exhausted(share=OVERRUN):
            m.status, m.reason = "skipped", f"the run overran its time budget by {OVERRUN - 1:.0%} (--budget)"
        if m.status != "ok":
            session.add(m)
            continue
        try:
            fn = calls.make(v)
            if v.startswith("fastnets"):
                m.check = calls.check(v, fn)
            if device.type != "cuda":  # the memory-tracking call is the warm-up on a CPU
                m.peak_mem_bytes = calls.peak_memory(v, fn)
        except Exception as exc:  # noqa: BLE001
            m.status, m.reason = _failure(session, exc)
            session.add(m)
            continue

        def after(t, m=m, fn=fn, v=v):
            m.items_per_s = batch / (t.median_ms * 1e-3)
            if device.type == "cuda":  # after the timing: warm-up allocations (autotuning) stay out
                m.peak_mem_bytes = calls.peak_memory(v, fn)

        if device.type == "cuda":
            session.run(m, lambda fn=fn: harness.unwrap(harness.repeated(
                [harness.time_gpu(fn, rep_ms=50 if st.quick else 200, min_reps=3 if st.quick else 5)
                 for _ in range(st.repeat)])), after)
            calls.release(v)
        else:
            interleaved.append((v, m, fn, after))
    if interleaved:
        # rounds of one call of each variant: a change in the machine's load (a shared CPU) hits
        # every variant alike instead of whichever was timed at the time
        # With --repeat N, N such runs one after another: each run's ratios are of the same moment;
        # their range is the spread that the table reports.
        runs = [harness.time_cpu_interleaved({v: fn for v, _, fn, _ in interleaved}, min_reps=3,
                                             max_reps=5 if st.quick else 10, target_s=0.3 if st.quick else 2.0)
                for _ in range(st.repeat)]
        for v, m, _, after in interleaved:
            session.run(m, lambda t=harness.repeated([r[v] for r in runs]): harness.unwrap(t), after)
    del calls
    if device.type == "cuda":
        torch.cuda.empty_cache()


def static_skip(case, mode, batch, st, device) -> dict[str, str]:
    """Variants that cannot run in this configuration, and why."""
    why = {}
    if case.kind == "text":
        why["eager_cl"] = "channels_last applies to image models"
    if device.type != "cuda":
        why["fastnets_graphs"] = "CUDA graphs need a GPU"
    if mode == "training":
        why["fastnets_graphs"] = why.get("fastnets_graphs") or \
            "a training step under CUDA graphs needs capturable optimizer state: not measured"
        if batch < 2:
            why.update({v: "a training step with batch-norm needs a batch of 2 or more" for v in VARIANTS})
    for v in ("compile", "fastnets_compile"):
        reason = _compile_why(case, st, device, mode, batch)
        if reason:
            why[v] = reason
    return why


def _failure(session: harness.Session, exc: Exception) -> tuple[str, str]:
    from fastnets import BackendError

    if isinstance(exc, (harness.Skip, BackendError)):
        return "skipped", str(exc)
    return "error", session.guard(exc)


class Calls:
    """The timed call of each variant of one (model, mode, batch), and its check against stock."""

    def __init__(self, case: ModelCase, mode: str, batch: int, size: int, dtype: torch.dtype, device: torch.device):
        self.case, self.batch, self.dtype, self.device = case, batch, dtype, device
        self.train = mode == "training"
        self.image = case.kind == "image"
        # float32 weights for a training step (AMP); the run's dtype for inference
        self.autocast = dtype if (self.train and device.type == "cuda" and dtype != torch.float32) else None
        stock = build_stock(case, device).train(self.train)
        self.stock = stock
        self._fast: torch.nn.Module | None = None  # built at the first fastnets variant
        self.source = ""
        self.x = make_input(case, stock, batch, size, device, torch.float32 if self.train else dtype)
        self.x_cl = self.x.contiguous(memory_format=torch.channels_last) if self.image else self.x
        self.target = torch.randint(0, _num_classes(stock), (batch,), device=device)
        self.models: dict[str, torch.nn.Module] = {}
        self.graph_peak: int | None = None
        self._reference: tuple[torch.Tensor, float] | None = None

    def fast(self) -> torch.nn.Module:
        """The fastnets model (fused in the mode it runs in), with the stock model's weights."""
        if self._fast is None:
            self._fast, self.source = fastnets_of(self.case, self.stock)
        return self._fast

    def model(self, v: str) -> torch.nn.Module:
        """The variant's own copy of the model: its dtype, memory format and compilation."""
        v = "fastnets" if v == "fastnets_graphs" else v
        if v not in self.models:
            model = copy.deepcopy(self.stock if v in ("eager", "eager_cl", "compile") else self.fast())
            model.train(self.train)
            if not self.train:
                model = model.to(self.dtype)
            if v != "eager" and self.image:
                model = model.to(memory_format=torch.channels_last)
            if v.endswith("compile"):
                torch._dynamo.reset()  # a fresh compile: no recompile limit can fall back to eager
                model = torch.compile(model)
            self.models[v] = model
        return self.models[v]

    def release(self, v: str) -> None:
        if v not in ("fastnets", "fastnets_graphs"):  # the graph replays the fastnets model's memory
            self.models.pop(v, None)

    def inputs(self, v: str) -> torch.Tensor:
        return self.x if v == "eager" else self.x_cl

    def _forward_for_check(self, model: torch.nn.Module, x: torch.Tensor, autocast: bool = True) -> torch.Tensor:
        """One forward without timing: in training mode on a copy without dropout (a compiled
        variant's model runs uncompiled), else under no_grad."""
        model = getattr(model, "_orig_mod", model)
        if self.train:
            model = _without_dropout(model)
        use = autocast and self.autocast is not None
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=use):
            return _first(model(x)).detach()

    def reference(self) -> tuple[torch.Tensor, float]:
        """The float64 stock output (first CHECK_ROWS samples in inference) and the stock model's
        relative error against it in the run's dtype: the larger of its NCHW and channels_last
        errors for image models (both are stock PyTorch; through a whole network they differ by
        up to 3x, e.g. a CPU ResNet-50 training forward: 1.5e-5 NCHW, 4.1e-5 channels_last, and
        the fastnets model runs channels_last)."""
        if self._reference is None:
            rows = self.batch if self.train else min(self.batch, CHECK_ROWS)
            x64 = self.x[:rows].double() if self.x.is_floating_point() else self.x[:rows]
            ref = self._forward_for_check(copy.deepcopy(self.stock).double(), x64, autocast=False)
            stock_err = 0.0
            for v in ("eager", "eager_cl") if self.image else ("eager",):
                stock = self._forward_for_check(self.model(v), self.inputs(v))[:rows]
                stock_err = max(stock_err, harness.relative_error(stock, ref))
                self.release(v)
            self._reference = (ref, stock_err)
        return self._reference

    def check(self, v: str, fn: Callable[[], Any]) -> str:
        """The variant's output against the float64 stock model (see CHECK_FLOOR). Inference: the
        output of one timed call. Training: one training-mode forward without dropout."""
        ref, stock_err = self.reference()
        out = self._forward_for_check(self.model(v), self.inputs(v)) if self.train else _first(fn()).detach()
        err = harness.relative_error(out[: ref.shape[0]], ref)
        ok = err <= 2 * stock_err + CHECK_FLOOR[self.dtype]
        return f"{'ok' if ok else 'MISMATCH'} (rel err {err:.1e}, stock's {stock_err:.1e}; {self.source})"

    def peak_memory(self, v: str, fn: Callable[[], Any]) -> int:
        model = self.model(v)
        resident = harness.tensor_bytes(getattr(model, "_orig_mod", model), self.inputs(v))
        if v == "fastnets_graphs":  # a replay allocates nothing: its memory was taken at capture
            return resident + (self.graph_peak or 0)
        return harness.peak_memory(fn, self.device, resident)

    def make(self, v: str) -> Callable[[], Any]:
        if v == "fastnets_graphs":
            forward = self.model("fastnets")
            replay, self.graph_peak = _cuda_graph(lambda: forward(self.x_cl))
            return replay
        model, x = self.model(v), self.inputs(v)
        if not self.train:
            def infer():
                with torch.no_grad():
                    return model(x)
            return infer
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                enabled=self.autocast is not None):
                loss = _loss(model(x), self.target)
            loss.backward()
            opt.step()
            return loss
        return step


def _cuda_graph(forward: Callable[[], Any]) -> tuple[Callable[[], Any], int]:
    """Captures one inference forward, after warm-up calls on a side stream (which also run Triton's
    autotuning); returns the graph's replay and the memory its warm-up and capture took."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward()
    torch.cuda.synchronize()
    taken = torch.cuda.max_memory_allocated() - before

    def replay():
        graph.replay()
        return static_out
    return replay, taken
