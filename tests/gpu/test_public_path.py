"""The GPU path users get: QuantLinear, export and the adapters under the default kernel mode.

On CUDA with triton, "auto" sends every call through the ``torch.library`` ops (``qat::*``,
kernels/ops.py), whose CUDA implementations launch the Triton kernels. These tests run that
public path, compiled, against the torch reference path on the same GPU: the CPU suite runs the
kernels only in the interpreter. Marked ``gpu`` (deselected by default; ``pytest -m gpu``); on a
machine without CUDA they skip.

Tolerances, each relative to the reference tensor's largest entry:
    codes    the in-register LoRA D rounds apart from torch's B @ A (docs/KERNELS.md,
             "Exactness"): a code may flip at a rounding boundary; at most 1e-4 of them
    y, dX    bf16 activations: both sides round to bf16 (2^-8 relative) after fp32 sums in
             different orders; 2e-2 (a wrong tile or step is off by O(1))
    grads    bf16: the reference forms G = grad_y^T x in bf16 (as autograd does) and the step
             gradient in the bf16 scale dtype, each term off by up to 2^-8 relative before a
             group sum with cancellation; the kernels sum G in fp32. Measured on the interpreter
             (tests/kernels shapes): 1.5-1.9% of the largest entry; 5e-2. fp32: 1e-3 as below
    fp32     fp32 activations: only the summation order differs, n u ~ 4096 * 2^-24 ~ 2.4e-4: 1e-3
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat import packing
from qat.adapters import LoRAAdapter, WHTAdapter
from qat.config import LayerSpec
from qat.kernels import dispatch, ops
from qat.quant_linear import QuantLinear
from tests.kernels.helpers import layer_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _layer(out_f=512, in_f=1024, bits=4, group=128, symmetric=False, dtype=torch.bfloat16, rank=16):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=True, device="cuda", dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    layer = QuantLinear.from_linear(linear, LayerSpec(bits=bits, group_size=group, symmetric=symmetric,
                                                      init="rtn"))
    with torch.no_grad():  # steps off the base grid, as after training: fake-quant really rounds
        layer.weight_scale.mul_(1.1)
    layer.adapter = LoRAAdapter(in_f, out_f, rank=rank, alpha=2 * rank, device="cuda")
    with torch.no_grad():
        layer.adapter.lora_B.normal_(0, 0.01)
    return layer


def test_auto_takes_the_op_path_on_cuda():
    """The premise of the other tests: on CUDA the default mode runs the torch.library ops."""
    pytest.importorskip("triton")
    layer = _layer()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    assert dispatch.kernel_mode() == "auto"
    assert dispatch.kernel_path(layer, x) == "op"
    assert dispatch.pack_path(torch.zeros(2, 2, dtype=torch.int8, device="cuda")) == "op"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_step_auto_vs_reference(symmetric, dtype):
    pytest.importorskip("triton")
    layer = _layer(symmetric=symmetric, dtype=dtype)
    x = torch.randn(4, 64, 1024, device="cuda", dtype=dtype)
    y, dx, grads = layer_step(layer, x, "auto")
    y_ref, dx_ref, grads_ref = layer_step(layer, x, "reference")
    act_tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    assert _rel(y, y_ref) < act_tol and _rel(dx, dx_ref) < act_tol
    assert grads.keys() == grads_ref.keys() and "adapter.lora_A" in grads
    for name in grads:
        assert _rel(grads[name], grads_ref[name]) < (5e-2 if dtype == torch.bfloat16 else 1e-3), name


def test_export_codes_and_weight_on_the_op_path():
    pytest.importorskip("triton")
    layer = _layer()
    with dispatch.use_kernels("auto"):
        codes, _, _ = layer.export_codes()
        w_hat = dispatch.fake_quant_weight(layer)
    with dispatch.use_kernels("reference"):
        codes_ref, _, _ = layer.export_codes()
        w_ref = dispatch.fake_quant_weight(layer)
    assert (codes != codes_ref).float().mean().item() <= 1e-4
    # W_hat from the same codes where they agree: equal up to the flipped codes' one step
    assert (w_hat != w_ref).float().mean().item() <= 1e-4
    # the op's codes are the ones its W_hat is built from, exactly (train what you export)
    weight = dispatch.weight_args(layer)
    assert torch.equal(torch.ops.qat.quant_codes(*weight.flat()), codes)
    assert torch.equal(ops.reference_codes(weight.replace(
        lora_a=None, lora_b=None, delta=layer.adapter.delta_weight().detach())), codes_ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_on_the_op_path(bits):
    pytest.importorskip("triton")
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (256, 1000), dtype=torch.int8, device="cuda")
    words = dispatch.pack_int32(codes, bits)
    assert torch.equal(words.cpu(), packing.pack_int32(codes.cpu(), bits))        # bit for bit
    assert torch.equal(dispatch.unpack_int32(words, bits, 1000), codes)
    zero = torch.randint(-half, half, (256, 8), dtype=torch.int8, device="cuda")
    assert torch.equal(dispatch.pack_int32(zero, bits, dim=0).cpu(), packing.pack_int32(zero.cpu(), bits, dim=0))


@pytest.mark.parametrize("in_f", [1024, 768])   # 768 = 12 * 64: a non-symmetric H_K factor
def test_outside_wht_on_the_op_path(in_f):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    wht = WHTAdapter(in_f, 256, rank=8, placement="outside", device="cuda")
    with torch.no_grad():
        wht.values.normal_()
    x = torch.randn(64, in_f, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for mode in ("auto", "reference"):
        wht.values.grad = None
        xg = x.clone().requires_grad_()
        with dispatch.use_kernels(mode):
            assert dispatch.fwht_path(xg, torch.float32) == ("op" if mode == "auto" else "reference")
            y = wht(xg)
            y.backward(gy)
        outs[mode] = (y.detach(), xg.grad, wht.values.grad.clone())
    for got, want in zip(outs["auto"], outs["reference"]):
        assert _rel(got, want) < 2e-2
