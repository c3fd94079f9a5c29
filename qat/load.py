"""Read a compressed-tensors pack-quantized checkpoint back into trainable QuantLinear layers.

Works for qat's own exports and for checkpoints written by other tools (llm-compressor), as long
as the weights are integer ``pack-quantized`` with group or channel steps. The codes become the
frozen base (storage_bits = the checkpoint's width) and the steps start at the saved scales, so
the loaded model computes what the checkpoint computes and QAT can start from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from qat.act_quant import act_quantizer_from_args
from qat.config import LayerSpec, QuantConfig
from qat.export import QAT_CONFIG_FILE
from qat.online_hadamard import attach_from_config
from qat.packing import packed_width, unpack_int32
from qat.quant_linear import QuantLinear
from qat.surgery import set_submodule

INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} has no {path.name}: it is not a saved model folder ({what})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the checkpoint is corrupt; re-export it") from None


# int-quantized: qat's W8A8 layers (qat.export.weight_format); mixed-precision: a model with both
READABLE_FORMATS = ("pack-quantized", "int-quantized", "mixed-precision")


def _quant_config(folder: Path) -> dict:
    config = _read_json(folder / "config.json", "config.json missing")
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        method = (qc or {}).get("quant_method", "none")
        raise ValueError(
            f"{folder} is not a compressed-tensors checkpoint (quantization method: {method}); "
            "for a float model use AutoModel.from_pretrained and qat.quantize_model instead"
        )
    if qc.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{folder} uses compressed-tensors format {qc.get('format')!r}; qat reads 'pack-quantized' and "
            "'int-quantized' integer weights only: re-export it in one of those formats"
        )
    return qc


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.exists():
        names = sorted(set(_read_json(index, "index")["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = [folder / "model.safetensors"]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is missing weight file(s) {missing}: the checkpoint is truncated; copy or re-export it whole"
        )
    return files


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{f} could not be read ({err}): the file is corrupt or truncated; re-export it") from None
    return tensors


def _group_for(name: str, qc: dict) -> dict:
    """The config group that applies to module ``name``."""
    for group in qc["config_groups"].values():
        for target in group.get("targets", []):
            if target == "Linear" or name == target or (
                target.startswith("re:") and re.match(target[3:], name)
            ):
                return group
    raise ValueError(f"{name} has packed weights but no config group targets it: the config.json is inconsistent")


def _weight_args_for(name: str, qc: dict) -> dict:
    """The config group's weight arguments that apply to module ``name``."""
    return _group_for(name, qc)["weights"]


@torch.no_grad()
def _attach_act_quant(layer: QuantLinear, name: str, args: dict | None, t: dict) -> None:
    """The checkpoint's ``input_activations`` as the layer's ActQuantizer, with its saved static step."""
    try:
        layer.act_quant = act_quantizer_from_args(args)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if layer.act_quant is not None and not layer.act_quant.dynamic:
        if f"{name}.input_scale" not in t:
            raise ValueError(f"{name} has static input_activations but no {name}.input_scale: the checkpoint is truncated")
        layer.act_quant.scale.copy_(t[f"{name}.input_scale"].float().reshape(1))
        layer.act_quant.initialized.fill_(True)


