"""Hadamard construction and fast transform vs dense float64 references."""

import pytest
import torch

from qat.adapters.hadamard import SUPPORTED_K, factor, fwht, hadamard_matrix, ifwht, small_hadamard


@pytest.mark.parametrize("k", SUPPORTED_K)
def test_small_hadamard_orthogonal(k):
    h = small_hadamard(k)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    # Integer entries, integer sums: H H^T = K I holds exactly in float64.
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 8, 12, 48, 20 * 4, 28, 36 * 2, 40 * 4, 52 * 2, 60, 108, 140 * 2])
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
