"""Export a QuantLinear causal LM as one GGUF file (llama.cpp / Ollama), exactly.

GGUF's Q4_0 and Q8_0 are qat's symmetric int4 / int8 grids with group 32 and fp16 steps:

    Q4_0 block (18 bytes): fp16 d, 16 bytes; value = d * (q - 8), q in 0..15; byte j holds
                           element j in its low nibble and element j + 16 in its high nibble
    Q8_0 block (34 bytes): fp16 d, 32 int8 q; value = d * q

The codes and steps written are the ones the layers compute with (``QuantLinear.export_codes``),
never re-quantized: a layer whose steps are not fp16 values, or whose grid is not one of these,
is refused with the nearest format that works. ``step_dtype = float16`` on the layers (the GGUF
recipe target, see :func:`train_for_gguf`) trains with the fp16 step GGUF stores. Float tensors
(embeddings, norms, an unquantized head) are written as F32 (exact) or F16. The tokenizer goes
in through :mod:`qat.gguf_vocab`. Like the compressed-tensors export, the file is written in a
temporary folder beside the target and swapped into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qat import safety
from qat.export import QAT_CONFIG_FILE, check_exportable, layer_records, prepare_target, swap_into_place
from qat.quant_linear import QuantLinear

GGUF_FILE = "model.gguf"
BLOCK = 32  # weights per Q4_0 / Q8_0 block, along the input dimension
FLOAT_TYPES = ("f32", "f16")
# transformers class -> (GGUF architecture, whether llama.cpp permutes q/k rows for its rotary layout).
# Mistral is written as "llama", as llama.cpp's converter does; transformers reads it back as
# LlamaForCausalLM (same weights and math; its Mistral branch, general.name == "mistral", fails with
# gguf 0.19: "Unknown gguf model_type: mistral"), so the name is left as the user's.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
    "Gemma2ForCausalLM": ("gemma2", False),
    "Gemma3ForCausalLM": ("gemma3", False),
}
# Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's multiplies by the stored weight, so GGUF holds
# 1 + weight (transformers' reader subtracts the 1 again). In fp32, (1 + w) - 1 is exact whenever
# 1 + w lies in [0.5, 2] (Sterbenz), so the reloaded model computes the very same 1 + w.
GEMMA = ("gemma2", "gemma3")
# Config fields transformers' GGUF reader does not take from the file (it keeps the class default):
# an export whose model differs from the default in one of them is refused (see _check_config_reloads).
UNREAD_FIELDS = {
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types",
               "hidden_activation"),
    "gemma3": ("query_pre_attn_scalar", "layer_types", "hidden_activation", "rope_parameters"),
}


# ------------------------------------------------------------------------------- what GGUF can hold
def gguf_type_name(bits: float) -> str:
    return {4: "Q4_0", 8: "Q8_0"}[int(bits)]


def check_gguf_spec(bits: float, group_size: int | None, symmetric: bool, where: str = "the recipe") -> None:
    """Refuse, in one sentence naming the nearest exact format, a grid GGUF Q4_0 / Q8_0 cannot hold."""
    if bits not in (4, 8):
        near = "bits 4 (Q4_0)" if bits < 6 else "bits 8 (Q8_0)"
        raise ValueError(
            f"{where} trains {bits}-bit codes, which no GGUF block format stores exactly (Q4_0 is 4-bit, "
            f"Q8_0 8-bit; the k-quants use 6-bit sub-scales): use {near}, or export compressed-tensors"
        )
    if not symmetric:
        raise ValueError(
            f"{where} is asymmetric, and GGUF {gguf_type_name(bits)} has no zero point (Q4_1's is a float "
            f"offset, not qat's integer one): set symmetric true for {gguf_type_name(bits)}, or export compressed-tensors"
        )
    if group_size != BLOCK:
        raise ValueError(
            f"{where} uses group size {group_size if group_size else 'per-channel'}, and GGUF "
            f"{gguf_type_name(bits)} has one step per {BLOCK} weights: set group_size {BLOCK}, or export "
            "compressed-tensors, which keeps any group size"
        )


def train_for_gguf(model: nn.Module) -> None:
    """Round every QuantLinear's steps to fp16 in the forward, as a GGUF block stores them."""
    from qat.serving import train_for_target

    train_for_target(model, "llama.cpp", "gguf")


