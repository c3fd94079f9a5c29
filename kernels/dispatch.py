"""Choose between the Triton kernels and the torch reference for QuantLinear's matmuls.

    with use_kernels("auto"):       Triton when the tensors are on CUDA, triton imports and the
                                    shape/dtypes are supported; the reference otherwise (default)
    with use_kernels("triton"):     always the Triton kernels (raises if triton is missing; on
                                    CPU only under TRITON_INTERPRET=1, how the tests run it)
    with use_kernels("reference"):  always the torch reference (qat.primitives / qat.packing)

The mode lives in a ``contextvars.ContextVar`` (default: the ``QAT_KERNELS`` environment
variable, else "auto"): ``use_kernels`` sets it for the ``with`` block only, per thread and
per asyncio task, and there is no module-level mode to change. A path is chosen once per call
(``kernel_path``): QuantLinear's forward records it and its backward takes the same path, even
when the backward runs after the ``with`` block or on autograd's device thread.

Paths: "reference" (torch), "triton" (the launcher, also on CPU under TRITON_INTERPRET) or
"op" (the ``torch.library`` op ``qat::<name>``, which picks Triton or the reference by device).
The layer-facing entry points take a ``QuantLinear``:

    quant_linear(x, layer)          -> x @ W_hat^T          (no bias, no outside adapter)
    quant_linear_backward(grad_y, x, layer, trainables, path) -> (dX, gradients of the steps,
                                    zero points and inside-adapter parameters; LoRA's fused)
    fake_quant_weight(layer)        -> W_hat (no autograd)
    quant_codes(layer)              -> the integer codes W_hat is built from (what export writes)

and, on tensors, ``pack_int32`` / ``unpack_int32`` (the base's and the export's int32 words,
``qat.packing``'s layout) and ``fwht`` (the outside WHT adapter's transform).

An inside adapter whose ``low_rank_factors()`` (qat.adapter) gives its factors reaches the
kernels as A, B and scaling: they form D = scaling * B A tile by tile in registers, so no dense
D is built in forward or backward. That D may round differently from torch's
``(B @ A) * scaling``, so ``quant_codes`` (and through it ``QuantLinear.export_codes``) takes
the same path as the forward: on the kernel path the codes come from the same in-kernel D as
training's W_hat; on the reference path nothing changes.
"""

from __future__ import annotations

import contextvars
import os

import torch
import torch.nn.functional as F

from qat import packing
from qat import primitives as P
from qat.adapter import inside_adapter, low_rank_factors
from qat.kernels import ops
from qat.kernels.args import WeightArgs
from qat.kernels.support import (FLOATS, PACK_DTYPES, floats, fwht_tile, grads_block_k,
                                 triton_available)

MODES = ("auto", "triton", "reference")
_MODE = contextvars.ContextVar("qat_kernel_mode", default=os.environ.get("QAT_KERNELS", "auto"))


