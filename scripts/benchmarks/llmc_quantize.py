"""Quantize an encoder with the real llm-compressor (GPTQ, RTN, or QuIP input rotations + GPTQ), run by quality.py INSIDE llm-compressor's
own virtual environment (its pins, compressed-tensors 0.19 / transformers 5.17, conflict with qat's).

    <venv>/bin/python scripts/benchmarks/llmc_quantize.py --model DIR --out DIR --method gptq --bits 4 \
        --group_size 32 --calibration sentences.json [--dampening 0.01] [--max_length 128] [--asymmetric]

Weight-only, symmetric int (``--asymmetric``: a zero point per group), per group, on the encoder's linears
(the pooler stays float, as in qat's rows); saved compressed (pack-quantized), which qat's environment
reloads with transformers. ``quip_gptq`` first applies llm-compressor's QuIPModifier with input rotations
only (``rotations=["v"]``, deterministic block Hadamard of ``--transform_block``: the transform qat's
``online_hadamard_targets: all`` uses), saved as its ``transform_config``. Imports nothing from qat.
"""

from __future__ import annotations

import argparse
import json
import sys

ENCODER_LINEARS = r"re:.*encoder\.layer\.\d+\..*"
# The same layers by their own names: a transform's targets match any module, not only linears.
ENCODER_LINEAR_NAMES = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"


def recipe(method: str, bits: int, group_size: int, dampening: float, transform_block: int = 128,
           symmetric: bool = True):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier

    scheme = {"group_0": {"targets": [ENCODER_LINEARS],
                          "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                                      "strategy": "group", "group_size": group_size}}}
    if method == "gptq":
        return GPTQModifier(config_groups=scheme, ignore=["re:.*pooler.*"], dampening_frac=dampening)
    if method == "quip_gptq":
        return [QuIPModifier(rotations=["v"], transform_type="hadamard", transform_block_size=transform_block,
                             targets=[ENCODER_LINEAR_NAMES], ignore=["re:.*pooler.*"]),
                GPTQModifier(config_groups=scheme, ignore=["re:.*pooler.*"], dampening_frac=dampening)]
    return QuantizationModifier(config_groups=scheme, ignore=["re:.*pooler.*"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=("gptq", "rtn", "quip_gptq"), required=True)
    p.add_argument("--transform_block", type=int, default=128, help="quip_gptq: the Hadamard block size")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--calibration", required=True, help="JSON list of calibration sentences")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--asymmetric", action="store_true", help="a zero point per group (default: symmetric)")
    a = p.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModel.from_pretrained(a.model, dtype=torch.float32)
    sentences = json.loads(open(a.calibration).read())
    tokens = tokenizer(sentences, truncation=True, max_length=a.max_length)
    data = Dataset.from_dict({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    layer = type(model.encoder.layer[0]).__name__  # GPTQ runs block by block: BertLayer for MiniLM
    oneshot(model=model, dataset=data, recipe=recipe(a.method, a.bits, a.group_size, a.dampening, a.transform_block,
                                                        symmetric=not a.asymmetric),
            num_calibration_samples=len(sentences), max_seq_length=a.max_length,
            sequential_targets=[layer] if a.method != "rtn" else None)
    model.save_pretrained(a.out, save_compressed=True)
    tokenizer.save_pretrained(a.out)
    print(f"llmc_quantize: {a.method} W{a.bits} g{a.group_size} {'asym' if a.asymmetric else 'sym'} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
