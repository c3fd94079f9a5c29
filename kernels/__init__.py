"""qat.kernels: fused Triton kernels for QuantLinear, behind ``torch.library`` ops.

    dispatch          use_kernels("auto" | "triton" | "reference") (a context variable) and the
                      layer-facing calls: quant_linear, quant_linear_backward, fake_quant_weight,
                      quant_codes (the codes export writes, from the forward's own path),
                      pack_int32 / unpack_int32 (QuantLinear's base, export's words) and fwht
    args              WeightArgs: the typed record of a layer's weight for every kernel, and the
                      one place it is flattened into / rebuilt from the ops' flat arguments
    support           what the kernels accept (dtypes, tiles), decided without importing triton
    ops               qat::dequant_fakequant / quant_codes / quant_linear_fwd / quant_linear_dx /
                      quant_linear_grads / fwht / pack_int32 / unpack_int32 (reference on every
                      device, Triton on CUDA, fake impls for torch.compile) and their references
    triton_common     triton helpers every kernel module shares (dtypes, rounding, interpreter)
    triton_tiles      the W_hat tile helpers (dequant + D + fake-quant) and their launch arguments
    triton_kernels    W_hat, codes, forward and dX kernels and their launchers
    triton_grads      the step / zero-point / adapter gradient kernel and its launcher
    hadamard_kernels  the one-pass Walsh-Hadamard transform kernel
    packing_kernels   the pack / unpack kernels

Modules named triton_* / *_kernels import triton: ``ops.launcher`` imports them on first use.
Imports flow one way: dispatch -> ops -> args, support -> qat.primitives / packing / hadamard.
docs/KERNELS.md says what is built and which GPU figures are still missing.
"""

# This folder is installed as `qat.kernels`. When the repository root is first on sys.path
# (`python -m pytest`, `python -c ...` run from the checkout), `import kernels` would find this
# folder instead of the PyPI package `kernels` that transformers >= 5 imports, and break
# transformers. Imported under that name, hand the import over to the real package.
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or ".") != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ImportError("the PyPI package `kernels` is not installed; run `pip install kernels` "
                          "(transformers imports it), or import this folder as qat.kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real  # the import system returns what sys.modules holds
    _spec.loader.exec_module(_real)
