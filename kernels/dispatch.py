"""Choose between the Triton kernels and the torch reference for QuantLinear's matmuls.

    use_kernels("auto")       Triton when the tensors are on CUDA, triton imports and the
                              shape/dtypes are supported; the reference otherwise (default)
    use_kernels("triton")     always the Triton kernels (raises if triton is missing; on CPU it
                              works only under TRITON_INTERPRET=1, which is how the tests run it)
    use_kernels("reference")  always the torch reference (qat.primitives / qat.packing)

``use_kernels`` sets the mode process-wide and also works as a context manager that restores
the previous mode on exit. The layer-facing entry points take a ``QuantLinear``:

    quant_linear(x, layer)        -> x @ W_hat^T          (no bias, no outside adapter)
    quant_linear_backward(grad_y, x, layer, trainables) -> (dX, gradients of the steps, zero
                                  points and inside-adapter parameters; LoRA's A and B fused)
    dense_weight(layer)           -> W_hat (no autograd)
    quant_codes(layer)            -> the integer codes W_hat is built from (what export writes)

and, on tensors, ``pack_int32`` / ``unpack_int32`` (the base's and the export's int32 words,
``qat.packing``'s layout) and ``fwht`` (the outside WHT adapter's transform).

A plain inside ``LoRAAdapter`` reaches the kernels as its factors A, B and scaling: the kernels
form D = scaling * B A tile by tile in registers, so no dense D is built in forward or backward.
That D may round differently from torch's ``(B @ A) * scaling``, so ``quant_codes`` (and through
it ``QuantLinear.export_codes``) takes the same path as the forward: on the kernel path the codes
come from the same in-kernel D as training's W_hat; on the reference path nothing changes.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F

from qat import packing
from qat import primitives as P

MODES = ("auto", "triton", "reference")
_mode = os.environ.get("QAT_KERNELS", "auto")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Integer dtypes the pack kernel reads codes from (qat.packing accepts any integer dtype).
PACK_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class use_kernels:
    """Set the kernel mode; usable as a plain call or as ``with use_kernels("reference"):``."""

    def __init__(self, mode: str):
        global _mode
        if mode not in MODES:
            raise ValueError(f"unknown kernel mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "triton" and not triton_available():
            raise RuntimeError("kernel mode 'triton' needs triton: pip install 'qat[triton]'")
        self.previous, _mode = _mode, mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _mode
        _mode = self.previous
        return False


def kernel_mode() -> str:
    return _mode


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _inside_adapter(layer):
    adapter = layer.adapter
    return adapter if adapter is not None and adapter.placement == "inside" else None


def weight_args(layer, delta: torch.Tensor | None = None, build_delta: bool = True) -> tuple:
    """The op's weight arguments for a QuantLinear (steps cast to the saved dtype, as the layer),
    with a dense D: the dense-D path (see ``kernel_args`` for the fused LoRA one).

    ``delta``: the inside adapter's D when the caller has built it already (else built here,
    unless ``build_delta`` is False: then no D, for a caller passing the LoRA factors instead).
    """
    scale, zero = layer._steps()
    if delta is None and build_delta and _inside_adapter(layer) is not None:
        delta = layer.adapter.delta_weight()
    qmin, qmax = P.qrange(layer.spec.bits)
    return (layer.base_packed, layer.base_scale, layer.base_zero_point, scale.detach(),
            None if zero is None else zero.detach(), None if delta is None else delta.detach(),
            int(layer.spec.storage_bits), qmin, qmax, layer.group_size, layer.in_features,
            layer.scale_dtype)


def supported(layer, act: torch.Tensor | None = None) -> bool:
    """Whether the Triton path applies to this layer (and activation) at all."""
    if not layer.fake_quant_enabled or not 1 <= int(layer.spec.storage_bits) <= 8:
        return False
    tensors = [layer.base_scale, layer.weight_scale, act]
    lora = _plain_lora(_inside_adapter(layer))
    if lora is not None:  # its factors go into the kernels
        tensors += [lora.lora_A, lora.lora_B]
    return layer.scale_dtype in _FLOATS and all(t is None or t.dtype in _FLOATS for t in tensors)


def _path(applies: bool, t: torch.Tensor) -> str:
    """The mode logic every entry point shares: "reference" when the mode says so or the kernel
    does not apply; "triton" (the launcher, also on CPU under TRITON_INTERPRET) when forced;
    in "auto", "op" (the torch.library op) for CUDA tensors with triton, else "reference"."""
    if _mode == "reference" or not applies:
        return "reference"
    if _mode == "triton":
        return "triton"
    return "op" if t.is_cuda and triton_available() else "reference"


def kernel_path(layer, act) -> str:
    return _path(supported(layer, act), act)


def _run(name: str, path: str, *args, module: str = "triton_kernels"):
    """Call the Triton launcher ``name`` of ``qat.kernels.<module>`` (path "triton") or the
    torch.library op ``qat::name`` (path "op")."""
    if path == "triton":
        return getattr(importlib.import_module(f"qat.kernels.{module}"), name)(*args)
    import qat.kernels.ops  # noqa: F401  (registers the ops)

    return getattr(torch.ops.qat, name)(*args)


def lora_args(lora) -> tuple:
    """(lora_a [r, in], lora_b [out, r], scaling) of a plain LoRA for the ops; (None, None, 1.0)
    without one."""
    if lora is None:
        return None, None, 1.0
    return lora.lora_A.detach(), lora.lora_B.detach(), lora.scaling


def kernel_args(layer) -> tuple:
    """Weight args + LoRA args for the weight-only ops on the kernel path: a plain inside LoRA
    as its factors (D formed in the kernels, never dense), any other inside adapter as a dense
    D built by its ``delta_weight``."""
    lora = _plain_lora(_inside_adapter(layer))
    if lora is None:
        return (*weight_args(layer), *lora_args(None))
    return (*weight_args(layer, build_delta=False), *lora_args(lora))


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y = x @ W_hat^T (no bias) for the forward; no autograd through the result."""
    path = kernel_path(layer, x)
    if path == "reference":
        with torch.no_grad():
            return F.linear(x, layer.dense_weight().to(x.dtype))
    return _run("quant_linear_fwd", path, x, *kernel_args(layer))


