"""``WeightArgs``: everything the fused kernels need to rebuild W_hat, as one typed record.

Every kernel entry point (the ``torch.library`` ops of ``ops.py``, their fake implementations,
the Triton launchers of ``triton_kernels.py`` and the layer-facing calls of ``dispatch.py``)
takes the weight as a ``WeightArgs``. ``torch.library`` schemas take flat tensors and scalars
only, so this module is the single place that flattens a record into the op's arguments
(``flat``), spells the op schema (``SCHEMA``) and rebuilds the record inside an op
(``from_flat``): adding a field means editing this file alone.

    base_packed   int32 [out, words]     the frozen base codes (qat.packing's words)
    base_scale    [out, G]               the base's steps
    base_zero     [out, G] or None       the base's zero points (asymmetric base)
    weight_scale  [out, G]               the learned steps, already in the layer's scale dtype
    weight_zero   [out, G] or None       the learned zero points (float; rounded and clamped
                                         to the grid by the kernels)
    delta         [out, in] or None      an inside adapter's dense update D
    storage_bits  int                    width of the base codes
    bits_qmin, bits_qmax  int            the trained grid (ternary is (-1, 1))
    group_size, in_features  int
    out_dtype     torch.dtype            W_hat's dtype (the layer's scale dtype)
    lora_a [r, in], lora_b [out, r], lora_scaling   a plain inside LoRA as its factors, or
                                         (None, None, 1.0): D = scaling * B A formed in-kernel

An inside LoRA's update comes either as ``delta`` or as its factors, never both, except in the
grads op's dense-D path (``check_one_delta`` says where).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

# One line per field, in the order of the dataclass below: "<schema type> <name>".
_SCHEMA_FIELDS = (
    "Tensor base_packed", "Tensor base_scale", "Tensor? base_zero", "Tensor weight_scale",
    "Tensor? weight_zero", "Tensor? delta", "int storage_bits", "int bits_qmin", "int bits_qmax",
    "int group_size", "int in_features", "ScalarType out_dtype", "Tensor? lora_a",
    "Tensor? lora_b", "float lora_scaling",
)
SCHEMA = ", ".join(_SCHEMA_FIELDS)  # the weight's part of every op schema in ops.py
N_FIELDS = len(_SCHEMA_FIELDS)      # how many flat op arguments one WeightArgs takes


@dataclass(frozen=True)
class WeightArgs:
    base_packed: torch.Tensor
    base_scale: torch.Tensor
    base_zero: Optional[torch.Tensor]
    weight_scale: torch.Tensor
    weight_zero: Optional[torch.Tensor]
    delta: Optional[torch.Tensor]
    storage_bits: int
    bits_qmin: int
    bits_qmax: int
    group_size: int
    in_features: int
    out_dtype: torch.dtype
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    lora_scaling: float = 1.0

    @property
    def out_features(self) -> int:
        return self.base_packed.shape[0]

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def flat(self) -> tuple:
        """The fields in ``SCHEMA`` order: the weight's arguments of every ``qat::`` op."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_flat(cls, flat) -> "WeightArgs":
        """The record an op rebuilds from its flat weight arguments (``flat``'s inverse)."""
        return cls(*flat)

    def replace(self, **changes) -> "WeightArgs":
        return dataclasses.replace(self, **changes)

    def float_tensors(self) -> tuple:
        """The tensors whose dtype decides whether the Triton kernels take this weight."""
        return self.base_scale, self.weight_scale, self.delta, self.lora_a, self.lora_b


assert [f.split()[-1] for f in _SCHEMA_FIELDS] == [f.name for f in dataclasses.fields(WeightArgs)], \
    "SCHEMA and WeightArgs must list the same fields in the same order"


def check_one_delta(weight: WeightArgs) -> None:
    """The weight ops take an inside LoRA's update once: as ``delta`` or as its factors."""
    if weight.delta is not None and weight.lora_a is not None:
        raise ValueError("pass the inside adapter's update once: a dense delta or the LoRA factors")
