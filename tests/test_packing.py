import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from qat.packing import pack_int32, packed_width, unpack_int32


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 5, 32, 33, 96, 131])
def test_bit_identical_to_compressed_tensors(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, cols), generator=g, dtype=torch.int8)
    ours = pack_int32(codes, bits)
    assert ours.shape == (7, packed_width(cols, bits))
    assert torch.equal(ours, pack_to_int32(codes, bits))
    assert torch.equal(unpack_int32(ours, bits, cols), codes)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape), codes)
    # zero points are packed along dim 0
    ours0 = pack_int32(codes, bits, dim=0)
    assert torch.equal(ours0, pack_to_int32(codes, bits, packed_dim=0))
    assert torch.equal(unpack_int32(ours0, bits, 7, dim=0), codes)


def test_bad_input():
    with pytest.raises(ValueError, match="1..8"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int8), 9)
    packed = pack_int32(torch.zeros(2, 64, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="truncated"):
        unpack_int32(packed[:, :-1], 4, 64)
