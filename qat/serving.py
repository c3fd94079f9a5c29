"""Serving targets: which runtime an export is for, checked when the recipe is read.

A recipe names ``serving`` (transformers | vllm-gpu | vllm-cpu | llama.cpp) and, optionally,
``export_format`` (compressed-tensors | gguf; default: the one the target reads). Before any
model is loaded, every layer format the recipe trains (the global settings and each override) is
checked against what the target has a kernel for; a format it cannot run is refused with what to
change. The target also sets the dtype steps train in (:func:`step_dtype`): the runtimes below
keep fp16 steps, so training rounds them the same way and the served weights are the trained ones.

The rules, and where each comes from (docs/SERVING.md has the measurements):

- transformers: reads every format qat exports (compressed-tensors decompresses in torch; GGUF is
  dequantized at load). Measured: reload max |diff| 0 (tests/test_export.py, test_gguf_export.py).
- llama.cpp: GGUF Q4_0 / Q8_0 only = symmetric int4 / int8, group 32, fp16 steps (the block
  formats; qat.gguf_export). Measured with llama-cpp-python (scripts/serving/check_llamacpp.py).
- vllm-cpu (0.32): compressed-tensors WNA16 through ``CPUWNA16LinearKernel``: 4-bit only
  (symmetric uint4b8, asymmetric uint4), even groups or per channel, layer in / out sizes multiples
  of 32 (its can_implement), fp16 / bf16 activations. Measured (issue 18, scripts/serving/
  check_vllm_cpu.py): W8 fails with "Quant type (uint8b128) not supported by CPUWNA16"; fp32 with
  "not implemented for 'Float'". Sizes are not checked here (no model is loaded yet).
- vllm-gpu (0.32): compressed-tensors WNA16; its CUDA kernels, from reading vLLM 0.32's source
  (vllm/model_executor/kernels/linear/mixed_precision, not measured: no GPU in the session that
  wrote this): Marlin (uint4b8 / uint8b128 symmetric, uint4 with zero points; groups -1/32/64/128;
  N % 64 and K % 128 per partition, padded otherwise), Machete (Hopper), Exllama (symmetric 4/8-bit,
  any group > 0, fp16 activations only), Triton W4A16 (4-bit, groups -1..256). So: 4 or 8 bits;
  zero points at 4 bits only (8-bit ones need the optional Conch package); asymmetric 4-bit groups
  in -1/32/64/128/256.
"""

from __future__ import annotations

import torch

TARGETS = ("transformers", "vllm-gpu", "vllm-cpu", "llama.cpp")
EXPORT_FORMATS = ("compressed-tensors", "gguf")
ASYM4_GROUPS = (None, 32, 64, 128, 256)  # Marlin's and Triton W4A16's groups; None = per channel (-1)


def default_export_format(serving: str | None) -> str:
    return "gguf" if serving == "llama.cpp" else "compressed-tensors"


def step_dtype(serving: str | None, export_format: str) -> torch.dtype | None:
    """The dtype the runtime keeps steps in, which training rounds them to; None: the model's."""
    if export_format == "gguf" or serving in ("llama.cpp", "vllm-cpu", "vllm-gpu"):
        return torch.float16
    return None


def train_for_target(model, serving: str | None, export_format: str) -> None:
    """Set every QuantLinear's ``step_dtype`` for the target (after ``qat.quantize_model``)."""
    from qat.quant_linear import QuantLinear

    dtype = step_dtype(serving, export_format)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.step_dtype = dtype


def layer_specs(quant_config) -> list[tuple[str, object]]:
    """(where, LayerSpec) for the global settings and each per-layer override."""
    specs = [("the recipe", quant_config.default_spec())]
    for pattern in quant_config.overrides:
        specs.append((f"override {pattern!r}", quant_config.spec_for(pattern, _pattern=pattern)))
    return specs


def _group(spec) -> str:
    return "per-channel" if spec.group_size is None else f"group {spec.group_size}"


def _check_vllm_cpu(where: str, spec) -> None:
    if spec.bits != 4:
        raise ValueError(
            f"{where} trains {spec.bits}-bit weights, and vLLM CPU serves compressed-tensors W4A16 only (4-bit "
            "weights, symmetric or asymmetric, fp16/bf16 activations; its CPUWNA16 kernel refuses uint8b128 and "
            "3-bit): set bits: 4, or serving: vllm-gpu / transformers for other widths"
        )
    if spec.group_size is not None and spec.group_size % 2:
        raise ValueError(f"{where} uses group {spec.group_size}, and vLLM CPU's CPUWNA16 kernel takes even groups "
                         "(or per channel): set group_size to an even number such as 32")


def _check_vllm_gpu(where: str, spec) -> None:
    if spec.bits not in (4, 8):
        raise ValueError(
            f"{where} trains {spec.bits}-bit weights, and vLLM's CUDA kernels for compressed-tensors weight-only "
            "formats (Marlin, Machete, Exllama, Triton W4A16) take 4 or 8 bits: set bits: 4 or 8, or serving: transformers"
        )
    if not spec.symmetric and spec.bits != 4:
        raise ValueError(f"{where} is asymmetric at {spec.bits} bits, and of vLLM's CUDA kernels only Conch (an "
                         "optional package, conch-triton-kernels) takes 8-bit zero points: set symmetric: true, or bits: 4")
    if not spec.symmetric and spec.group_size not in ASYM4_GROUPS:
        raise ValueError(f"{where} is asymmetric 4-bit with {_group(spec)}, and vLLM's CUDA kernels for zero points "
                         "(Marlin, Triton W4A16) take group -1 (per channel), 32, 64, 128 or 256: set group_size to one of those")


def check_serving(serving: str | None, export_format: str | None, quant_config, *, task: str = "causal_lm",
                  outside_adapter: bool = False, sharded: bool = False) -> str:
    """Refuse a recipe the target cannot serve; returns the export format to write."""
    if serving is not None and serving not in TARGETS:
        raise ValueError(f"serving={serving!r}: use one of {TARGETS} (or leave it unset)")
    export_format = export_format or default_export_format(serving)
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format={export_format!r}: use one of {EXPORT_FORMATS}")
    if serving == "llama.cpp" and export_format != "gguf":
        raise ValueError("llama.cpp reads GGUF files only: set export_format: gguf (or leave it unset)")
    if serving in ("vllm-cpu", "vllm-gpu") and export_format != "compressed-tensors":
        raise ValueError(f"qat's exports for {serving} are compressed-tensors (vLLM's GGUF support is experimental "
                         "and unquantized-activation only): set export_format: compressed-tensors (or leave it unset)")
    specs = layer_specs(quant_config)
    if export_format == "gguf":
        from qat.gguf_export import check_gguf_spec

        if task != "causal_lm":
            raise ValueError(f"export_format gguf writes causal LMs (llama.cpp's text models): task {task!r} "
                             "exports compressed-tensors")
        if outside_adapter:
            raise ValueError("a GGUF file holds the quantized weights only: use adapter_placement: inside (merged "
                             "exactly into the codes), or export compressed-tensors with the peft adapter beside it")
        if sharded:
            raise ValueError("GGUF export of sharded runs (FSDP / DeepSpeed) is not written yet: train data-parallel "
                             "(DDP) or on one device, or export compressed-tensors")
        for where, spec in specs:
            check_gguf_spec(spec.bits, spec.group_size, spec.symmetric, where=where)
    for where, spec in specs:
        if serving == "vllm-cpu":
            _check_vllm_cpu(where, spec)
        elif serving == "vllm-gpu":
            _check_vllm_gpu(where, spec)
    return export_format
