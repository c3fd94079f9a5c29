"""Hadamard matrices and the fast Walsh-Hadamard transform, in pure torch.

    H_n = kron(H_K, Sylvester_{2^m}),   n = K * 2^m,   H_n H_n^T = n I

The small H_K are built here from Paley's constructions (no tables copied):

    Paley I   q = p^e = 3 (mod 4):  H = I + [[0, 1^T], [-1, Q]]                order q + 1
    Paley II  q = p^e = 1 (mod 4):  C = [[0, 1^T], [1, Q]], each entry of C
              replaced by a 2x2 block (0 -> [[1,-1],[-1,-1]], +-1 -> +-[[1,1],[1,-1]])   order 2(q + 1)

with Q[a, b] = chi(a - b) the Jacobsthal matrix (chi: quadratic character of GF(q)).
K = 40 is Sylvester-doubled H_20. K = 156 and 172 need Williamson-type constructions
(neither Paley construction reaches them) and are not built: widths with those factors raise.
Every shipped H_K is checked for H H^T = K I on first construction.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

# K -> (construction, q): how each supported small Hadamard matrix is built.
_RECIPES = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    52: ("paley2", 25),   # GF(25) = GF(5)[x] / (irreducible quadratic)
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
}
SUPPORTED_K = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140)
UNSUPPORTED_K = (156, 172)  # in Sloane's list, but need Williamson constructions: not built


# ----------------------------------------------------------------------------- finite fields
def _prime_power(q: int) -> tuple[int, int]:
    """q = p^e -> (p, e); raises if q is not a prime power."""
    for p in range(2, q + 1):
        if q % p == 0:
            e, r = 0, q
            while r % p == 0:
                r, e = r // p, e + 1
            if r != 1:
                raise ValueError(f"{q} is not a prime power")
            return p, e
    raise ValueError(f"{q} is not a prime power")


def _irreducible(p: int, e: int) -> tuple[int, ...]:
    """Coefficients (c0..c_{e-1}) of a monic x^e + ... with no root in GF(p); irreducible for e <= 3."""
    if e > 3:
        raise ValueError("only extension degrees <= 3 are needed here")
    for coeffs in itertools.product(range(p), repeat=e):
        value = lambda x: (sum(c * x**i for i, c in enumerate(coeffs)) + x**e) % p  # noqa: E731
        if all(value(x) for x in range(p)):
            return coeffs
    raise ValueError(f"no irreducible polynomial of degree {e} over GF({p})")


def _field_elements(q: int) -> tuple[list[tuple[int, ...]], set[tuple[int, ...]], int]:
    """GF(q) as coefficient tuples, the set of nonzero squares, and p (for subtraction mod p)."""
    p, e = _prime_power(q)
    elems = list(itertools.product(range(p), repeat=e))
    poly = _irreducible(p, e) if e > 1 else ()

    def mul(a, b):
        prod = [0] * (2 * e - 1)
        for i, ai in enumerate(a):
            for j, bj in enumerate(b):
                prod[i + j] += ai * bj
        for k in range(2 * e - 2, e - 1, -1):  # reduce x^k with x^e = -sum c_i x^i
            c, prod[k] = prod[k], 0
            for i, ci in enumerate(poly):
                prod[k - e + i] -= c * ci
        return tuple(v % p for v in prod[:e])

    zero = (0,) * e
    squares = {mul(a, a) for a in elems if a != zero}
    return elems, squares, p


def _jacobsthal(q: int) -> torch.Tensor:
    """Q [q, q], Q[a, b] = chi(a - b) in {0, 1, -1}."""
    elems, squares, p = _field_elements(q)
    zero = elems[0]
    out = torch.zeros(q, q, dtype=torch.float64)
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            d = tuple((x - y) % p for x, y in zip(a, b))
            out[i, j] = 0 if d == zero else (1 if d in squares else -1)
    return out


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return torch.eye(n, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    # kron(C, sign_block) handles the +-1 entries; where C == 0 put zero_block instead.
    return torch.kron(C, sign_block) + torch.kron((C == 0).double(), zero_block)


@lru_cache(maxsize=None)
def small_hadamard(k: int) -> torch.Tensor:
    """H_K [K, K] float64 with H H^T = K I (verified here), for K in SUPPORTED_K."""
    if k == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    elif k == 40:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), small_hadamard(20))
    elif k in _RECIPES:
        kind, q = _RECIPES[k]
        h = _paley1(q) if kind == "paley1" else _paley2(q)
    else:
        raise ValueError(f"no Hadamard matrix of order {k} is built here; built orders: {SUPPORTED_K}")
    if not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):
        raise AssertionError(f"constructed H_{k} is not Hadamard")  # construction bug, never user error
    return h


# ----------------------------------------------------------------------------- sizes
def factor(n: int) -> tuple[int, int]:
    """n -> (K, 2^m) with K in SUPPORTED_K, or ValueError naming the nearest widths that work."""
    for k in sorted(SUPPORTED_K, reverse=True):
        if n % k == 0:
            p = n // k
            if p & (p - 1) == 0:
                return k, p
    raise ValueError(
        f"no Hadamard transform of width {n}: widths must be K * 2^m with K in {SUPPORTED_K} "
        f"(156 and 172 are not built); nearest widths that work: {nearest_sizes(n)}"
    )


def _works(n: int) -> bool:
    return n > 0 and any(n % k == 0 and (n // k) & (n // k - 1) == 0 for k in SUPPORTED_K)


def nearest_sizes(n: int) -> tuple[int, int]:
    below = next(m for m in range(n, 0, -1) if _works(m))
    above = next(m for m in itertools.count(n) if _works(m))
    return below, above


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Dense H_n [n, n] = kron(H_K, Sylvester_{2^m}): reference for tests, never used in forward."""
    k, p = factor(n)
    return torch.kron(small_hadamard(k), _sylvester(p)).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- transform