def _check_layer(name: str, layer: QuantLinear, scale: torch.Tensor) -> None:
    check_gguf_spec(layer.spec.bits, layer.group_size, layer.spec.symmetric, where=name)
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name} has non-finite steps (NaN or inf): training diverged; lower the step learning "
                         "rate and retrain before exporting")
    as_fp16 = scale.to(torch.float16)
    if not (torch.isfinite(as_fp16).all() and torch.equal(as_fp16.to(scale.dtype), scale)):
        raise ValueError(
            f"{name}'s steps are not fp16 values, so {gguf_type_name(layer.spec.bits)} (fp16 steps) cannot "
            "hold them exactly: train with export_format: gguf (or serving: llama.cpp), which trains fp16 "
            "steps, or export compressed-tensors"
        )


# ------------------------------------------------------------------------------- block encoding
def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> np.ndarray:
    """Q4_0 / Q8_0 bytes [out, G * block_bytes] of signed codes [out, in] and steps [out, G]."""
    out_features, in_features = codes.shape
    groups = in_features // BLOCK
    d = scale.to(torch.float16).reshape(out_features, groups, 1).contiguous().view(torch.uint8)  # [out, G, 2]
    q = codes.to(torch.int16).reshape(out_features, groups, BLOCK)
    if bits == 4:
        u = (q + 8).to(torch.uint8)  # 0..15
        payload = u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << 4)  # [out, G, 16]
    else:
        payload = q.to(torch.int8).view(torch.uint8)  # [out, G, 32]
    return torch.cat([d, payload], dim=-1).reshape(out_features, -1).cpu().numpy()


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for Llama-family rotary (interleaved pairs -> halves), dim 0.

    Rows [n_head * head_dim, ...] are viewed as [n_head, 2, head_dim / 2, ...] and the middle
    axes swapped; a row's codes and its block steps move together, so exactness survives.
    """
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# ------------------------------------------------------------------------------- tensors
def _gguf_name(name_map, hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise ValueError(f"{hf_name} has no GGUF tensor name for this architecture: the model has a module "
                         "llama.cpp does not know; export compressed-tensors instead")
    return f"{mapped}.{suffix}"


def _rotary_heads(hf_name: str, config) -> int | None:
    if ".q_proj." in f"{hf_name}." or hf_name.endswith("q_proj"):
        return config.num_attention_heads
    if ".k_proj." in f"{hf_name}." or hf_name.endswith("k_proj"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _float_array(tensor: torch.Tensor, float_type: str) -> np.ndarray:
    # 1-D tensors (norms, biases) stay F32: llama.cpp reads them as F32.
    dtype = torch.float16 if float_type == "f16" and tensor.dim() > 1 else torch.float32
    return tensor.detach().to(dtype).cpu().contiguous().numpy()


@torch.no_grad()
def gguf_tensors(model: nn.Module, arch: str, permute: bool, float_type: str = "f32") -> list[tuple]:
    """(gguf name, array, raw type or None) of every tensor, in state-dict order."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    layers = dict(check_exportable(model))
    skip = tuple(f"{n}." for n in layers)
    tensors, seen = [], set()
    for key, tensor in model.state_dict().items():
        if key.startswith(skip) or key.startswith("_"):
            continue
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # tied: GGUF omits `output`, and readers tie it to token_embd again
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen and tensor.numel() > 0:
            continue
        seen.add(ident)
        heads = _rotary_heads(key, config) if permute else None
        tensor = rotary_permute(tensor, heads) if heads else tensor
        if arch in GEMMA and key.endswith("norm.weight"):
            tensor = 1.0 + tensor.float()
        tensors.append((_gguf_name(name_map, key), _float_array(tensor, float_type), None))
    for name, layer in layers.items():
        codes, scale, _ = layer.export_codes()
        _check_layer(name, layer, scale)
        heads = _rotary_heads(name, config) if permute else None
        if heads:
            codes, scale = rotary_permute(codes, heads), rotary_permute(scale, heads)
        qtype = getattr(gguf.GGMLQuantizationType, gguf_type_name(layer.spec.bits))
        tensors.append((_gguf_name(name_map, name + ".weight"), encode_blocks(codes, scale, int(layer.spec.bits)), qtype))
        if layer.bias is not None:
            bias = rotary_permute(layer.bias, heads) if heads else layer.bias
            tensors.append((_gguf_name(name_map, name + ".bias"), _float_array(bias, "f32"), None))
    return tensors


# ------------------------------------------------------------------------------- metadata
def _rope_theta(config, layer_type: str = "full_attention") -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # per layer type (Gemma 3: sliding layers have their own base)
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"the model uses rope scaling {rope_type!r}, which qat does not write to GGUF yet: "
                         "export compressed-tensors, or use a model with default rotary embeddings")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_metadata(writer, model: nn.Module, arch: str, name: str, file_type: int) -> None:
    import gguf

    config = model.config
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch in GEMMA:
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
    if arch == "gemma2":  # llama.cpp's gemma2 reads both caps from the file
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _file_type(layers) -> int:
    import gguf

    bits = [int(layer.spec.bits) for _, layer in layers]
    if bits and bits.count(4) >= bits.count(8):
        return gguf.LlamaFileType.MOSTLY_Q4_0
    return gguf.LlamaFileType.MOSTLY_Q8_0


