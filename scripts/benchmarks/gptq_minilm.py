"""Post-training all-MiniLM-L6-v2: MSE steps vs qat's GPTQ (and act order), then the block-wise
reconstruction stage on top of GPTQ (docs/GPTQ.md).

    python scripts/benchmarks/gptq_minilm.py --bits 4 3 2 --methods mse gptq gptq_act
    python scripts/benchmarks/gptq_minilm.py --bits 4 3 --methods gptq_blockwise --blockwise-steps 100
    python scripts/benchmarks/gptq_minilm.py --write-calibration calib.json   # the sentences, for other tools
    python scripts/benchmarks/gptq_minilm.py --eval-dirs DIR [DIR ...]      # saved models, same eval sentences

Calibration: the first 256 sentences of the pydoc training split (qat.evaluation.pydoc_sentences),
padded in batches of 16. Evaluation: 256 sentences of the held-out pydoc topics (eval split):
mean cosine of the mean-pooled embeddings to the float model's, and nearest-neighbour agreement.
All linear layers of the encoder and pooler are quantized, group 32, symmetric, storage = bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))  # after the installed packages (the repo's kernels/ must not shadow PyPI's)

import qat  # noqa: E402
from qat.cli import calibration_batches  # noqa: E402
from qat.evaluation import embedding_agreement, pydoc_sentences, sentence_embeddings  # noqa: E402


def load(path):
    import transformers

    return transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def blockwise(model, float_model, batches, a) -> dict:
    from qat.adapters import AdapterConfig, attach
    from qat.trainers.blockwise import reconstruct_blocks

    if a.adapter != "none":
        attach(model, AdapterConfig(kind="lora", rank=a.rank, alpha=2.0 * a.rank, placement="inside"))
    return reconstruct_blocks(model, float_model, batches, steps=a.blockwise_steps, lr=a.blockwise_lr,
                              step_lr=a.blockwise_step_lr, target=a.blockwise_target, batches_per_step=a.blockwise_batch)


def main() -> int:
    from qat.trainers.recipes import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=float, nargs="+", default=[4, 3, 2])
    p.add_argument("--methods", nargs="+", default=["mse", "gptq", "gptq_act"],
                   choices=["rtn", "mse", "gptq", "gptq_act", "gptq_blockwise", "gptq_act_blockwise", "mse_blockwise"])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--blockwise-steps", type=int, default=100)
    p.add_argument("--blockwise-lr", type=float, default=1e-3, help="adapters")
    p.add_argument("--blockwise-step-lr", type=float, default=1e-4, help="steps")
    p.add_argument("--blockwise-target", default="float", choices=["float", "quantized"])
    p.add_argument("--blockwise-batch", type=int, default=4, help="calibration batches (of 16) per step")
    p.add_argument("--adapter", default="lora", choices=["lora", "none"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="append the rows to this JSON-lines file")
    p.add_argument("--write-calibration", type=Path, help="write the calibration sentences (JSON list) and stop")
    p.add_argument("--eval-dirs", type=Path, nargs="+", help="evaluate these saved models instead of quantizing")
    a = p.parse_args()

    path = default_model_path()
    if a.write_calibration:
        a.write_calibration.write_text(json.dumps(pydoc_sentences(split="train", n=a.calibration_samples)))
        return 0
    batches = calibration_batches(path, pydoc_sentences(split="train", n=a.calibration_samples), 128)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = pydoc_sentences(split="eval", n=a.eval_samples)
    float_model = load(path)
    reference = sentence_embeddings(float_model, tok, texts)
    for folder in a.eval_dirs or []:
        row = {"model": str(folder), **embedding_agreement(reference, sentence_embeddings(load(folder), tok, texts))}
        print(json.dumps(row), flush=True)
    if a.eval_dirs:
        return 0
    for bits in a.bits:
        bits = qat.primitives.check_bits(bits)
        for method in a.methods:
            init = method.split("_")[0]
            cfg = qat.QuantConfig(bits=bits, group_size=a.group_size, init=init, gptq_act_order=method.startswith("gptq_act"))
            model = load(path)
            model.requires_grad_(False)
            t0 = time.time()
            qat.quantize_model(model, cfg, calibration=batches if init == "gptq" else None)
            row = {"bits": bits, "group": a.group_size, "method": method, "quantize_s": round(time.time() - t0, 1)}
            if method.endswith("blockwise"):
                t0 = time.time()
                row["blockwise"] = blockwise(model, float_model, batches, a)
                row.update(blockwise_s=round(time.time() - t0, 1), steps=a.blockwise_steps, lr=a.blockwise_lr,
                           step_lr=a.blockwise_step_lr, target=a.blockwise_target, adapter=a.adapter)
            row.update(embedding_agreement(reference, sentence_embeddings(model, tok, texts)))
            print(json.dumps(row), flush=True)
            if a.json:
                with a.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