def _plain_lora(adapter):
    """The adapter when its D is exactly LoRAAdapter's (alpha/r) B A, so the kernel can reduce
    dB = dD A^T and dA = B^T dD itself; None for any other inside adapter."""
    if adapter is None:
        return None
    from qat.adapters.lora import LoRAAdapter

    plain = isinstance(adapter, LoRAAdapter) and type(adapter).delta_weight is LoRAAdapter.delta_weight
    return adapter if plain else None


def quant_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, layer, trainables,
                          need_dx: bool = True) -> tuple:
    """(dX or None, gradients for ``trainables``) of y = x W_hat^T through the fused kernels:
    dX = grad_y @ W_hat, and the step / zero-point / inside-adapter gradients reduced from
    G = grad_y^T x tile by tile; no dense W_hat or G. grad_y [..., out], x [..., in];
    ``trainables`` is ``layer.trainable_tensors()``, the order of the returned list.

    Steps and zero points come straight from the op. A plain LoRA goes in as its factors, as in
    the forward: both ops form D in registers (the forward's D, bit for bit) and the grads op
    reduces dA and dB itself (also when the LoRA is frozen: the op has no switch for it). Any
    other inside adapter's D is built once, densely, for both ops; the op returns dD [out, in]
    and the adapter's own autograd maps it to its parameters.
    """
    path = kernel_path(layer, grad_y)
    adapter = _inside_adapter(layer)
    lora = _plain_lora(adapter)
    wanted = {id(t) for t in trainables}
    adapter_wanted = adapter is not None and any(id(p) in wanted for p in adapter.parameters())
    delta, delta_graph = _dense_delta(adapter, adapter_wanted) if lora is None else (None, None)
    weight = weight_args(layer, delta, build_delta=False)
    factors = lora_args(lora)
    grad_x = _run("quant_linear_dx", path, grad_y, *weight, *factors) if need_dx else None
    if not trainables:
        return grad_x, []
    args = (grad_y, x, *weight, P.lsq_grad_scale(layer.group_size, layer.spec.bits), *factors,
            delta_graph is not None)
    # The op's CUDA impl falls back to the reference itself; direct Triton needs the tile check.
    if path == "op" or (path == "triton" and _grads_tile_ok(layer.group_size)):
        outs = _run("quant_linear_grads", path, *args)
    else:
        from qat.kernels import ops

        outs = ops.reference_grads(*args)
    grad_scale, grad_zero, grad_delta, grad_a, grad_b = outs
    found = {id(layer.weight_scale): grad_scale.to(layer.weight_scale.dtype)}  # the cast's backward
    if layer.weight_zero_point is not None:
        found[id(layer.weight_zero_point)] = grad_zero.to(layer.weight_zero_point.dtype)
    if lora is not None:
        found[id(lora.lora_A)], found[id(lora.lora_B)] = grad_a, grad_b
    if delta_graph is not None:
        params = [p for p in adapter.parameters() if id(p) in wanted]
        found.update(zip(map(id, params),
                         torch.autograd.grad(delta_graph, params, grad_delta, allow_unused=True)))
    return grad_x, [found.get(id(t)) for t in trainables]