class use_kernels:
    """``with use_kernels("reference"):`` runs the block under ``mode``, then restores the
    previous one. The mode is checked at the call, before the block starts; a call outside a
    ``with`` changes nothing."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown kernel mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "triton" and not triton_available():
            raise RuntimeError("kernel mode 'triton' needs triton: pip install 'qat[triton]'")
        self.mode, self._tokens = mode, []

    def __enter__(self) -> str:
        self._tokens.append(_MODE.set(self.mode))  # a stack: the same object may nest
        return self.mode

    def __exit__(self, *exc) -> bool:
        _MODE.reset(self._tokens.pop())
        return False


def kernel_mode() -> str:
    return _MODE.get()


def _path(applies: bool, t: torch.Tensor) -> str:
    """The mode logic every entry point shares: "reference" when the mode says so or the kernel
    does not apply; "triton" when forced; in "auto", "op" for CUDA tensors with triton."""
    mode = _MODE.get()
    if mode == "reference" or not applies:
        return "reference"
    if mode == "triton":
        return "triton"
    return "op" if t.is_cuda and triton_available() else "reference"


def _run(module: str, name: str, path: str, *args):
    """The Triton launcher ``launch_<name>`` of ``qat.kernels.<module>`` (path "triton") or the
    op ``qat::<name>`` (path "op") on ``args``, a ``WeightArgs`` among them flattened for the op."""
    if path == "triton":
        return ops.launcher(module, name)(*args)
    flat = [a for arg in args for a in (arg.flat() if isinstance(arg, WeightArgs) else (arg,))]
    return getattr(torch.ops.qat, name)(*flat)


# --------------------------------------------------------------------------- the layer's weight
def weight_args(layer, delta: torch.Tensor | None = None, factors: bool = True) -> WeightArgs:
    """The kernels' ``WeightArgs`` for a QuantLinear (steps cast to the saved dtype, as the
    layer). An inside adapter with ``low_rank_factors`` goes in as its factors (when
    ``factors``); any other inside adapter as ``delta``, its dense D (built here unless given).
    """
    scale, zero = layer.fake_quant_steps()
    adapter = inside_adapter(layer)
    lora = low_rank_factors(adapter) if factors and adapter is not None else None
    if delta is None and lora is None and adapter is not None:
        delta = adapter.delta_weight()
    qmin, qmax = P.qrange(layer.spec.bits)
    w = WeightArgs(layer.base_packed, layer.base_scale, layer.base_zero_point, scale.detach(),
                   None if zero is None else zero.detach(), None if delta is None else delta.detach(),
                   int(layer.spec.storage_bits), qmin, qmax, layer.group_size, layer.in_features,
                   layer.scale_dtype)
    if lora is None:
        return w
    return w.replace(lora_a=lora.a.detach(), lora_b=lora.b.detach(), lora_scaling=lora.scaling)


def supported(layer, act: torch.Tensor | None = None) -> bool:
    """Whether the Triton path applies to this layer (and activation) at all. The kernels
    rebuild W_hat from the packed base by re-rounding: layers in train_mode 'frozen_codes' or
    'full_weight' (qat.quant_linear) take the torch reference path, explicitly."""
    if getattr(layer, "train_mode", "fake_quant") != "fake_quant":
        return False
    if not layer.fake_quant_enabled or not 1 <= int(layer.spec.storage_bits) <= 8:
        return False
    if getattr(layer, "slice_bits", None) is not None:  # a Matryoshka slice: the reference path computes it
        return False
    tensors = [layer.base_scale, layer.weight_scale, act]
    adapter = inside_adapter(layer)
    lora = low_rank_factors(adapter) if adapter is not None else None
    if lora is not None:  # its factors go into the kernels
        tensors += [lora.a, lora.b]
    return layer.scale_dtype in FLOATS and floats(*tensors)


def kernel_path(layer, act) -> str:
    return _path(supported(layer, act), act)


def quant_linear(x: torch.Tensor, layer, path: str | None = None) -> torch.Tensor:
    """y = x @ W_hat^T (no bias) for the forward, on ``path`` (default ``kernel_path``);
    no autograd through the result."""
    path = path or kernel_path(layer, x)
    if path == "reference":
        with torch.no_grad():
            return F.linear(x, layer.fake_quant_weight().to(x.dtype))
    return _run("triton_kernels", "quant_linear_fwd", path, x, weight_args(layer))


def quant_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, layer, trainables, path: str,
                          need_dx: bool = True) -> tuple:
    """(dX or None, gradients for ``trainables``) of y = x W_hat^T through the fused kernels
    on ``path`` (the forward's, "triton" or "op"): dX = grad_y @ W_hat, and the step /
    zero-point / inside-adapter gradients reduced from G = grad_y^T x tile by tile; no dense
    W_hat or G. grad_y [..., out], x [..., in]; ``trainables`` is ``layer.trainable_tensors()``,
    the order of the returned list.

    Low-rank factors go in as in the forward: both ops form D in registers (the forward's D,
    bit for bit) and the grads op reduces dA and dB itself (also when they are frozen: the op
    has no switch for it). Any other inside adapter's D is built once, densely, for both ops;
    the op returns dD [out, in] and the adapter's own autograd maps it to its parameters.
    """
    adapter = inside_adapter(layer)
    lora = low_rank_factors(adapter) if adapter is not None else None
    wanted = {id(t) for t in trainables}
    adapter_wanted = adapter is not None and any(id(p) in wanted for p in adapter.parameters())
    delta, delta_graph = _dense_delta(adapter, adapter_wanted) if lora is None else (None, None)
    weight = weight_args(layer, delta)
    grad_x = _run("triton_kernels", "quant_linear_dx", path, grad_y, weight) if need_dx else None
    if not trainables:
        return grad_x, []
    args = (grad_y, x, weight, P.lsq_grad_scale(layer.group_size, layer.spec.bits),
            delta_graph is not None)
    # The op's CUDA impl falls back to the reference itself; direct Triton needs the tile check.
    if path == "op" or grads_block_k(layer.group_size):
        outs = _run("triton_grads", "quant_linear_grads", path, *args)
    else:
        outs = ops.reference_grads(*args)
    grad_scale, grad_zero, grad_delta, grad_a, grad_b = outs
    found = {id(layer.weight_scale): grad_scale.to(layer.weight_scale.dtype)}  # the cast's backward
    if layer.weight_zero_point is not None:
        found[id(layer.weight_zero_point)] = grad_zero.to(layer.weight_zero_point.dtype)
    if lora is not None:
        found[id(lora.a)], found[id(lora.b)] = grad_a, grad_b
    if delta_graph is not None:
        params = [p for p in adapter.parameters() if id(p) in wanted]
        found.update(zip(map(id, params),
                         torch.autograd.grad(delta_graph, params, grad_delta, allow_unused=True)))
    return grad_x, [found.get(id(t)) for t in trainables]


def _dense_delta(adapter, with_graph: bool) -> tuple:
    """(D [out, in] detached, D with its graph to the adapter's parameters or None) for an inside
    adapter without low-rank factors; (None, None) without an inside adapter."""
    if adapter is None:
        return None, None
    if with_graph:
        with torch.enable_grad():
            graph = adapter.delta_weight()
        return graph.detach(), graph
    with torch.no_grad():
        return adapter.delta_weight(), None


def fake_quant_weight(layer) -> torch.Tensor:
    """W_hat [out, in] in the layer's scale dtype, without autograd, on the forward's path."""
    path = kernel_path(layer, layer.weight_scale)
    if path == "reference":
        with torch.no_grad():
            return layer.fake_quant_weight()
    return _run("triton_kernels", "dequant_fakequant", path, weight_args(layer))


def quant_codes(layer) -> torch.Tensor:
    """The codes [out, in] int8, clamp(round((W0 + D)/s) + z), that the forward's W_hat is built
    from on this layer's path: the kernels' own (same in-kernel D, same v, same rounding) on the
    kernel path, ``P.quantize_codes`` of ``pre_quant_weight`` on the reference path. The path is
    chosen as for ``fake_quant_weight``: by the device the layer lives on, which is the device
    its activations run on."""
    path = kernel_path(layer, layer.weight_scale)
    if path == "reference":
        scale, zero = layer.fake_quant_steps()
        with torch.no_grad():
            return P.quantize_codes(layer.pre_quant_weight(), scale, zero, layer.spec.bits,
                                    layer.group_size)
    return _run("triton_kernels", "quant_codes", path, weight_args(layer))


# --------------------------------------------------------------------------- pack / unpack
def pack_path(t: torch.Tensor) -> str:
    """``kernel_path``'s mode logic for a tensor of codes or words. Integer dtypes the kernels
    do not read go to the reference, which accepts (or rejects) them as before."""
    return _path(t.dtype in PACK_DTYPES, t)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """``qat.packing.pack_int32`` through the path of ``pack_path``: codes [rows, n] -> int32
    [rows, ceil(n*b/32)] (dim=1) or [ceil(rows*b/32), n] (dim=0), the same bits on every path
    (on CPU in "auto", the reference itself)."""
    path = pack_path(codes)
    if path == "reference":
        return packing.pack_int32(codes, bits, dim)
    return _run("packing_kernels", "pack_int32", path, codes, bits, dim)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """``qat.packing.unpack_int32`` through the path of ``pack_path``: int32 words -> int8
    codes, ``n`` per row (dim=1) or per column (dim=0)."""
    path = pack_path(packed) if packed.dtype == torch.int32 else "reference"
    if path == "reference":
        return packing.unpack_int32(packed, bits, n, dim)
    return _run("packing_kernels", "unpack_int32", path, packed, bits, n, dim)


# --------------------------------------------------------------------------- Walsh-Hadamard transform
def fwht_path(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> str:
    """"reference", "triton" or "op" (qat::fwht) for the transform of x: ``kernel_path``'s
    mode logic, for widths with a kernel tile (``support.fwht_tile``) and float dtypes."""
    dtypes_ok = x.dtype in FLOATS and (out_dtype is None or out_dtype in FLOATS)
    return _path(dtypes_ok and fwht_tile(x.shape[-1]) is not None, x)


class _TritonFWHT(torch.autograd.Function):
    """z = scale * x H^T through the Triton launcher; the map is linear, so its backward is the
    transposed transform: dx = scale * dz H, in x's dtype (the same kernel, transpose flipped)."""

    @staticmethod
    def forward(ctx, x, transpose, scale, out_dtype):
        ctx.transpose, ctx.scale, ctx.x_dtype = transpose, scale, x.dtype
        return ops.launcher("hadamard_kernels", "fwht")(x, transpose, scale, out_dtype)

    @staticmethod
    def backward(ctx, grad_z):
        launch = ops.launcher("hadamard_kernels", "fwht")
        return launch(grad_z, not ctx.transpose, ctx.scale, ctx.x_dtype), None, None, None


def fwht(x: torch.Tensor, transpose: bool = False, scale: float = 1.0,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale * x H_n^T (or scale * x H_n), x [..., n] -> [..., n] in ``out_dtype`` (default x's),
    differentiable: the Triton kernel or qat::fwht per ``fwht_path``, else the torch reference
    (``qat.hadamard.fwht`` in fp32, or fp64 for fp64 inputs)."""
    path = fwht_path(x, out_dtype)
    if path == "triton":
        return _TritonFWHT.apply(x, transpose, scale, out_dtype)
    if path == "op":
        return ops.fwht_op(x, transpose, scale, out_dtype)
    return ops.reference_fwht(x, transpose, scale, out_dtype)
