"""Hadamard construction and fast transform vs dense float64 references."""

import pytest
import torch

from qat.hadamard import (MAX_BLOCK, SUPPORTED_K, block_plan, factor, fwht, hadamard_matrix, ifwht,
                                   small_hadamard)


@pytest.mark.parametrize("k", SUPPORTED_K)
def test_small_hadamard_orthogonal(k):
    h = small_hadamard(k)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    # Integer entries, integer sums: H H^T = K I holds exactly in float64.
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


# 384 / 1536 / 2048 run as 2 blocks (several GEMMs and axis rotations), the rest as one.
@pytest.mark.parametrize("n", [1, 8, 12, 48, 20 * 4, 28, 36 * 2, 40 * 4, 52 * 2, 60, 108, 140 * 2, 384, 1536, 2048])
def test_fwht_matches_dense(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=g)
    H = hadamard_matrix(n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    # Sums of n terms of size ~1 in float64: error ~ n * 1e-16 << 1e-10.
    torch.testing.assert_close(fwht(x), x @ H.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(fwht(x, transpose=True), x @ H, atol=1e-10, rtol=0)
    torch.testing.assert_close(ifwht(fwht(x)), x, atol=1e-12, rtol=0)


def test_nonsymmetric_hk_needs_transpose():
    h = small_hadamard(12)  # Paley I: not symmetric, so the inverse must use H^T
    assert not torch.equal(h, h.T)


def test_bad_width_names_nearest():
    with pytest.raises(ValueError, match=r"nearest widths that work: \(96, 104\)"):
        factor(100)
    with pytest.raises(ValueError, match="156 and 172 are not built"):
        factor(156)


@pytest.mark.parametrize("n", [1, 12, 384, 1536, 4096, 13824, 140 * 4096, 2**20])
def test_block_plan(n):
    k, sizes = block_plan(n)
    assert k == factor(n)[0] and sizes[0] % k == 0
    assert torch.tensor(sizes).prod().item() == n
    assert max(sizes) <= max(MAX_BLOCK, k)
    assert all(b & (b - 1) == 0 for b in sizes[1:])  # Sylvester blocks are powers of two


def test_fwht_gradient_is_transpose():
    # Built from GEMMs, autograd gives d(x H^T)/dx applied to g = g H: check against the dense matrix.
    x = torch.randn(3, 384, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 384, dtype=torch.float64)
    (fwht(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ hadamard_matrix(384), atol=1e-10, rtol=0)
