"""Outside-placement LoRA in peft's own adapter format, loadable with ``PeftModel.from_pretrained``.

peft computes y = base(x) + dropout(x) A^T B^T * lora_alpha / r, which is the outside placement exactly,
so the tensors map one to one:
    base_model.model.<layer>.lora_A.weight  [r, in]   = adapter.lora_A
    base_model.model.<layer>.lora_B.weight  [out, r]  = adapter.lora_B
The packed base goes out separately with qat.export_model while the adapters are detached
(:func:`detached_outside`); the two together reproduce the trained model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from qat.adapters.lora import LoRAAdapter
from qat.quant_linear import QuantLinear


def _outside_loras(model: nn.Module) -> list[tuple[str, LoRAAdapter]]:
    found = [(n, m.adapter) for n, m in model.named_modules()
             if isinstance(m, QuantLinear) and m.adapter is not None and m.adapter.placement == "outside"]
    bad = [n for n, a in found if not isinstance(a, LoRAAdapter)]
    if bad:
        raise ValueError(f"peft's LoRA format holds LoRA adapters only; {bad[:3]} carry other kinds")
    if not found:
        raise ValueError("no outside-placement LoRA adapters to save (inside ones export with the base)")
    return found


def save_peft(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors for the model's outside LoRAs."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    loras = _outside_loras(model)
    ranks = {a.rank for _, a in loras}
    alphas = {a.alpha for _, a in loras}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError("peft's config holds one rank and alpha; these adapters mix several")
    dropout = next(iter(loras))[1].dropout
    config = LoraConfig(
        r=ranks.pop(), lora_alpha=alphas.pop(), target_modules=[n for n, _ in loras],
        lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0, bias="none",
        base_model_name_or_path=base_model_name_or_path,
        task_type="CAUSAL_LM" if hasattr(model, "generate") else None,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = {}
    for name, a in loras:
        state[f"base_model.model.{name}.lora_A.weight"] = a.lora_A.detach().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = a.lora_B.detach().cpu().contiguous()
    save_file(state, str(folder / "adapter_model.safetensors"))


@contextlib.contextmanager
def detached_outside(model: nn.Module):
    """Temporarily take outside adapters off their layers (so export_model writes the bare base)."""
    held = [(m, m.adapter) for m in model.modules()
            if isinstance(m, QuantLinear) and m.adapter is not None and m.adapter.placement == "outside"]
    try:
        for m, _ in held:
            m.adapter = None
        yield model
    finally:
        for m, a in held:
            m.adapter = a


@torch.no_grad()
def export_with_peft(model: nn.Module, out_dir: str | Path, adapter_dir: str | Path, **export_kw) -> None:
    """qat.export_model of the base plus save_peft of the outside LoRAs, all or nothing: the adapter is
    written first into a hidden folder, then the base, then the adapter is swapped into place (a
    failure leaves no base without its adapter). The base's config.json asks transformers to load it dense
    (``dequantize``), so the plain ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir),
    adapter_dir)`` works: peft wraps ``nn.Linear`` layers, not compressed-tensors' packed ones."""
    import shutil

    from qat import safety
    from qat.export import prepare_target, swap_into_place, export_model

    out_dir, adapter_dir = Path(out_dir), Path(adapter_dir)
    # adapter_dir inside out_dir (save_model's out/adapter): the export replaces out_dir whole, so the
    # adapter waits beside out_dir and moves in after it; out_dir's marker then lists it as its own.
    nested = out_dir.resolve() in adapter_dir.resolve().parents
    waiting = out_dir.with_name(f"{out_dir.name}-{adapter_dir.name}") if nested else adapter_dir
    safety.clean_leftovers(waiting)  # (export_model cleans out_dir's own leftovers, not this one)
    if not nested:
        prepare_target(adapter_dir, export_kw.get("overwrite", False))
    tmp = safety.hidden_temp(waiting)
    base_in_place = False
    try:
        with safety.signals_raise():
            save_peft(model, tmp)  # refuses adapters peft cannot hold before the base is written
            safety.write_marker(tmp, "qat export (peft adapter)")
            safety.apply_umask(tmp)
            with detached_outside(model):
                export_model(model, out_dir, dequantize_on_load=True, **export_kw)
            base_in_place = True
            swap_into_place(tmp, adapter_dir)
            if nested:
                safety.write_marker(out_dir, "qat export (with a peft adapter)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if base_in_place:  # a base without its trained adapter must not look like the export
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