def _dense_delta(adapter, with_graph: bool) -> tuple:
    """(D [out, in] detached, D with its graph to the adapter's parameters or None) for an inside
    adapter that is not a plain LoRA; (None, None) without an inside adapter."""
    if adapter is None:
        return None, None
    if with_graph:
        with torch.enable_grad():
            graph = adapter.delta_weight()
        return graph.detach(), graph
    with torch.no_grad():
        return adapter.delta_weight(), None


def _grads_tile_ok(group_size: int) -> bool:
    from qat.kernels import triton_kernels as TK

    return bool(TK.grads_block_k(group_size))


def dense_weight(layer) -> torch.Tensor:
    """W_hat [out, in] in the layer's scale dtype, without autograd."""
    path = kernel_path(layer, layer.weight_scale)
    if path == "reference":
        with torch.no_grad():
            return layer.dense_weight()
    return _run("dequant_fakequant", path, *kernel_args(layer))


def quant_codes(layer) -> torch.Tensor:
    """The codes [out, in] int8, clamp(round((W0 + D)/s) + z), that the forward's W_hat is built
    from on this layer's path: the kernels' own (same in-kernel D, same v, same rounding) on the
    kernel path, ``P.quantize_codes`` of ``pre_quant_weight`` on the reference path. The path is
    chosen as for ``dense_weight``: by the device the layer lives on, which is the device its
    activations run on."""
    path = kernel_path(layer, layer.weight_scale)
    if path == "reference":
        scale, zero = layer._steps()
        with torch.no_grad():
            return P.quantize_codes(layer.pre_quant_weight(), scale, zero, layer.spec.bits,
                                    layer.group_size)
    return _run("quant_codes", path, *kernel_args(layer))


# --------------------------------------------------------------------------- pack / unpack
def pack_path(t: torch.Tensor) -> str:
    """"reference" (``qat.packing``), "triton" (kernels/packing_kernels.py, also on CPU under
    TRITON_INTERPRET) or "op" (qat::pack_int32 / unpack_int32, CUDA): ``kernel_path``'s mode
    logic for a tensor of codes or words. Integer dtypes the kernels do not read go to the
    reference, which accepts (or rejects) them as before."""
    return _path(t.dtype in PACK_DTYPES, t)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """``qat.packing.pack_int32`` through the path of ``pack_path``: codes [rows, n] -> int32
    [rows, ceil(n*b/32)] (dim=1) or [ceil(rows*b/32), n] (dim=0), the same bits on every path
    (on CPU in "auto", the reference itself)."""
    path = pack_path(codes)
    if path == "reference":
        return packing.pack_int32(codes, bits, dim)
    return _run("pack_int32", path, codes, bits, dim, module="packing_kernels")


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """``qat.packing.unpack_int32`` through the path of ``pack_path``: int32 words -> int8
    codes, ``n`` per row (dim=1) or per column (dim=0)."""
    path = pack_path(packed) if packed.dtype == torch.int32 else "reference"
    if path == "reference":
        return packing.unpack_int32(packed, bits, n, dim)
    return _run("unpack_int32", path, packed, bits, n, dim, module="packing_kernels")


