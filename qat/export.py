"""Export a QuantLinear model as a compressed-tensors ``pack-quantized`` checkpoint.

The codes written are the ones the layers compute in forward (``QuantLinear.export_codes``),
never re-derived from float weights, so ``transformers`` (with compressed-tensors installed)
reloads exactly the trained numerics. Files are written to a temporary folder beside the
target and renamed into place, so a failure never leaves a half-written export or touches an
existing one.
"""

from __future__ import annotations

import contextlib

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from qat import safety
from qat.kernels import dispatch
from qat.model_card import write_model_card
from qat.online_hadamard import transform_config, transform_tensors
from qat.quant_linear import QuantLinear
from qat.surgery import linear_layers, quant_layers

QAT_CONFIG_FILE = "qat_config.json"
# Files copied from the source model folder when present: tokenizer, generation settings and
# the sentence-transformers pipeline description (so SentenceTransformer(export) works too).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
COPIED_DIRS = ("1_Pooling", "2_Normalize")


def _name_target(name: str) -> str:
    """compressed-tensors target for one module, robust to a wrapper prefix (e.g. ``bert.``)."""
    return "re:(?:.*\\.)?" + re.escape(name) + "$"


PACKED, INT8 = "pack-quantized", "int-quantized"


def weight_format(layer: QuantLinear) -> str:
    """The compressed-tensors format a layer is written in.

    int8 weights with quantized activations (W8A8) go as ``int-quantized`` (``weight`` int8 [out, in]):
    that is the format vLLM serves with its int8 x int8 kernels (CompressedTensorsW8A8Int8, CPU
    included), where a ``pack-quantized`` W8A8 is taken as weight-only (vLLM CPU 0.32 then refuses
    uint8b128). Everything else is ``pack-quantized`` (int32 words).
    """
    return INT8 if layer.spec.export_bits == 8 and getattr(layer, "act_quant", None) is not None else PACKED


