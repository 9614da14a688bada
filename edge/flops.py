"""Training FLOPs counted by torch's `FlopCounterMode`, with clbench's corrections.

Convention (put it under every table that shows these numbers): FLOPs are
floating-point operations with one multiply-accumulate = 2 FLOPs, counted by
`FlopCounterMode` with clbench's corrections over forward and backward of every
training step (replay, teacher and auxiliary-loss passes included); bias,
normalisation, elementwise and optimizer ops are excluded.

Corrections (see the edge-profiler spec, section 1.3), installed as formula
replacements, so a torch release that fixes the same formula is not corrected twice:
- `convolution_backward`: torch's grad-weight term ignores `groups` (a depthwise
  conv's weight gradient is over-counted by a factor of `groups`). Here the
  grad-weight convolution costs exactly what the forward costs.
- `_scaled_dot_product_flash_attention_for_cpu` (+ backward): missing from torch's
  registry, so attention on CPU counted 0. They get torch's own SDPA formulas, so
  CPU and CUDA runs of one model agree (backward = 2.5x forward, the fused-kernel formula).
- `_fft_r2c` / `_fft_c2r` / `_fft_c2c`: counted with the usual 5 n log2 n (complex)
  and 2.5 n log2 n (real) per transformed vector.
- clbench's own wavelet ops (`clbench::haar_dwt`, `clbench::haar_idwt`, `clbench.models.wavelets`):
  8·H·W per channel, either way (the backward of one is the other). Wavelet transforms
  written with convolutions are counted as convolutions; ones computed outside torch
  (numpy, PyWavelets) are invisible and count 0.
"""

from __future__ import annotations

import functools
import math
from collections import Counter as _Tally
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    _FlopCounterMode,
    conv_flop_count,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from clbench.models.wavelets import HAAR_DWT_OP, HAAR_IDWT_OP

aten = torch.ops.aten

CONVENTION = (
    "FLOPs are floating-point operations with one multiply-accumulate = 2 FLOPs, counted by "
    "FlopCounterMode with clbench's corrections over forward and backward of every training step "
    "(replay, teacher and auxiliary-loss passes included); bias, normalisation, elementwise and "
    "optimizer ops are excluded."
)


# --------------------------------------------------------------------------- corrected formulas
def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape, **_) -> int:
    flops = 0
    if output_mask[0]:  # grad-input: the transposed convolution of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad-weight pairs every output with every kernel tap once: the forward's cost
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def _sdpa_cpu(query_shape, key_shape, value_shape, *_, **__) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *_, **__) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def fft_flops(n: int, vectors: int = 1, real: bool = False) -> int:
    """5 n log2 n per complex length-n transform, half that for real input/output."""
    if n <= 1:
        return 0
    per = (2.5 if real else 5.0) * n * math.log2(n)
    return int(round(per * vectors))