# --------------------------------------------------------------------------- Walsh-Hadamard transform
# The outside WHT adapter's activation transform z = scale * x H^T (qat::fwht). One Triton
# program holds whole rows in registers, K_PAD * P fp32 values each, and the padded H_K factor,
# K_PAD^2 fp32 (kernels/hadamard_kernels.py). The caps keep both within one SM's registers and
# shared memory (16384 fp32 = 64 KiB per row; H_64 = 16 KiB); wider rows (e.g. 13824 = 108 * 128,
# K_PAD 128) run the torch reference until a GPU session measures a split-row variant.
FWHT_MAX_ROW = 16384
FWHT_MAX_K_PAD = 64


def fwht_tile(n: int) -> tuple[int, int, int] | None:
    """(K, K_PAD, P) of the fwht kernel's per-row tile [K_PAD, P] for width n = K * P (K_PAD:
    K rounded up to a power of two); None when n has no Hadamard factorisation or the padded
    row or H_K exceeds the caps above (those widths run the torch reference)."""
    from qat.adapters.hadamard import factor

    try:
        k, p = factor(n)
    except ValueError:
        return None
    k_pad = 1 << (k - 1).bit_length()
    return (k, k_pad, p) if k_pad * p <= FWHT_MAX_ROW and k_pad <= FWHT_MAX_K_PAD else None


def fwht_path(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> str:
    """"reference", "triton" (the launcher, also on CPU under TRITON_INTERPRET) or "op"
    (qat::fwht, CUDA): the same mode logic as ``kernel_path``."""
    dtypes_ok = x.dtype in _FLOATS and (out_dtype is None or out_dtype in _FLOATS)
    return _path(dtypes_ok and fwht_tile(x.shape[-1]) is not None, x)


class _TritonFWHT(torch.autograd.Function):
    """z = scale * x H^T through the Triton launcher; the map is linear, so its backward is the
    transposed transform: dx = scale * dz H, in x's dtype (the same kernel, transpose flipped)."""

    @staticmethod
    def forward(ctx, x, transpose, scale, out_dtype):
        from qat.kernels import hadamard_kernels as HK

        ctx.transpose, ctx.scale, ctx.x_dtype = transpose, scale, x.dtype
        return HK.fwht(x, transpose, scale, out_dtype)

    @staticmethod
    def backward(ctx, grad_z):
        from qat.kernels import hadamard_kernels as HK

        return HK.fwht(grad_z, not ctx.transpose, ctx.scale, ctx.x_dtype), None, None, None


def fwht(x: torch.Tensor, transpose: bool = False, scale: float = 1.0,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale * x H_n^T (or scale * x H_n), x [..., n] -> [..., n] in ``out_dtype`` (default x's),
    differentiable: the Triton kernel or qat::fwht per ``fwht_path``, else the torch reference
    (``qat.adapters.hadamard.fwht`` in fp32, or fp64 for fp64 inputs)."""
    path = fwht_path(x, out_dtype)
    if path == "triton":
        return _TritonFWHT.apply(x, transpose, scale, out_dtype)
    from qat.kernels import ops

    if path == "op":
        return ops.fwht(x, transpose, scale, out_dtype)
    return ops.reference_fwht(x, transpose, scale, out_dtype)