# The transform runs as a few dense matmuls instead of log2(n) butterfly stages of tiny torch ops:
# H_n = kron(H_K, Syl_{2^m}) = kron(F_1, ..., F_L) with F_1 = kron(H_K, Syl_{2^m1}) and F_i = Syl_{2^mi},
# every block at most MAX_BLOCK wide (or K, when K is wider). Cost per element sum(b_i) multiply-adds
# in L GEMMs (BLAS-fast) and L - 1 transposes, instead of ~2 log2(n) memory passes.
MAX_BLOCK = 128  # measured on 2 CPU cores: 64..256 are within 10%; 512 is slower (n^2 work)


def _sylvester(p: int) -> torch.Tensor:
    """Syl_p [p, p] float64 (p a power of two), symmetric."""
    syl = torch.ones(1, 1, dtype=torch.float64)
    while syl.shape[0] < p:
        syl = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), syl)
    return syl


@lru_cache(maxsize=None)
def block_plan(n: int, max_block: int = MAX_BLOCK) -> tuple[int, tuple[int, ...]]:
    """n -> (K, (b_1, ..., b_L)): prod(b) = n, b_1 = K * 2^m1, b_i = 2^mi, fewest blocks, balanced.

    Balanced sizes keep every GEMM's inner dimension away from tiny (memory-bound) widths.
    """
    k, p = factor(n)
    m = p.bit_length() - 1
    first_max = max(0, (max(max_block, k) // k).bit_length() - 1)   # largest m1 with K 2^m1 <= max(B, K)
    per_block = max_block.bit_length() - 1                          # log2 B
    blocks = 1
    while m > first_max + (blocks - 1) * per_block:
        blocks += 1
    best = None
    for m1 in range(0, min(m, first_max) + 1):
        rest, others = m - m1, blocks - 1
        if others == 0 and rest:
            continue
        logs = [rest // others + (i < rest % others) for i in range(others)] if others else []
        if any(v > per_block for v in logs):
            continue
        sizes = (k << m1, *(1 << v for v in logs))
        if best is None or max(sizes) < max(best):
            best = sizes
    return k, best


@lru_cache(maxsize=None)
def _block_matrix(size: int, k: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """kron(H_K, Syl_{size/K}) (transposed if asked), cached per (dtype, device): built once, not per call."""
    h = torch.kron(small_hadamard(k), _sylvester(size // k))
    return (h.T if transpose else h).to(dtype=dtype, device=device).contiguous()


def fwht(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """v -> H_n v (or H_n^T v) along the last dim of x [..., n]; differentiable, O(n * sum(b_i)).

    Equivalently x @ H^T (or x @ H) for row vectors. Sylvester is symmetric, so only H_K's
    transpose differs between the two. x viewed [M, b_1, ..., b_L]: each step multiplies the last
    axis by its block, then rotates that axis to the front (after L steps the order is restored).
    """
    n = x.shape[-1]
    k, sizes = block_plan(n)
    lead = x.shape[:-1]
    rows = x.numel() // n
    blocks = [_block_matrix(sizes[0], k, transpose, x.dtype, x.device)]
    blocks += [_block_matrix(b, 1, False, x.dtype, x.device) for b in sizes[1:]]
    y = x.reshape(rows, n)
    for block in reversed(blocks):
        b = block.shape[0]
        y = (y.reshape(-1, b) @ block.T).reshape(rows, n // b, b)  # [M, n/b, b]: last axis transformed
        if len(blocks) > 1:
            y = y.transpose(1, 2)                                 # [M, b, n/b]: rotate it to the front
    return y.reshape(*lead, n)


def ifwht(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fwht`: H^{-1} = H^T / n."""
    return fwht(y, transpose=True) / y.shape[-1]
