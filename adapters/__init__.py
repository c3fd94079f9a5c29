"""qat.adapters: LoRA and Walsh-Hadamard adapters for QuantLinear's adapter slot.

    cfg = AdapterConfig(kind="lora", rank=8, targets=[r"q_proj$", r"v_proj$"])
    attach(model, cfg)                      # after qat.quantize_model
    save_adapters(model, "out/adapter"); load_adapters(model, "out/adapter")
    merge(model)                            # inside adapters -> frozen base codes, exactly

Adapter parameters live at ``<layer>.adapter.<param>`` so ``adapter_state_dict`` filters them by name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qat.adapters.init import INITS, check_init_placement, collect_inputs, initialise
from qat.adapter import PLACEMENTS
from qat.adapters.lora import LoRAAdapter
from qat.adapters.peft_format import detached_outside, export_with_peft, save_peft
from qat.adapters.wht import WHTAdapter
from qat.quant_linear import QuantLinear
from qat.surgery import quant_layers

KINDS = ("lora", "wht")
CONFIG_FILE = "qat_adapter_config.json"
WEIGHTS_FILE = "qat_adapter.safetensors"

__all__ = [
    "AdapterConfig", "LoRAAdapter", "WHTAdapter", "attach", "collect_inputs", "merge", "is_adapter_name",
    "adapter_state_dict", "load_adapter_state_dict", "save_adapters", "load_adapters",
    "save_peft", "export_with_peft", "detached_outside",
]


@dataclass
class AdapterConfig:
    kind: str = "lora"                 # "lora" | "wht"
    rank: int = 8                      # LoRA rank; WHT budget = rank * (in + out) values per layer
    alpha: float = 16.0                # LoRA: D scaled by alpha / rank; WHT: c = alpha / sqrt(out)
    dropout: float = 0.0               # outside placement only
    placement: str = "inside"          # "inside" (rounded with the weight) | "outside" (QLoRA-style)
    targets: list[str] = field(default_factory=lambda: [r".*"])  # regexes on QuantLinear names (re.search)
    init: str = "zero"                 # one of INITS
    init_iters: int = 5                # LoftQ alternations
    init_steps: int = 100              # Adam steps of the inside 'refine' init

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}: use one of {KINDS}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter rank {self.rank!r}: use a positive integer")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {self.placement!r}: use one of {PLACEMENTS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} outside [0, 1)")
        if self.dropout and (self.placement != "outside" or self.kind != "lora"):
            raise ValueError("dropout applies to outside-placement LoRA only (an inside adapter never sees x)")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"bad adapter target pattern {pattern!r}: {err}") from None
        if self.init not in INITS:
            raise ValueError(f"unknown adapter init {self.init!r}: use one of {INITS}")
        lora_only, wht_only = {"loftq", "loftq_act"}, {"qwha", "wht_random"}
        if (self.kind == "lora" and self.init in wht_only) or (self.kind == "wht" and self.init in lora_only):
            raise ValueError(f"init {self.init!r} does not apply to kind {self.kind!r}")
        check_init_placement(self.init, self.placement)

    @classmethod
    def from_peft(cls, lora_config, placement: str = "outside") -> "AdapterConfig":
        """From a ``peft.LoraConfig``. peft adds LoRA after the base matmul: placement 'outside'."""
        targets = lora_config.target_modules
        if targets is None:
            patterns = [r".*"]
        elif isinstance(targets, str):
            patterns = [f"^(?:{targets})$"]  # peft full-matches a string target
        else:
            patterns = [rf"(^|\.){re.escape(t)}$" for t in targets]
        init = lora_config.init_lora_weights
        init = "loftq" if init == "loftq" else "zero"
        return cls(kind="lora", rank=int(lora_config.r), alpha=float(lora_config.lora_alpha),
                   dropout=float(lora_config.lora_dropout), placement=placement, targets=patterns, init=init)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, QuantLinear]]:
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers: run qat.quantize_model(model, ...) before attach")
    names = [n for n, _ in layers]
    unmatched = [p for p in config.targets if not any(re.search(p, n) for n in names)]
    if unmatched:
        raise ValueError(f"adapter targets {unmatched} match no quantized layer; available: {names}")
    return [(n, m) for n, m in layers if any(re.search(p, n) for p in config.targets)]


def _build(layer: QuantLinear, config: AdapterConfig, name: str) -> nn.Module:
    kw = dict(placement=config.placement, name=name, device=layer.weight_scale.device)
    if config.kind == "lora":
        return LoRAAdapter(layer.in_features, layer.out_features, config.rank, config.alpha, config.dropout, **kw)
    return WHTAdapter(layer.in_features, layer.out_features, config.rank, config.alpha, **kw)


def attach(model: nn.Module, config: AdapterConfig, calib: dict | None = None,
           float_weights: dict | None = None) -> dict[str, nn.Module]:
    """Put an adapter on every QuantLinear whose name matches ``config.targets``; returns name -> adapter.

    Error-aware inits need ``float_weights`` (name -> W [out, in], the weights before quantization)
    and, for loftq_act / qwha / refine, ``calib`` (name -> X [N, in], from :func:`collect_inputs`).
    All or nothing: all adapters are built before any is attached, and if an init fails the
    layers get their adapters and frozen bases (LoftQ rewrites them) back as they were. A model
    that already carries adapters is refused: a second config would describe only some of them.
    """
    chosen = _targets(model, config)
    taken = [n for n, layer in quant_layers(model) if layer.adapter is not None]
    if taken:
        raise ValueError(f"{taken[0]} already has an adapter: merge(model) first, or attach to a "
                         "freshly quantized model (one attach per model, so its config describes "
                         "every adapter)")
    built = [(n, layer, _build(layer, config, n)) for n, layer in chosen]
    saved = [(layer, _frozen_base(layer)) for _, layer, _ in built]
    try:
        for name, layer, adapter in built:
            layer.adapter = adapter
            W = None if float_weights is None else float_weights.get(name)
            X = None if calib is None else calib.get(name)
            initialise(layer, adapter, config.init, W=W, X=X, iters=config.init_iters,
                       steps=config.init_steps)
    except BaseException:
        for layer, base in saved:
            layer.adapter = None
            _restore_base(layer, base)
        raise
    model.qat_adapter_config = dataclasses.replace(config)  # a copy: later edits of config don't leak
    return {n: a for n, _, a in built}


def quant_layers_of(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _frozen_base(layer: QuantLinear) -> list[torch.Tensor | None]:
    """Copies of the tensors an init may rewrite in place (LoftQ stores Q(W - B A) as the base)."""
    return [None if t is None else t.detach().clone()
            for t in (layer.base_packed, layer.base_scale, layer.base_zero_point)]


@torch.no_grad()
def _restore_base(layer: QuantLinear, base: list[torch.Tensor | None]) -> None:
    for t, old in zip((layer.base_packed, layer.base_scale, layer.base_zero_point), base):
        if t is not None:
            t.copy_(old)


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every inside adapter into its layer's frozen base, exactly; returns how many merged.

    The base takes the codes the forward rounds to (export_codes) and the current steps, so
    W_hat is unchanged bit for bit; the adapter is then removed. Outside adapters cannot fold into
    an integer grid exactly and raise.
    """
    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear) or layer.adapter is None:
            continue
        if layer.adapter.placement != "inside":
            raise ValueError(f"{name}: an outside adapter does not fold exactly into the quantized base; "
                             "save it with save_adapters instead")
        codes, scale, zero = layer.export_codes()
        layer.set_base(codes, scale.float(), None if zero is None else zero.float())
        layer.adapter = None
        count += 1
    if count and hasattr(model, "qat_adapter_config"):
        del model.qat_adapter_config  # every adapter is folded in (outside ones raise above)
    return count


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict name lives under an adapter (the shared ``adapter`` prefix)."""
    return ".adapter." in name or name.startswith("adapter.")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor under a ``.adapter.`` submodule (parameters and WHT positions)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_adapter_name(k)}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (strict on adapter names); WHT supports are resized to the saved nnz."""
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear) and isinstance(layer.adapter, WHTAdapter):
            p = f"{name}.adapter."
            if p + "values" in state:
                layer.adapter.set_support(state[p + "rows"], state[p + "cols"], state[p + "values"])
    own = adapter_state_dict(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"adapter state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict(state, strict=False)


def save_adapters(model: nn.Module, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "qat_adapter_config", None)
    if config is None:
        raise ValueError("no adapters attached (attach(model, AdapterConfig(...)) first)")
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    state = adapter_state_dict(model)
    if config.init.startswith("loftq"):
        # LoftQ rewrote the frozen base (Q = quant(W - BA)): the adapter is only right with that base.
        state.update({k: v.detach().cpu() for k, v in model.state_dict().items()
                      if k.endswith(".base_packed") and k[: -len("base_packed")] + "adapter.lora_A" in state})
    save_file(state, str(folder / WEIGHTS_FILE))


def load_adapters(model: nn.Module, folder: str | Path) -> dict[str, nn.Module]:
    """Attach adapters as saved by :func:`save_adapters` (config, then weights) to a quantized model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    values = json.loads((folder / CONFIG_FILE).read_text())
    values["init"] = "zero"  # the saved weights replace any init
    adapters = attach(model, AdapterConfig(**values))
    state = load_file(str(folder / WEIGHTS_FILE))
    bases = {k: state.pop(k) for k in list(state) if k.endswith(".base_packed")}  # LoftQ's rewritten bases
    load_adapter_state_dict(model, state)
    if bases:
        model.load_state_dict(bases, strict=False)
    return adapters
