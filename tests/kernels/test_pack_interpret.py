"""Triton pack / unpack kernels (kernels/packing_kernels.py) and the ``qat::pack_int32`` /
``qat::unpack_int32`` ops, on CPU through the Triton interpreter (TRITON_INTERPRET=1).

Everything is compared bit for bit (``torch.equal``, dtypes included) with ``qat.packing``,
which tests/test_packing.py pins to compressed-tensors' own packer. The cases stress what a
packer gets wrong: widths whose codes straddle words (3, 5, 6, 7), rows whose last word is
partial (n = 1, 7, 33, 100), tiles cut short in both directions (several programs along rows
and along words), the int32 sign bit (qmax in bit 31) and the
all-qmin / all-qmax codes, dim 0 (strided views, no copy) and dim 1.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Set before triton is first imported, as in test_triton_interpret.py.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install 'qat[triton]')")
from qat.kernels import packing_kernels as PK  # noqa: E402
from qat.kernels import triton_common  # noqa: E402

from qat import packing  # noqa: E402
from qat.config import LayerSpec  # noqa: E402
from qat.export import layer_export_tensors  # noqa: E402
from qat.kernels import dispatch, ops  # noqa: E402
from qat.quant_linear import QuantLinear  # noqa: E402

if not triton_common.INTERPRETED:
    pytest.skip("qat.kernels.packing_kernels was imported before this module, without "
                "TRITON_INTERPRET=1: run this file on its own", allow_module_level=True)

# (n codes per packed row, rows, block_r, block_w): partial last words, 1..17 rows, tiles cut
# short in both directions (several programs along rows and along words) or one program.
SHAPES = [(1, 17, 8, None), (7, 3, 2, 2), (33, 1, 8, None), (100, 5, 4, 4)]


def _codes(bits, rows, n, seed):
    """Random codes [rows, n] int8 over the whole grid, with row 0 all qmin, the last row all
    qmax (every word of a width dividing 32 then has bit 31 set: -1) and column 0 alternating."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(lo, hi + 1, (rows, n), generator=g, dtype=torch.int8)
    c[0], c[-1] = lo, hi
    c[:, 0] = torch.where(torch.arange(rows) % 2 == 0, lo, hi).to(torch.int8)
    return c


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_bit_identical(bits):
    """Kernel pack == qat.packing's words; kernel unpack of those words == the codes; for both
    dims. dim 0 packs codes [n, rows] along the columns (zero points' layout)."""
    for i, (n, rows, br, bw) in enumerate(SHAPES):
        codes = _codes(bits, rows, n, seed=bits * 10 + i)
        for dim, c in ((1, codes), (0, codes.t().contiguous())):
            want = packing.pack_int32(c, bits, dim)
            got = PK.launch_pack_int32(c, bits, dim, block_r=br, block_w=bw)
            assert got.dtype == torch.int32 and got.is_contiguous()
            assert torch.equal(got, want), f"pack b{bits} n{n} rows{rows} dim{dim}"
            back = PK.launch_unpack_int32(want, bits, n, dim, block_r=br, block_w=bw)
            assert back.dtype == torch.int8 and back.is_contiguous()
            assert torch.equal(back, c), f"unpack b{bits} n{n} rows{rows} dim{dim}"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_sign_bit_and_round_trip(bits):
    """All-qmax rows set bit 31 of every word (-1 where b divides 32, the straddled words of
    3/5/6/7 included); all-qmin rows pack to 0; kernel pack then kernel unpack is the identity,
    with the default tiles and on a strided (non-contiguous) input."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    n = 64  # 64 * b bits = 2b whole words: every word is full, so all-qmax words are all ones
    codes = torch.stack([torch.full((n,), hi), torch.full((n,), lo)]).to(torch.int8)
    words = PK.launch_pack_int32(codes, bits)
    assert torch.equal(words, packing.pack_int32(codes, bits))
    assert (words[0] == -1).all() and (words[1] == 0).all()
    wide = _codes(bits, 6, 2 * n, seed=bits)[:, ::2]           # [6, 64] with column stride 2
    assert torch.equal(PK.launch_unpack_int32(PK.launch_pack_int32(wide, bits), bits, n), wide)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_pack_integer_dtypes(dtype):
    """Codes in any integer dtype the kernel reads pack as the reference packs them (uint8
    included: the reference masks (c + 2^(b-1)) to b bits, so does the kernel)."""
    c = _codes(5, 3, 19, seed=1).to(dtype) if dtype != torch.uint8 else \
        torch.randint(0, 256, (3, 19), dtype=dtype)
    assert torch.equal(PK.launch_pack_int32(c, 5), packing.pack_int32(c, 5))


def test_launcher_errors_match_reference():
    with pytest.raises(ValueError, match="1..8"):
        PK.launch_pack_int32(torch.zeros(2, 2, dtype=torch.int8), 9)
    packed = packing.pack_int32(torch.zeros(2, 64, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="truncated"):
        PK.launch_unpack_int32(packed[:, :-1], 4, 64)
    with pytest.raises(ValueError, match="int32"):
        PK.launch_unpack_int32(packed.long(), 4, 64)


@pytest.mark.parametrize("bits,dim", [(3, 1), (5, 0)])
def test_opcheck(bits, dim):
    """Schema, fake impl (shapes from packing.packed_width), AOT dispatch; the ops equal the
    reference on CPU."""
    codes = _codes(bits, 6, 37, seed=bits)
    n = codes.shape[dim]
    words = packing.pack_int32(codes, bits, dim)
    torch.library.opcheck(ops.pack_op, (codes, bits, dim))
    torch.library.opcheck(ops.unpack_op, (words, bits, n, dim))
    assert torch.equal(ops.pack_op(codes, bits, dim), words)
    assert torch.equal(ops.unpack_op(words, bits, n, dim), codes)


def test_torch_compile_traces_through():
    """fullgraph torch.compile (aot_eager: the fake impls give the shapes) of pack then unpack;
    a fake unpack of a truncated row raises, as the reference does."""
    def f(c):
        words = torch.ops.qat.pack_int32(c, 5, 1)
        return torch.ops.qat.unpack_int32(words, 5, c.shape[1], 1), words

    codes = _codes(5, 6, 37, seed=2)
    back, words = torch.compile(f, backend="aot_eager", fullgraph=True)(codes)
    assert torch.equal(words, packing.pack_int32(codes, 5)) and torch.equal(back, codes)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    truncated = mode.from_tensor(words[:, :-1].contiguous())
    with mode, pytest.raises(ValueError, match="truncated"):
        ops.unpack_op(truncated, 5, 37)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton launchers' calls, to show which path dispatch took."""
    calls = []
    for name in ("pack_int32", "unpack_int32"):
        launcher = getattr(PK, f"launch_{name}")

        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            calls.append(_name)
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(PK, f"launch_{name}", counted)
    return calls