def quantization_config(model: nn.Module, dequantize: bool = False) -> dict:
    """The ``quantization_config`` block of config.json: one config group per distinct format.

    ``dequantize``: transformers decompresses the packed layers to dense ``nn.Linear`` at load (same
    numerics), which is what peft needs to put a LoRA on them (peft cannot wrap compressed-tensors'
    compressed layers, which hold ``weight_packed`` and no ``weight``); vLLM ignores the key.
    """
    layers = quant_layers(model)
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers:
        spec = layer.spec
        key = (spec.export_bits, None if spec.group_size is None else layer.group_size, spec.symmetric,
               spec.init, str(layer.scale_dtype), _act_key(layer), weight_format(layer))
        groups.setdefault(key, []).append(name)
    quantized = {n for n, _ in layers}
    ignore = [n for n, _ in linear_layers(model) if n not in quantized]
    config_groups = {}
    for i, ((bits, group_size, symmetric, init, scale_dtype, act, fmt), names) in enumerate(sorted(groups.items(), key=str)):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else [_name_target(n) for n in names],
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "channel" if group_size is None else "group",
                "group_size": group_size,
                "dynamic": False,
                "actorder": _actorder(model, init),
                # What set the steps before training: MSE search, or absmax (compressed-tensors' minmax).
                "observer": _observer(model, init),
                "scale_dtype": scale_dtype,  # the dtype weight_scale is saved in ("torch.float32", ...)
            },
            "input_activations": json.loads(act) if act else None,  # W8A8 / W4A8: qat.act_quant
            "output_activations": None,
            "format": fmt,
        }
    formats = {g["format"] for g in config_groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "version": _compressed_tensors_version(),
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    if (transforms := transform_config(model)) is not None:  # online input rotations (qat.online_hadamard)
        config["transform_config"] = transforms
    if dequantize or any(not layer.spec.symmetric for _, layer in layers):
        # transformers + compressed-tensors 0.20 build the compressed layout on the meta device,
        # where the asymmetric zero point is left unpacked ([out, G]) while the checkpoint holds
        # it packed along dim 0 ([ceil(out*b/32), G], the format vLLM reads): the plain load
        # fails on a shape mismatch. `dequantize: true` makes transformers decompress each
        # layer's tensors with compressed-tensors' own decompressor instead (same numerics, and
        # transformers decompresses to dense either way); vLLM ignores the key.
        config["dequantize"] = True
    return config


def _act_key(layer: QuantLinear) -> str | None:
    """The layer's ``input_activations`` arguments as a hashable key (None: float activations)."""
    act = getattr(layer, "act_quant", None)
    return None if act is None else json.dumps(act.export_args(), sort_keys=True)


def _act_formats(config: dict) -> set:
    return {json.dumps(g.get("input_activations"), sort_keys=True) for g in config.get("config_groups", {}).values()}


OBSERVERS = {"mse": "mse", "rtn": "minmax"}  # qat's step init -> compressed-tensors observer name


def _observer(model: nn.Module, init: str) -> str:
    """GPTQ layers name the search that set their steps (``gptq_step_init``), as llm-compressor does."""
    if init == "gptq":
        init = getattr(getattr(model, "qat_config", None), "gptq_step_init", "mse")
    return OBSERVERS[init]


def _actorder(model: nn.Module, init: str) -> str | None:
    """"static" for GPTQ solved in activation order with contiguous groups (no g_idx to save)."""
    config = getattr(model, "qat_config", None)
    return "static" if init == "gptq" and getattr(config, "gptq_act_order", False) else None


def _compressed_tensors_version() -> str:
    """The compressed-tensors version whose pack-quantized layout qat writes (as llm-compressor records it)."""
    from importlib.metadata import version

    return version("compressed-tensors")


def _weights_format(weights: dict) -> tuple:
    group = weights.get("group_size") if weights.get("strategy") == "group" else None
    return int(weights.get("num_bits", 0)), group, bool(weights.get("symmetric", True))


def keep_source_fields(config: dict, source: Path | None) -> dict:
    """A re-export of a compressed-tensors checkpoint (another tool's, e.g. llm-compressor's) keeps
    its quantization_config (actorder, observer, version, sparsity_config, transform_config, ...)
    when it describes the same formats as the tensors written; otherwise ``config`` as computed."""
    path = source / "config.json" if source is not None else None
    if path is None or not path.is_file():
        return config
    prior = (json.loads(path.read_text()).get("quantization_config") or {})
    if prior.get("quant_method") != "compressed-tensors" or prior.get("format") != "pack-quantized":
        return config
    mine = {_weights_format(g["weights"]) for g in config["config_groups"].values()}
    theirs = {_weights_format(g.get("weights") or {}) for g in prior.get("config_groups", {}).values()}
    if mine != theirs or _act_formats(config) != _act_formats(prior):
        return config
    merged = copy.deepcopy(prior)
    merged["quantization_status"] = "compressed"
    if "dequantize" in config:
        merged["dequantize"] = config["dequantize"]
    return merged


def check_exportable(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers: run qat.quantize_model(model, config) first")
    for name, layer in layers:
        if layer.source_type == "Conv1D":
            raise ValueError(
                f"{name} was a GPT-2 Conv1D: transformers rebuilds it as Conv1D, which compressed-tensors "
                "does not quantize, so the export would not reload; train with qat, then save with "
                "qat.load / torch.save, or use a model with nn.Linear layers"
            )
        if layer.adapter is not None and layer.adapter.placement == "outside":
            raise ValueError(
                f"{name} has an outside-placement adapter, which is not part of the packed base: "
                "save it with qat.adapters (peft format) or merge it into the quantizer first"
            )
    return layers


@torch.no_grad()
def layer_export_tensors(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """One (whole, unsharded) layer's export tensors: packed codes, steps, shape, zero points, bias."""
    codes, scale, zero = layer.export_codes()
    if weight_format(layer) == INT8:
        return _int8_export_tensors(name, layer, codes, scale, zero)
    bits = layer.spec.export_bits
    out = {
        f"{name}.weight_packed": dispatch.pack_int32(codes, bits),  # Triton on CUDA, same bits
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if zero is not None:
        out[f"{name}.weight_zero_point"] = dispatch.pack_int32(zero, bits, dim=0)
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().contiguous()
    out.update(act_export_tensors(name, layer))
    return out


def _int8_export_tensors(name: str, layer: QuantLinear, codes, scale, zero) -> dict[str, torch.Tensor]:
    """``int-quantized``: the signed int8 codes as ``weight`` [out, in], steps and (asymmetric) int8 zero
    points unpacked, shaped like the steps."""
    out = {f"{name}.weight": codes.to(torch.int8).contiguous(), f"{name}.weight_scale": scale.contiguous()}
    if zero is not None:
        out[f"{name}.weight_zero_point"] = zero.round().to(torch.int8).reshape(scale.shape).contiguous()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().contiguous()
    out.update(act_export_tensors(name, layer))
    return out


@torch.no_grad()
def act_export_tensors(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """A static activation step as compressed-tensors names it: ``input_scale`` [1] and a zero
    ``input_zero_point`` [1] (symmetric); dynamic steps are computed by the runtime: nothing saved."""
    act = getattr(layer, "act_quant", None)
    if act is None or act.dynamic:
        return {}
    if not bool(act.initialized):
        raise ValueError(f"{name}'s static activation step was never set: run at least one forward "
                         "(calibration or training batch) before exporting")
    return {f"{name}.input_scale": act.scale.detach().to(layer.scale_dtype).reshape(1).clone(),
            f"{name}.input_zero_point": torch.zeros(1, dtype=torch.int8)}


def state_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """state-dict key -> (module that owns it, attribute name), in ``state_dict()`` order: each
    module's parameters, then its persistent buffers, then its children's."""
    owners = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        lead = f"{prefix}." if prefix else ""
        for name in module._parameters:
            owners.setdefault(lead + name, (module, name))
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                owners.setdefault(lead + name, (module, name))
    return owners


def _owned(owner: nn.Module, attr: str):
    return owner._parameters[attr] if attr in owner._parameters else owner._buffers.get(attr)


@torch.no_grad()
def packed_state_dict(model: nn.Module, gather=None, keep: bool = True,
                      device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every QuantLinear replaced by its packed export tensors.

    The one builder for single-process and sharded exports (``qat.trainers.sharded_export``):
    ``gather(module, recurse=...)`` is a context manager in which the module's parameters are
    whole (default: none needed); with ``keep`` False the tensors are gathered but not kept
    (the other ranks of a sharded export); ``device`` moves each kept tensor there as a copy
    (default: left where it is). A tied weight (e.g. lm_head = embeddings, one Parameter) is
    saved once, under its first key, and tied again on load.
    """
    gather = gather or (lambda module, recurse=True: contextlib.nullcontext())
    layers = dict(check_exportable(model))
    skip = tuple(f"{n}." for n in layers)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous() if device is None else t.detach().to(device, copy=True).contiguous()

    for key, (owner, attr) in state_owners(model).items():
        ref = _owned(owner, attr)
        if key.startswith(skip) or key.startswith("_") or ref is None or id(ref) in seen:
            continue
        seen.add(id(ref))
        with gather(owner, recurse=False):
            if keep:
                state[key] = kept(_owned(owner, attr))
    for name, layer in layers.items():
        with gather(layer):
            tensors = layer_export_tensors(name, layer)
        if keep:
            state.update({k: kept(v) for k, v in tensors.items()})
    if keep:
        state.update(transform_tensors(model))  # <layer>.R4_input.weight: what vLLM's transform loader reads
    return state


def prepare_target(out_dir: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse a target that cannot be written without loss. ``overwrite`` replaces only an earlier
    qat export (its ``.qat-export`` marker, nothing else in it) that holds none of ``inputs``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is a file: choose a folder path for the export")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty: choose a new folder, or pass overwrite=True (--overwrite) to replace it"
        )
    if overwrite:
        safety.check_replaceable(out_dir, inputs, is_export_file=_is_export_file)


def _is_export_file(name: str) -> bool:
    """A name :func:`export_model` writes (weights, configs, card, copied tokenizer / pipeline files)."""
    return (name in COPIED_FILES or name in COPIED_DIRS or name in ("config.json", "README.md", QAT_CONFIG_FILE,
            "model.safetensors.index.json") or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name) is not None)


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_source_files(source: Path | None, folder: Path) -> None:
    if source is None or not source.is_dir():
        return
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    for name in COPIED_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, folder / name)


def layer_records(layers) -> dict:
    return {
        name: dict(bits=layer.spec.bits, group_size=layer.group_size, symmetric=layer.spec.symmetric,
                   storage_bits=layer.spec.storage_bits)
        for name, layer in layers
    }


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    recipe: dict | None = None,
    base_model: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
    dequantize_on_load: bool = False,
) -> Path:
    """Write ``model`` (with QuantLinear layers) as a compressed-tensors pack-quantized folder.

    ``source_dir`` (default: ``model.name_or_path`` when it is a local folder) supplies the
    tokenizer, generation config and sentence-transformers files; ``tokenizer`` is saved if given.
    ``recipe`` (any JSON-able dict: the training recipe) goes into the model card and
    ``qat_config.json``. ``state`` is a precomputed :func:`packed_state_dict` (a sharded model's,
    gathered by ``qat.trainers.sharded_export``); None computes it here. ``dequantize_on_load``: config.json
    asks transformers to load the layers dense (for a peft adapter on top). Returns the export folder.
    """
    out_dir = Path(out_dir)
    if source_dir is None and getattr(model, "name_or_path", None):
        source_dir = model.name_or_path
    source = Path(source_dir) if source_dir else None
    safety.clean_leftovers(out_dir)  # a killed export's hidden folders (or its moved-aside old export)
    prepare_target(out_dir, overwrite, inputs=(source,))
    layers = check_exportable(model)
    tmp = safety.hidden_temp(out_dir)
    try:
        with safety.signals_raise():  # SIGTERM, like Ctrl-C, reaches the clean-up below
            state = packed_state_dict(model) if state is None else state
            _write_weights(state, tmp, max_shard_size)
            config = copy.deepcopy(model.config)  # the live model keeps its float config
            config.quantization_config = keep_source_fields(quantization_config(model, dequantize_on_load), source)
            config.architectures = [_architecture(model)]  # as save_pretrained records it
            config.save_pretrained(tmp)
            _copy_source_files(source, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            qat_config = getattr(model, "qat_config", None)
            meta = {
                "quant_config": qat_config.to_dict() if qat_config is not None else None,
                "layers": layer_records(layers),
                "recipe": recipe,
            }
            (tmp / QAT_CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
            write_model_card(tmp, model, layers, base_model=base_model or (str(source) if source else None),
                             recipe=recipe, state=state)
            safety.write_marker(tmp, "qat export")  # last: only a whole export carries it
            safety.apply_umask(tmp)  # mkdtemp made it 0700, safetensors its files 0600
            swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _architecture(model: nn.Module) -> str:
    """The model's class name. FSDP2 turns a sharded model into a dynamic ``FSDP<Class>``
    subclass (bases: FSDPModule, Class): record the class transformers knows."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls.__name__


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is removed only once the new one is in."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    backup = safety.hidden_name(out_dir, "old", tmp.name.rsplit("-", 1)[-1])  # clean_leftovers restores it
    out_dir.rename(backup)
    try:
        tmp.rename(out_dir)
    except BaseException:
        backup.rename(out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)
