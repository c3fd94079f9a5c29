"""Choose between the Triton kernels and the torch reference for QuantLinear's matmuls.

    use_kernels("auto")       Triton when the tensors are on CUDA, triton imports and the
                              shape/dtypes are supported; the reference otherwise (default)
    use_kernels("triton")     always the Triton kernels (raises if triton is missing; on CPU it
                              works only under TRITON_INTERPRET=1, which is how the tests run it)
    use_kernels("reference")  always the torch reference (qat.primitives / qat.packing)

``use_kernels`` sets the mode process-wide and also works as a context manager that restores
the previous mode on exit. The layer-facing entry points take a ``QuantLinear``:

    quant_linear(x, layer)        -> x @ W_hat^T          (no bias, no outside adapter)
    quant_linear_dx(grad_y, layer) -> grad_y @ W_hat
    dense_weight(layer)           -> W_hat (no autograd)
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from qat import primitives as P

MODES = ("auto", "triton", "reference")
_mode = os.environ.get("QAT_KERNELS", "auto")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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


def weight_args(layer) -> tuple:
    """The op's weight arguments for a QuantLinear (steps cast to the saved dtype, as the layer)."""
    scale, zero = layer._steps()
    delta = None
    if layer.adapter is not None and layer.adapter.placement == "inside":
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
    return layer.scale_dtype in _FLOATS and all(t is None or t.dtype in _FLOATS for t in tensors)


def kernel_path(layer, act) -> str:
    if _mode == "reference" or not supported(layer, act):
        return "reference"
    if _mode == "triton":
        return "triton"
    return "op" if act.is_cuda and triton_available() else "reference"


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y = x @ W_hat^T (no bias) for the forward; no autograd through the result."""
    path = kernel_path(layer, x)
    if path == "reference":
        with torch.no_grad():
            return F.linear(x, layer.dense_weight().to(x.dtype))
    if path == "triton":
        from qat.kernels import triton_kernels as TK

        return TK.quant_linear_fwd(x, *weight_args(layer))
    import qat.kernels.ops  # noqa: F401  (registers the ops)

    return torch.ops.qat.quant_linear_fwd(x, *weight_args(layer))


def quant_linear_dx(grad_y: torch.Tensor, layer) -> torch.Tensor:
    """dX = grad_y @ W_hat for the backward; no autograd through the result."""
    path = kernel_path(layer, grad_y)
    if path == "reference":
        with torch.no_grad():
            return grad_y @ layer.dense_weight().to(grad_y.dtype)
    if path == "triton":
        from qat.kernels import triton_kernels as TK

        return TK.quant_linear_dx(grad_y, *weight_args(layer))
    import qat.kernels.ops  # noqa: F401

    return torch.ops.qat.quant_linear_dx(grad_y, *weight_args(layer))


def dense_weight(layer) -> torch.Tensor:
    """W_hat [out, in] in the layer's scale dtype, without autograd."""
    path = kernel_path(layer, layer.weight_scale)
    if path == "reference":
        with torch.no_grad():
            return layer.dense_weight()
    if path == "triton":
        from qat.kernels import triton_kernels as TK

        return TK.dequant_fakequant(*weight_args(layer))
    import qat.kernels.ops  # noqa: F401

    return torch.ops.qat.dequant_fakequant(*weight_args(layer))