def test_dispatch_paths(kernel_calls):
    """triton: the kernels; reference and auto on CPU: qat.packing itself; a float tensor
    always goes to the reference (which is what rejects or handles it)."""
    codes = _codes(6, 4, 21, seed=0)
    words = packing.pack_int32(codes, 6)
    for mode, path, launches in (("triton", "triton", 2), ("reference", "reference", 0),
                                 ("auto", "reference", 0)):
        kernel_calls.clear()
        with dispatch.use_kernels(mode):
            assert dispatch.pack_path(codes) == path
            assert dispatch.pack_path(codes.float()) == "reference"
            assert torch.equal(dispatch.pack_int32(codes, 6), words)
            assert torch.equal(dispatch.unpack_int32(words, 6, 21), codes)
        assert len(kernel_calls) == launches, mode


@pytest.mark.parametrize("bits,symmetric,storage", [(3, False, None), (4, True, 8), (5, False, None)])
def test_quant_linear_build_and_export_triton_equals_reference(bits, symmetric, storage, kernel_calls):
    """QuantLinear.from_linear (packs its base), base_codes (unpacks it) and
    layer_export_tensors (packs the codes, and the zero points along dim 0) under
    use_kernels("triton") equal the same under "reference", byte for byte."""
    torch.manual_seed(bits)
    linear = nn.Linear(40, 12)
    spec = LayerSpec(bits=bits, group_size=8, symmetric=symmetric, storage_bits=storage, init="rtn")
    built = {}
    for mode in ("reference", "triton"):
        kernel_calls.clear()
        with dispatch.use_kernels(mode):
            layer = QuantLinear.from_linear(linear, spec)
            built[mode] = (layer.base_packed.detach().clone(), layer.base_codes(),
                           layer_export_tensors("l", layer))
        assert ("pack_int32" in kernel_calls and "unpack_int32" in kernel_calls) == (mode == "triton")
    (p_ref, c_ref, e_ref), (p_tri, c_tri, e_tri) = built["reference"], built["triton"]
    assert torch.equal(p_tri, p_ref) and torch.equal(c_tri, c_ref)
    assert e_tri.keys() == e_ref.keys() and ("l.weight_zero_point" in e_ref) == (not symmetric)
    for key in e_ref:
        assert e_tri[key].dtype == e_ref[key].dtype, key
        assert e_tri[key].numpy().tobytes() == e_ref[key].numpy().tobytes(), key
