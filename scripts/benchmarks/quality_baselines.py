"""The other tools' rows of scripts/benchmarks/quality.py, each built the way that tool's users build it:

    llmc_model      llm-compressor GPTQ / RTN / QuIP + GPTQ (the real package, in its own virtual environment: its pins,
                    compressed-tensors 0.19 / transformers 5.17, conflict with qat's), calibrated on the
                    train split, saved compressed, reloaded here with transformers
    qlora_model     peft + bitsandbytes QLoRA: LoRA over an NF4 base, merged back into NF4 by bitsandbytes,
                    saved, reloaded with transformers (4-bit only)
    torchao_model   torchao QAT: IntxFakeQuantizeConfig (int-b, group 32) under a peft LoRA, merged, converted
                    with its IntxWeightOnlyConfig; scored in memory (torchao has no packed export transformers
                    reloads here)

Each returns (model to score, where it was measured). ``bench`` is quality.Bench (tokenizer, train data,
trainer, the float model). A sibling of quality.py, imported as bench_common is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from bench_common import load_export

LLMC_VERSION = "0.14.0.1"
DEFAULT_LLMC_VENV = os.environ.get("QAT_LLMC_VENV", str(Path.home() / ".cache" / "qat" / "llmcompressor-venv"))
LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"  # peft: the layers qat quantizes
HERE = Path(__file__).resolve().parent


class NotRun(Exception):
    """A row this machine or tool cannot produce; the message is the reason the table prints."""


# ---------------------------------------------------------------------------------------- llm-compressor
def llmc_python(venv: str) -> Path:
    return Path(venv) / "bin" / "python"


def build_llmc_venv(venv: str) -> Path:
    """llm-compressor's own virtual environment at ``venv`` (built once: torch's CPU wheel first, so pip
    never pulls a CUDA build, then llmcompressor, which brings its own transformers / compressed-tensors)."""
    python = llmc_python(venv)
    probe = [str(python), "-c", "import llmcompressor"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"[quality] building llm-compressor's virtual environment at {venv} (once; minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + [f"llmcompressor=={LLMC_VERSION}"], check=True)
    return python


def llmc_model(bench, bits: int, method: str, config: dict, out: Path):
    """Run llm-compressor in its venv on the float model (calibration: the train split), reload here."""
    if not float(bits).is_integer():
        raise NotRun("llm-compressor has no ternary scheme (its int schemes are 2-8 bit)")
    python = llmc_python(bench.a.llmc_venv)
    if not python.exists():
        if not bench.a.build_llmc:
            raise NotRun(f"llm-compressor venv not built at {bench.a.llmc_venv} (drop --no_build_llmc)")
        build_llmc_venv(bench.a.llmc_venv)
    calibration = out.with_suffix(".calibration.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration.write_text(json.dumps(bench.calibration))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(python), str(HERE / "llmc_quantize.py"), "--model", bench.path, "--out", str(out),
           "--method", method, "--bits", str(bits), "--group_size", "32",
           "--dampening", str(config.get("dampening", 0.01)), "--calibration", str(calibration),
           "--max_length", str(bench.args.max_length), "--transform_block", str(config.get("transform_block", 128))]
    symmetric = config.get("symmetric", True)
    if not symmetric:
        cmd.append("--asymmetric")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    # quip_gptq's online rotations (transform_config) are applied on load; an asymmetric export is
    # decompressed layer by layer (qat's exports say `dequantize: true` for the same reason)
    return lambda: load_export(out, decompress=not symmetric), out


# ---------------------------------------------------------------------------------------- peft tools
def lora_config(args):
    """peft LoRA for the other tools' rows: the recipe's rank and alpha, on the layers qat quantizes."""
    from peft import LoraConfig

    return LoraConfig(r=args.adapter_rank, lora_alpha=args.adapter_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS)


def qlora_model(bench, bits: int, config: dict, out: Path):
    """LoRA over an NF4 base (as QLoRA users load it), trained, merged by bitsandbytes (dequantize, add,
    re-quantize to NF4), saved and reloaded with transformers: a pure 4-bit model."""
    if bits != 4:
        raise NotRun("NF4 is 4-bit only")
    try:
        from peft import get_peft_model
        from transformers import AutoModel, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["pooler"])
        base = AutoModel.from_pretrained(bench.path, quantization_config=q, device_map="cpu", dtype=torch.float32)
    except Exception as err:  # no bitsandbytes build for this machine: the row says so
        raise NotRun(f"bitsandbytes 4-bit does not load here ({type(err).__name__}: {str(err)[:120]})") from None
    model = get_peft_model(base, lora_config(bench.args))
    bench.train(model, bits, config)
    merged = model.merge_and_unload()
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out)
    return lambda: AutoModel.from_pretrained(str(out), device_map="cpu", dtype=torch.float32).eval(), out


def torchao_model(bench, bits: int, config: dict, out: Path):
    """torchao's QAT flow: prepare (fake-quantized linears), peft LoRA on top, train, merge, convert."""
    from peft import get_peft_model
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if not float(bits).is_integer():
        raise NotRun("torchao's IntxFakeQuantizeConfig has no ternary dtype")
    dtype = getattr(torch, f"int{bits}")
    is_encoder_linear = lambda m, fqn: isinstance(m, torch.nn.Linear) and ".encoder.layer." in f".{fqn}."  # noqa: E731
    model = bench.fresh_float()
    fake = IntxFakeQuantizeConfig(dtype, group_size=32, is_symmetric=True)
    quantize_(model, QATConfig(weight_config=fake, step="prepare"), filter_fn=is_encoder_linear)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(bench.args))
    bench.train(peft_model, bits, config)
    merged = peft_model.merge_and_unload()
    base = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(32))
    quantize_(merged, QATConfig(base, step="convert"), filter_fn=is_encoder_linear)
    return lambda: merged.eval(), None