def _fft_r2c(x_shape, dim, _normalization, _onesided, **_) -> int:
    n = math.prod(x_shape[d] for d in dim)
    return fft_flops(n, math.prod(x_shape) // max(n, 1), real=True)


def _fft_c2r(_x_shape, dim, _normalization, _last_dim_size, out_shape=None, **_) -> int:
    n = math.prod(out_shape[d] for d in dim)
    return fft_flops(n, math.prod(out_shape) // max(n, 1), real=True)


def _fft_c2c(x_shape, dim, _normalization, _forward, **_) -> int:
    n = math.prod(x_shape[d] for d in dim)
    return fft_flops(n, math.prod(x_shape) // max(n, 1))


def _haar_dwt(x_shape, **_) -> int:
    *lead, h, w = x_shape  # the full-resolution side: [..., C, H, W]
    return haar_dwt2_flops(math.prod(lead), h, w)


def _haar_idwt(_ll_shape, _details_shape, out_shape=None, **_) -> int:
    return _haar_dwt(out_shape)


_CORRECTIONS: dict[Any, Callable] = {
    aten.convolution_backward: _conv_backward,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten._fft_r2c: _fft_r2c,
    aten._fft_c2r: _fft_c2r,
    aten._fft_c2c: _fft_c2c,
    HAAR_DWT_OP: _haar_dwt,
    HAAR_IDWT_OP: _haar_idwt,
}


def register_flop_formula(op) -> Callable[[Callable], Callable]:
    """Count a custom op (e.g. a `torch.library` wavelet kernel): `fn(*arg_shapes, out_shape=..., **kw) -> int`."""

    def deco(fn: Callable) -> Callable:
        _CORRECTIONS[getattr(op, "_overloadpacket", op)] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- op trace (roofline input)
_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"}
_CONV_OPS = {"convolution", "_convolution", "convolution_backward", "cudnn_convolution", "convolution_overrideable", "_slow_conv2d_forward"}


def op_kind(name: str) -> str:
    """'conv', 'matmul' (GEMM and attention: tensor-core eligible) or 'other' (memory-bound)."""
    if name in _CONV_OPS:
        return "conv"
    if name in _MATMUL_OPS or "attention" in name:
        return "matmul"
    return "other"


@dataclass
class StepProfile:
    """The ops of one training step: (name, kind, dtype, flops, bytes) -> number of calls."""

    ops: _Tally = field(default_factory=_Tally)

    @property
    def flops(self) -> int:
        return sum(k[3] * n for k, n in self.ops.items())

    @property
    def bytes(self) -> int:
        return sum(k[4] * n for k, n in self.ops.items())

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    def scaled(self, factor: int) -> "StepProfile":
        return StepProfile(_Tally({k: n * factor for k, n in self.ops.items()}))

    def __add__(self, other: "StepProfile") -> "StepProfile":
        return StepProfile(self.ops + other.ops)

    def summary(self) -> dict[str, int]:
        return {"flops": self.flops, "bytes": self.bytes, "ops": self.n_ops}


class _TracingFlopCounter(FlopCounterMode):
    """`FlopCounterMode` that also records every counted aten op with its FLOPs and the
    bytes it reads and writes, built to be cheap enough to run inside training steps.

    Bytes are input + output tensor sizes, an upper bound because fusion is ignored;
    view ops move nothing and are skipped.

    Five things make its overhead per step a fraction of the plain mode's (the profiler
    runs it inline, so its cost is training time): one dispatch mode records both the count
    and the trace; ops without a CompositeImplicitAutograd kernel skip torch's decomposition
    attempt, which could only return NotImplemented for them (every other op still takes
    torch's own path); how each op is handled (its path, formula and trace facts) is looked
    up once per counter; torch's shape-taking formulas get the shapes from a small mapper
    instead of a generic pytree map; and no per-module tracker is installed, because only
    the global totals are read. Counts and traces are tested identical to torch's own path.
    """

    def __init__(self, custom_mapping: dict, lean: bool = True):
        super().__init__(display=False, custom_mapping=custom_mapping)
        self.profile = StepProfile()
        self._lean = lean
        self._direct: dict[int, tuple] = {}
        if lean:
            self.mod_tracker = _GlobalOnly()

    def __enter__(self):
        self.profile = StepProfile()  # a counter may be re-entered: each entry is a fresh count
        if not self._lean:
            return super().__enter__()
        self.flop_counts.clear()
        self.mode = _LeanDispatch(self)
        self.mode.__enter__()
        return self

    def _count_flops(self, func_packet, out, args, kwargs):
        # the parent's bookkeeping, done here so each formula is evaluated once for both records
        formula = self.flop_registry.get(func_packet)
        flops = 0
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            for parent in set(self.mod_tracker.parents):
                self.flop_counts[parent][func_packet] += flops
        self._trace(_op_facts(func_packet), flops, out, args, kwargs)
        return out

    def _trace(self, facts, flops, out, args, kwargs) -> None:
        name, kind, moves_data = facts
        if moves_data:
            nbytes, dtype = _tensor_bytes(args, 0, None)
            if kwargs:
                nbytes, dtype = _tensor_bytes(kwargs.values(), nbytes, dtype)
            if isinstance(out, torch.Tensor):  # most ops: one tensor out
                nbytes += out.nbytes
                if dtype is None and out.is_floating_point():
                    dtype = _dtype_name(out.dtype)
            else:
                nbytes, dtype = _tensor_bytes((out,), nbytes, dtype)
            self.profile.ops[(name, kind, dtype or "none", flops, nbytes)] += 1

    def _direct_entry(self, func) -> tuple | None:
        """How this counter handles `func`, looked up once per op: None for torch's own path, else
        (callable, flop formula, formula on shapes, packet, trace facts, func). `func` itself is
        kept so the id the entry is filed under stays unique."""
        entry = None
        if _runs_directly(func):
            packet = func._overloadpacket
            formula = self.flop_registry.get(packet)
            on_shapes = _formula_on_shapes(formula) if formula is not None else None
            # OpOverload.__call__ only forwards to `_op`; calling that saves a Python frame per op
            entry = (func._op, formula, on_shapes, packet, _op_facts(packet), func)
        self._direct[id(func)] = entry
        return entry

    def _count_direct(self, entry: tuple, out, args, kwargs):
        """What `_count_flops` does, for an op `_runs_directly` admits, after it ran."""
        _, formula, on_shapes, packet, facts, _ = entry
        flops = 0
        if formula is not None:
            kwargs = kwargs or {}
            if on_shapes is not None:  # torch's shape_wrapper, with a cheaper tensor -> shape map
                flops = int(on_shapes(*_shapes(args), out_shape=_shapes(out), **_shapes(kwargs)))
            else:
                flops = int(formula(*args, **kwargs, out_val=out))
            self.flop_counts["Global"][packet] += flops
        self._trace(facts, flops, out, args, kwargs)
        return out


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every op is attributed to "Global" only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _LeanDispatch(_FlopCounterMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # runs for every op of a counted step: entries are keyed by id (an op's own __hash__ is
        # Python code), and ops that neither have a formula nor move data (views, detach: about
        # half of a training step's ops) return straight away
        counter = self.counter
        direct = counter._direct
        entry = direct[id(func)] if id(func) in direct else counter._direct_entry(func)
        if entry is None:
            return super().__torch_dispatch__(func, types, args, kwargs)
        out = entry[0](*args, **kwargs) if kwargs else entry[0](*args)
        if entry[1] is None and not entry[4][2]:
            return out
        return counter._count_direct(entry, out, args, kwargs)


def _runs_directly(func) -> bool:
    """True for an op torch's flop-counting dispatch would simply execute and count: a plain
    OpOverload with no CompositeImplicitAutograd kernel (its decompose() returns NotImplemented)."""
    cia = torch._C.DispatchKey.CompositeImplicitAutograd
    # the skip set first: some of its ops (is_strides_like_format) have no dispatcher entry to ask
    return (isinstance(func, torch._ops.OpOverload) and func not in _TORCH_SKIPPED and cia not in func.py_kernels
            and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), cia))


# ops torch's dispatch hands back (NotImplemented) or treats specially; they take its path
_TORCH_SKIPPED = {
    aten.sym_is_contiguous.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
    aten.is_strides_like_format.default, aten.is_non_overlapping_and_dense.default, aten.size.default,
    aten.sym_size.default, aten.stride.default, aten.sym_stride.default, aten.storage_offset.default,
    aten.sym_storage_offset.default, aten.numel.default, aten.sym_numel.default, aten.dim.default,
    torch.ops.prim.layout.default,
}


_SHAPE_WRAPPER_CODE = shape_wrapper(lambda: 0).__code__


def _unwrapped(formula) -> Callable | None:
    """The shape-taking function inside a formula torch wrapped with `shape_wrapper`, else None."""
    if getattr(formula, "__code__", None) is _SHAPE_WRAPPER_CODE:
        return getattr(formula, "__wrapped__", None)
    return None


_MM_ON_SHAPES = _unwrapped(flop_registry[aten.mm])


def _addmm_on_shapes(_self_shape, a_shape, b_shape, *_, **__) -> int:
    # torch's addmm formula calls its registered (shape-wrapped) mm formula, a pytree pass per
    # call; this is the same count from the mm formula inside the wrapper
    return _MM_ON_SHAPES(a_shape, b_shape)


# only where torch wraps both formulas; otherwise its addmm formula is used as it is
_ADDMM_ON_SHAPES = {}
if _MM_ON_SHAPES is not None and _unwrapped(flop_registry[aten.addmm]) is not None:
    _ADDMM_ON_SHAPES[_unwrapped(flop_registry[aten.addmm])] = _addmm_on_shapes


@functools.lru_cache(maxsize=None)
def _formula_on_shapes(formula) -> Callable | None:
    """What the lean path calls with shapes for a formula: the function inside torch's
    `shape_wrapper` (addmm's replaced by the equal count above), else None."""
    inner = _unwrapped(formula)
    return _ADDMM_ON_SHAPES.get(inner, inner)


def _shapes(obj):
    """`obj` with every tensor replaced by its shape (what torch's flop formulas take), for
    the containers aten ops use: tuples (named too), lists and dicts; like torch's pytree
    map, other tuple subclasses (torch.Size) are leaves."""
    if isinstance(obj, torch.Tensor):
        return obj.shape
    if isinstance(obj, list):
        return [_shapes(o) for o in obj]
    if type(obj) is tuple:
        return tuple(_shapes(o) for o in obj)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # a namedtuple
        return type(obj)(*(_shapes(o) for o in obj))
    if isinstance(obj, dict):
        return {k: _shapes(v) for k, v in obj.items()}
    return obj


def _tensor_bytes(items, nbytes: int, dtype: str | None) -> tuple[int, str | None]:
    """Adds the sizes of the tensors in `items` (nested lists/tuples/dicts too); the first
    floating dtype seen names the op's precision."""
    for t in items:
        if isinstance(t, torch.Tensor):
            nbytes += t.nbytes
            if dtype is None and t.is_floating_point():
                dtype = _dtype_name(t.dtype)
        elif isinstance(t, (list, tuple)):
            if t and not isinstance(t[0], int):  # aten lists are homogeneous: sizes and dims hold no tensors
                nbytes, dtype = _tensor_bytes(t, nbytes, dtype)
        elif isinstance(t, dict):
            nbytes, dtype = _tensor_bytes(t.values(), nbytes, dtype)
    return nbytes, dtype


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def _op_facts(packet) -> tuple[str, str, bool]:
    """(name, kind, moves data) of an op packet; view ops and detach move nothing."""
    name = packet.__name__
    overloads = [getattr(packet, o, None) for o in packet.overloads()]
    moves_data = packet is not aten.detach and not any(getattr(o, "is_view", False) for o in overloads)
    return name, op_kind(name), moves_data


# --------------------------------------------------------------------------- counting
class Counter:
    """A corrected `FlopCounterMode` (optionally with a per-op trace) that can be entered and
    exited from separate callback hooks: `c.start()` ... `c.stop()`, or `with Counter() as c:`.
    Each start begins a fresh count, so one counter can serve many steps."""

    def __init__(self, trace: bool = False):
        verify_corrections()
        self._trace = trace
        self._fcm = _TracingFlopCounter(dict(_CORRECTIONS))
        self.active = False

    def start(self) -> "Counter":
        self._fcm.__enter__()
        self.active = True
        return self

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        self._fcm.__exit__(None, None, None)

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def total(self) -> int:
        return int(self._fcm.get_total_flops())

    def by_op(self) -> dict[str, int]:
        return {getattr(k, "__name__", str(k)): int(v) for k, v in self._fcm.get_flop_counts().get("Global", {}).items()}

    @property
    def profile(self) -> StepProfile | None:
        return self._fcm.profile if self._trace else None


def measure_flops(fn: Callable[[], Any]) -> int:
    """Corrected FLOPs of everything `fn` executes, backward included if `fn` calls it.

    Example: `measure_flops(lambda: sum(strategy.step_losses(batch).values()).backward())`.
    Works on `meta` tensors too (nothing is computed, shapes are enough).
    """
    with Counter() as c:
        fn()
    return c.total


# --------------------------------------------------------------------------- self-test
def _raw_and_corrected(fn: Callable[[], Any]) -> tuple[int, int]:
    with FlopCounterMode(display=False) as raw:
        fn()
    with FlopCounterMode(display=False, custom_mapping=dict(_CORRECTIONS)) as fixed:
        fn()
    return int(raw.get_total_flops()), int(fixed.get_total_flops())


def _depthwise_step():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False, device="meta")
    conv(torch.empty(1, 16, 32, 32, device="meta", requires_grad=True)).sum().backward()


def _cpu_sdpa():
    q = torch.zeros(1, 2, 4, 8)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)


