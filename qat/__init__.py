"""qat: quantization-aware fine-tuning for Hugging Face models."""

from qat.config import LayerSpec, QuantConfig
from qat.quant_linear import QuantLinear
from qat.surgery import format_report, quant_layers, quantization_report, quantize_model

__version__ = "0.1.0"

__all__ = [
    "LayerSpec",
    "QuantConfig",
    "QuantLinear",
    "format_report",
    "quant_layers",
    "quantization_report",
    "quantize_model",
    "export_model",
    "load_quantized",
    "get_qat_model",
    "QATArguments",
    "QATTrainer",
    "QATSFTConfig",
    "QATSFTTrainer",
]

# The three-line switch (qat.api) and the trainers, imported on first use (they pull in transformers / trl).
_LAZY = {"get_qat_model": "qat.api", "QATArguments": "qat.trainers", "QATTrainer": "qat.trainers",
         "QATSFTConfig": "qat.trainers.trl", "QATSFTTrainer": "qat.trainers.trl"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    # export pulls in transformers/safetensors; import it on first use only.
    if name == "export_model":
        from qat.export import export_model

        return export_model
    if name == "load_quantized":
        from qat.load import load_quantized

        return load_quantized
    raise AttributeError(name)
