"""Quantization settings: one dataclass for the model, resolved into one spec per layer.

Validation happens in ``__post_init__`` so a bad recipe fails before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from qat import primitives as P
from qat.act_quant import check_act_settings

STEP_INITS = ("rtn", "mse", "gptq")  # gptq: error-compensating codes from calibration data (qat.gptq)
GPTQ_STEP_SEARCHES = ("rtn", "mse")  # how GPTQ picks each group's step
GPTQ_TARGETS = ("quantized", "float")  # what each layer fits: its outputs on the quantized inputs, or the float model's
# Module-name patterns (regular expressions, matched with re.search) left in float by default:
# the output head and classifier heads, whose errors hit the loss directly.
DEFAULT_EXCLUDE = [r"(^|\.)lm_head$", r"(^|\.)(score|classifier|qa_outputs)$"]
_OVERRIDABLE = ("bits", "group_size", "symmetric", "storage_bits", "init")


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is quantized to, after overrides: the numbers QuantLinear is built from."""

    bits: float = 4
    group_size: int | None = 32  # None or -1: one step per output channel
    symmetric: bool = True
    storage_bits: int | None = None  # width of the frozen base codes; None: = bits
    init: str = "mse"

    def __post_init__(self):
        object.__setattr__(self, "bits", P.check_bits(self.bits))
        if self.storage_bits is None:
            object.__setattr__(self, "storage_bits", P.container_bits(self.bits))
        storage = P.check_bits(self.storage_bits)
        if P.is_ternary(storage):
            storage = 2
        object.__setattr__(self, "storage_bits", storage)
        if storage < P.container_bits(self.bits):
            raise ValueError(
                f"storage_bits={storage} is narrower than bits={self.bits}: the frozen base must hold at "
                f"least the trained width; use storage_bits >= {P.container_bits(self.bits)} (8 keeps a near-lossless base)"
            )
        if P.is_ternary(self.bits) and not self.symmetric:
            raise ValueError("ternary (bits=1.58) is symmetric by definition: set symmetric=True")
        if self.init not in STEP_INITS:
            raise ValueError(f"unknown step init {self.init!r}: use one of {STEP_INITS}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size == 0 or self.group_size < -1):
            raise ValueError(f"group size {self.group_size!r}: use a positive number of inputs per step "
                             "(e.g. 32 or 128), or -1 for one step per output channel")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)

    @property
    def export_bits(self) -> int:
        """Integer width of the exported codes (ternary is exported as int2)."""
        return P.container_bits(self.bits)

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"


@dataclass
class QuantConfig:
    """Which layers to quantize and how. ``overrides`` maps a module-name regex to any of
    bits / group_size / symmetric / storage_bits / init, for mixed precision; the first
    matching pattern wins."""

    bits: float = 4
    group_size: int | None = 32
    symmetric: bool = True
    storage_bits: int | None = None
    init: str = "mse"
    include: list[str] = field(default_factory=lambda: [r".*"])
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    overrides: dict[str, dict] = field(default_factory=dict)
    learn_scale: bool = True
    learn_zero_point: bool = True
    # init "gptq" only: dampening (share of the mean H diagonal), activation order (static groups),
    # and the step search run on each group as GPTQ has updated it
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_step_init: str = "mse"
    # "float": each layer fits the float model's outputs from its quantized inputs (GPTAQ), qat.gptq
    gptq_target: str = "quantized"

    # Activation fake-quantization of every quantized layer's input (qat.act_quant): None keeps
    # activations float; 8 with "dynamic_token" is W8A8 / W4A8 int8 per-token, "static_tensor" a
    # learned (LSQ) per-tensor step.
    act_bits: int | None = None
    act_scheme: str = "dynamic_token"

    def __post_init__(self):
        self.group_size = self.default_spec().group_size  # validates the global settings; -1 -> None, here once
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp={self.gptq_damp}: use a positive share of the mean Hessian diagonal, e.g. 0.01")
        if self.gptq_target not in GPTQ_TARGETS:
            raise ValueError(f"gptq_target={self.gptq_target!r}: use one of {GPTQ_TARGETS}")
        if self.gptq_step_init not in GPTQ_STEP_SEARCHES:
            raise ValueError(f"gptq_step_init={self.gptq_step_init!r}: use one of {GPTQ_STEP_SEARCHES}")
        check_act_settings(self.act_bits, self.act_scheme)
        for pattern in [*self.include, *self.exclude, *self.overrides]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"bad module-name pattern {pattern!r}: {err}") from None
        for pattern, values in self.overrides.items():
            unknown = set(values) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(
                    f"override {pattern!r} sets {sorted(unknown)}; overridable per layer: {list(_OVERRIDABLE)}"
                )
            self.spec_for(pattern, _pattern=pattern)

    def default_spec(self) -> LayerSpec:
        return LayerSpec(self.bits, self.group_size, self.symmetric, self.storage_bits, self.init)

    def selects(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.include) and not any(
            re.search(p, name) for p in self.exclude
        )

    def spec_for(self, name: str, _pattern: str | None = None) -> LayerSpec:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LayerSpec)}
        for pattern, override in self.overrides.items():
            if pattern == _pattern or (_pattern is None and re.search(pattern, name)):
                values.update(override)
                if "bits" in override and "storage_bits" not in override and self.storage_bits is None:
                    values["storage_bits"] = None
                break
        return LayerSpec(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