@functools.lru_cache(maxsize=1)
def torch_behaviour() -> dict[str, Any]:
    """What the installed torch counts without clbench's corrections (stored with every run).

    Raises RuntimeError if the corrected counts disagree with the analytic values, so a
    torch upgrade that changes the formulas is noticed instead of silently mis-counted.
    """
    depthwise_expected = 3 * conv2d_flops(1, 16, 16, 32, 32, 3, 3, groups=16)  # 884,736
    sdpa_expected = sdpa_flops(1, 2, 4, 4, 8, 8)
    # the self-test runs a backward: independent of the caller's no_grad / inference_mode (the first
    # Counter() may well be created inside an evaluation loop)
    with torch.inference_mode(False), torch.enable_grad():
        raw_dw, fixed_dw = _raw_and_corrected(_depthwise_step)
        raw_sdpa, fixed_sdpa = _raw_and_corrected(_cpu_sdpa)
    if fixed_dw != depthwise_expected or fixed_sdpa != sdpa_expected:
        raise RuntimeError(
            f"clbench FLOP corrections disagree with the analytic counts on torch {torch.__version__}: "
            f"depthwise conv step {fixed_dw} (expected {depthwise_expected}), CPU SDPA {fixed_sdpa} "
            f"(expected {sdpa_expected}); update clbench/edge/flops.py"
        )
    return {
        "torch": torch.__version__,
        "grouped_conv_weight_grad": "corrected (torch over-counts by groups)" if raw_dw != depthwise_expected else "torch already exact",
        "cpu_sdpa": "corrected (torch counts 0)" if raw_sdpa != sdpa_expected else "torch already exact",
        "attention_backward": "fused-kernel formula, 2.5x forward",
    }