def _check_config_reloads(path: Path, model: nn.Module, arch: str) -> None:
    """transformers rebuilds the config from GGUF metadata alone: refuse a file it would misread
    (e.g. a Qwen3 head_dim other than the class default, which its reader does not take from the file)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    cls = type(model.config)
    rebuilt = cls(**{k: v for k, v in read.items() if k not in ("model_type", "_model_name_or_path")})
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "tie_word_embeddings"):
        if getattr(rebuilt, field) != getattr(model.config, field):
            raise ValueError(f"transformers would read this GGUF with {field}={getattr(rebuilt, field)} where the "
                             f"model has {getattr(model.config, field)}: export compressed-tensors for this model")
    if _head_dim(rebuilt) != _head_dim(model.config):
        raise ValueError(f"transformers' GGUF reader rebuilds head_dim {_head_dim(rebuilt)} where the model has "
                         f"{_head_dim(model.config)}: export compressed-tensors for this model")
    for field in UNREAD_FIELDS.get(arch, ()):
        if getattr(rebuilt, field, None) != getattr(model.config, field, None):
            raise ValueError(f"transformers' GGUF reader keeps {field}={getattr(rebuilt, field, None)!r} (its default) "
                             f"where the model has {getattr(model.config, field, None)!r}: export compressed-tensors "
                             "for this model")


def _check_llamacpp_math(arch: str, config) -> None:
    """Refuse a Gemma whose query scaling llama.cpp would not reproduce (it scales by 1/sqrt(head_dim))."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if arch in GEMMA and scalar is not None and scalar != _head_dim(config):
        raise ValueError(f"query_pre_attn_scalar {scalar} differs from head_dim {_head_dim(config)}, and llama.cpp "
                         "scales queries by 1/sqrt(head_dim): export compressed-tensors for this model")


# ------------------------------------------------------------------------------- the export
def export_gguf(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    float_type: str = "f32",
    recipe: dict | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` (a causal LM with QuantLinear layers) as ``out_dir/model.gguf``.

    The tokenizer comes from ``tokenizer`` (saved first) or ``source_dir`` (default the model's
    ``name_or_path``), which must hold a ``tokenizer.json``. ``float_type`` "f32" keeps the float
    tensors exact; "f16" halves them (embeddings and head rounded). Returns the export folder.
    """
    import gguf

    from qat.gguf_vocab import add_vocab

    out_dir = Path(out_dir)
    source = source_dir or getattr(model, "name_or_path", None)
    safety.clean_leftovers(out_dir)  # a killed export's hidden folders (or its moved-aside old export)
    prepare_target(out_dir, overwrite, inputs=(Path(source),) if source else ())
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r}: use one of {FLOAT_TYPES}")
    cls_name = type(model).__name__
    if cls_name not in ARCHITECTURES:
        raise ValueError(f"{cls_name} is not an architecture qat writes to GGUF ({', '.join(ARCHITECTURES)}): "
                         "export compressed-tensors instead")
    arch, permute = ARCHITECTURES[cls_name]
    _check_llamacpp_math(arch, model.config)
    layers = check_exportable(model)
    name = name or (Path(str(source)).name if source else cls_name)
    tensors = gguf_tensors(model, arch, permute, float_type)  # refusals happen here, before any file
    tmp = safety.hidden_temp(out_dir)
    try:
        with safety.signals_raise():  # SIGTERM, like Ctrl-C, reaches the clean-up below
            vocab_dir = Path(source) if source and tokenizer is None else tmp / "tokenizer"
            if tokenizer is not None:
                tokenizer.save_pretrained(vocab_dir)
            writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), arch)
            write_metadata(writer, model, arch, name, _file_type(layers))
            add_vocab(writer, vocab_dir, model.config.vocab_size)
            for tensor_name, array, raw_type in tensors:
                writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
            _check_config_reloads(tmp / GGUF_FILE, model, arch)
            meta = {"format": "gguf", "file": GGUF_FILE, "layers": layer_records(layers), "recipe": recipe,
                    "types": {n: gguf_type_name(layer.spec.bits) for n, layer in layers}, "float_type": float_type}
            (tmp / QAT_CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
            safety.write_marker(tmp, "qat export --format gguf")  # last: only a whole export carries it
            safety.apply_umask(tmp)
            swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
