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


def _paley1_h12() -> torch.Tensor:
    """H_12 from Paley I written out by hand: q = 11, quadratic residues mod 11 = {1, 3, 4, 5, 9},
    Q[a, b] = chi(a - b), H = I + [[0, 1^T], [-1, Q]]. Independent of qat.hadamard's field code."""
    residues = {1, 3, 4, 5, 9}
    chi = [0] + [1 if d in residues else -1 for d in range(1, 11)]
    h = torch.eye(12, dtype=torch.float64)
    h[0, 1:] += 1
    h[1:, 0] -= 1
    for a in range(11):
        for b in range(11):
            h[1 + a, 1 + b] += chi[(a - b) % 11]
    return h


def test_transform_of_nonsymmetric_hk_against_hand_built_paley():
    """Width 96 = 12 * 8 uses Paley I's H_12, which is not symmetric: fwht must apply H (and
    transpose=True H^T) the right way round, and ifwht must invert with H^T. Checked against
    kron(H_12, Syl_8) built here from the Paley formula, not from qat.hadamard."""
    h12 = _paley1_h12()
    assert not torch.equal(h12, h12.T)                  # so a wrong orientation shows
    syl8 = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(8)] for i in range(8)],
                        dtype=torch.float64)          # Sylvester: (-1)^popcount(i & j)
    H = torch.kron(h12, syl8)
    x = torch.randn(5, 96, dtype=torch.float64)
    # float64 sums of 96 terms of size ~1: error ~1e-14, far below 1e-10
    torch.testing.assert_close(fwht(x), x @ H.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(fwht(x, transpose=True), x @ H, atol=1e-10, rtol=0)
    torch.testing.assert_close(ifwht(fwht(x)), x, atol=1e-12, rtol=0)


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
