"""Activation fake-quantization: the input of a QuantLinear rounded to a signed integer grid.

    dynamic_token   s_t = max_i |x_{t,i}| / Qp             one step per token, computed every forward
    static_tensor   s   learned (LSQ), one step for the whole input, saved as ``input_scale``

    x_hat = clamp(round(x / s), -Qn, Qp) * s            Qn = 2^(b-1), Qp = 2^(b-1) - 1 (symmetric)

Gradients (straight-through estimator, as LSQ defines it; see /work/shared/REFERENCES.md):
    d x_hat / d x = 1 where -Qn <= x/s <= Qp, else 0
    d x_hat / d s = round(x/s) - x/s inside, -Qn / Qp where clamped,   times g = 1 / sqrt(N * Qp)
with N the number of elements sharing the step (every element of the input, for ``static_tensor``).
The dynamic step is a function of x, not a parameter: it is detached (its own derivative through
the absmax is not propagated), so x gets the plain STE; the token's absmax sits exactly on the grid
(x/s = +-Qp) and is never clamped.

The dynamic step divides by Qp = 127 at 8 bits, as vLLM's int8 kernels do (``scaled_int8_quant``).
compressed-tensors' own fake-quantizer (what transformers runs on reload) divides by 127.5
(half the int8 range); the difference is bounded in tests/test_act_quant.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from qat import primitives as P

ACT_SCHEMES = ("dynamic_token", "static_tensor")
ACT_BITS = (4, 8)


def check_act_settings(bits: int | None, scheme: str) -> None:
    """One sentence naming the bad setting and the fix, before any model is touched."""
    if bits is None:
        return
    if bits not in ACT_BITS:
        raise ValueError(f"act_bits={bits} is not supported: use 8 (W8A8 / W4A8) or 4, or leave it unset "
                         "for float activations")
    if scheme not in ACT_SCHEMES:
        raise ValueError(f"unknown act_scheme {scheme!r}: use one of {ACT_SCHEMES}")


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, bits: int,
                             lsq_scale: float | None = None) -> torch.Tensor:
    """x_hat = clamp(round(x / s), -Qn, Qp) * s, with ``scale`` broadcast against x.

    STE for x; LSQ gradient for ``scale`` (multiplied by ``lsq_scale`` when given). Clamp before
    rounding, as LSQ defines it (same values; the step gradient is Qp on [Qp, Qp + 0.5)).
    """
    qmin, qmax = P.qrange(bits)
    if lsq_scale is not None:
        scale = P.grad_scale(scale, lsq_scale)
    q = P.round_ste(torch.clamp(x / scale, qmin, qmax))
    return q * scale


def token_scale(x: torch.Tensor, bits: int, divisor: float | None = None) -> torch.Tensor:
    """Per-token step [..., 1] = max|x| over the last dim / Qp (or / ``divisor``); a zero token
    gets step 1 (it stays 0)."""
    absmax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = absmax / (divisor or P.qrange(bits)[1])
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


class ActQuantizer(nn.Module):
    """Fake-quantizes a linear layer's input; QuantLinear calls it first in ``forward``.

    ``static_tensor`` holds the learned step ``scale`` (a 1-element Parameter). It starts at
    max|x| / Qp of the first batch it sees (no clipping), unless a step was loaded or set.
    """

    def __init__(self, bits: int = 8, scheme: str = "dynamic_token", learn_scale: bool = True):
        super().__init__()
        check_act_settings(bits, scheme)
        self.bits, self.scheme = bits, scheme
        self.enabled = True
        # Dynamic step = absmax / token_divisor; None: / Qp (vLLM). compressed_tensors_steps() sets
        # compressed-tensors' (Qp + Qn) / 2 for the duration of an export check.
        self.token_divisor: float | None = None
        if scheme == "static_tensor":
            self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)
            # Whether ``scale`` holds a real step yet (saved, so a reloaded layer is not re-initialised).
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        else:
            self.scale = None

    @property
    def dynamic(self) -> bool:
        return self.scheme == "dynamic_token"

    @torch.no_grad()
    def init_scale(self, x: torch.Tensor) -> None:
        absmax = x.detach().abs().max().float().clamp_min(1e-8)
        self.scale.copy_(absmax / P.qrange(self.bits)[1])
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.dynamic:
            return fake_quantize_activation(x, token_scale(x, self.bits, self.token_divisor), self.bits)
        if not bool(self.initialized):
            self.init_scale(x)
        lsq = 1.0 / math.sqrt(x.numel() * P.qrange(self.bits)[1])  # N = every element sharing the step
        return fake_quantize_activation(x, self.scale.to(x.dtype), self.bits, lsq_scale=lsq)

    def export_args(self) -> dict:
        """compressed-tensors ``input_activations`` arguments for this quantizer."""
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": True,
            "strategy": "token" if self.dynamic else "tensor",
            "group_size": None,
            "dynamic": self.dynamic,
            "actorder": None,
            "observer": None if self.dynamic else "minmax",
        }

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scheme={self.scheme}"


@contextlib.contextmanager
def compressed_tensors_steps(model: nn.Module):
    """Within the block, every dynamic quantizer divides the token's absmax by (Qp + Qn) / 2 (127.5
    at int8), as compressed-tensors' reader (transformers) does, instead of Qp (vLLM's kernels):
    the model then computes exactly what its transformers reload computes, for export checks."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.dynamic]
    try:
        for q in quantizers:
            qmin, qmax = P.qrange(q.bits)
            q.token_divisor = (qmax - qmin) / 2
        yield model
    finally:
        for q in quantizers:
            q.token_divisor = None


@torch.no_grad()
def init_static_steps(model: nn.Module, batch: dict) -> int:
    """Set every not-yet-set static step from one forward on ``batch`` (training data: the held-out
    split must not choose a step). Returns how many steps were set."""
    pending = [m for m in model.modules() if isinstance(m, ActQuantizer) and not m.dynamic and not bool(m.initialized)]
    if pending:
        was_training = model.training
        model.eval()
        model(**batch)
        model.train(was_training)
    return len(pending)


def act_quantizer_for(bits: int | None, scheme: str, learn_scale: bool = True) -> ActQuantizer | None:
    """The quantizer QuantConfig asks for, or None (float activations)."""
    return None if bits is None else ActQuantizer(bits, scheme, learn_scale)


def act_quantizer_from_args(args: dict | None) -> ActQuantizer | None:
    """Inverse of :meth:`ActQuantizer.export_args` (a checkpoint's ``input_activations``), or
    ValueError naming what qat cannot train."""
    if not args:
        return None
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic", False))
    if args.get("type", "int") != "int" or not args.get("symmetric", True):
        raise ValueError(f"input_activations {args} are not symmetric int: qat trains symmetric int activations only")
    if strategy == "token" and dynamic:
        return ActQuantizer(int(args["num_bits"]), "dynamic_token")
    if strategy == "tensor" and not dynamic:
        return ActQuantizer(int(args["num_bits"]), "static_tensor")
    raise ValueError(f"input_activations strategy {strategy!r} with dynamic={dynamic} is not one qat trains: "
                     "it trains dynamic per-token or static per-tensor")