def _int8_codes(name, t, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An int-quantized layer's codes [out, in] and (asymmetric) zero points, as stored."""
    weight = t[f"{name}.weight"]
    if weight.dtype != torch.int8 or int(args["num_bits"]) != 8:
        raise ValueError(f"{name}.weight is {weight.dtype} for {args['num_bits']}-bit int-quantized codes "
                         "(int8 expected): the checkpoint is corrupt")
    zero = None if args.get("symmetric", True) else t[f"{name}.weight_zero_point"].float()
    return weight.to(torch.int32), zero


def _layer_from_tensors(name, t, args, recorded, dtype) -> QuantLinear:
    bits = int(args["num_bits"])
    if f"{name}.weight_packed" not in t:
        codes, zero = _int8_codes(name, t, args)
        return _build_layer(name, t, args, recorded, dtype, codes, zero)
    out_features, in_features = (int(v) for v in t[f"{name}.weight_shape"].tolist())
    packed = t[f"{name}.weight_packed"]
    if tuple(packed.shape) != (out_features, packed_width(in_features, bits)):
        raise ValueError(
            f"{name}.weight_packed has shape {tuple(packed.shape)}, expected "
            f"{(out_features, packed_width(in_features, bits))} for {bits}-bit codes: the checkpoint is corrupt"
        )
    codes = unpack_int32(packed, bits, in_features)
    zero = None
    if not args.get("symmetric", True):
        zero = unpack_int32(t[f"{name}.weight_zero_point"], bits, out_features, dim=0).float()
    return _build_layer(name, t, args, recorded, dtype, codes, zero)


def _build_layer(name, t, args, recorded, dtype, codes, zero) -> QuantLinear:
    bits = int(args["num_bits"])
    scale = t[f"{name}.weight_scale"]
    train_bits = recorded.get("bits", bits)  # qat records ternary (1.58) exported as int2
    group = args.get("group_size") if args.get("strategy") == "group" else None
    spec = LayerSpec(bits=train_bits, group_size=group, symmetric=args.get("symmetric", True),
                     storage_bits=bits, init="rtn")
    return QuantLinear.from_codes(codes, scale, zero, spec, bias=t.get(f"{name}.bias"),
                                  dtype=dtype or scale.dtype, name=name)


def _quantized_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules with packed codes (``weight_packed``) or int8 codes (int-quantized ``weight`` + ``weight_scale``)."""
    packed = {k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")}
    int8 = {k[: -len(".weight")] for k, v in tensors.items()
            if k.endswith(".weight") and v.dtype == torch.int8 and k[: -len("weight")] + "weight_scale" in tensors}
    return sorted(packed | int8)


def load_quantized(path: str | Path, model_class=None, dtype: torch.dtype | None = None):
    """Load a pack-quantized checkpoint as a transformers model whose quantized layers are
    trainable QuantLinear modules (codes frozen, steps trainable).

    ``model_class`` defaults to the class named in config.json's ``architectures``.
    The dense skeleton is built once on CPU before the quantized layers replace its linears.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder: pass an export folder")
    qc = _quant_config(folder)
    tensors = _read_tensors(_weight_files(folder))
    qat_meta = json.loads((folder / QAT_CONFIG_FILE).read_text()) if (folder / QAT_CONFIG_FILE).exists() else {}
    recorded_layers = qat_meta.get("layers", {})
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    del config.quantization_config
    if model_class is None:  # only a transformers model class, whatever an untrusted config.json names
        from qat.safety import transformers_model_class

        model_class = transformers_model_class(config, folder)
    build = model_class.from_config if hasattr(model_class, "from_config") else model_class
    model = build(config)
    if dtype is not None:
        model.to(dtype)
    names = _quantized_names(tensors)
    if not names:
        raise ValueError(f"{folder} holds no weight_packed or int8 weight tensors: the checkpoint is truncated "
                         "or not quantized")
    for name in names:
        args = _weight_args_for(name, qc)
        layer = _layer_from_tensors(name, tensors, args, recorded_layers.get(name, {}), dtype)
        _attach_act_quant(layer, name, _group_for(name, qc).get("input_activations"), tensors)
        set_submodule(model, name, layer)
    attach_from_config(model, qc.get("transform_config"))  # online input rotations (qat.online_hadamard)
    quant_keys = tuple(f"{n}." for n in names)
    rest = {k: v for k, v in tensors.items() if not k.startswith(quant_keys)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith(quant_keys)]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not match {model_class.__name__}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}; "
            "the checkpoint is truncated or from another architecture (pass model_class=...)"
        )
    if qat_meta.get("quant_config"):
        model.qat_config = QuantConfig(**qat_meta["quant_config"])
    model.name_or_path = str(folder)
    return model.eval()