def verify_corrections() -> None:
    torch_behaviour()


# --------------------------------------------------------------------------- analytic formulas (spec 1.5)
def conv2d_flops(n: int, c_in: int, c_out: int, h_out: int, w_out: int, k_h: int, k_w: int, groups: int = 1) -> int:
    """Forward FLOPs of a 2D convolution, bias excluded: 2 N C_out H_o W_o (C_in/g) K_h K_w."""
    return 2 * n * c_out * h_out * w_out * (c_in // groups) * k_h * k_w


def linear_flops(m: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of a Linear layer on M rows, bias excluded."""
    return 2 * m * d_in * d_out


def sdpa_flops(b: int, h: int, n_q: int, n_k: int, d_qk: int, d_v: int) -> int:
    """Forward FLOPs of scaled dot-product attention (QK^T and AV)."""
    return 2 * b * h * n_q * n_k * d_qk + 2 * b * h * n_q * n_k * d_v


def mha_flops(b: int, n: int, d: int) -> int:
    """Forward FLOPs of a standard multi-head attention block (Q/K/V/out projections + attention)."""
    return linear_flops(b * n, d, 3 * d) + linear_flops(b * n, d, d) + 4 * b * n * n * d


def haar_dwt2_flops(c: int, h: int, w: int) -> int:
    """Single-level 2D Haar DWT via 2x2 stride-2 filters: 8 H W FLOPs per channel."""
    return 8 * h * w * c


__all__ = [
    "CONVENTION",
    "Counter",
    "StepProfile",
    "conv2d_flops",
    "fft_flops",
    "haar_dwt2_flops",
    "linear_flops",
    "measure_flops",
    "mha_flops",
    "op_kind",
    "register_flop_formula",
    "sdpa_flops",
    "torch_behaviour",
]
