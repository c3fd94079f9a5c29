"""Score finished embedding exports (qat's or another tool's) against the float model, on the dev
split and, for the final report only, on the out-of-domain test split (qat.corpus).

    python scripts/benchmarks/score_exports.py NAME=EXPORT_DIR [NAME=EXPORT_DIR ...] [--test]

Each export is loaded the way users load it (``AutoModel.from_pretrained``: compressed-tensors
decompresses the packed codes); rows are mean-pooled-embedding cosine and nearest-neighbour
agreement with the float model (qat.evaluation.embedding_agreement). Nothing here trains or tunes:
it reads the test split only when ``--test`` is given, after every choice was made on dev.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from qat.corpus import corpus_sentences, ood_test_sentences
    from qat.evaluation import embedding_agreement, sentence_embeddings
    from qat.trainers.recipes import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", help="NAME=EXPORT_DIR pairs")
    p.add_argument("--model", default=None, help="the float model (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--dev", type=int, default=256, help="dev sentences (default 256)")
    p.add_argument("--test", action="store_true", help="also score the out-of-domain test split (1024 sentences)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model_path = a.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    splits = {"dev": corpus_sentences("dev", a.dev)}
    if a.test:
        splits["test"] = ood_test_sentences(1024)
    float_model = AutoModel.from_pretrained(model_path).eval()
    reference = {s: sentence_embeddings(float_model, tok, texts) for s, texts in splits.items()}
    rows = {}
    print("| model | " + " | ".join(f"{s} cos / NN" for s in splits) + " |")
    print("|---|" + "---|" * len(splits))
    for item in a.exports:
        name, _, folder = item.partition("=")
        model = AutoModel.from_pretrained(folder).eval()
        rows[name] = {s: embedding_agreement(reference[s], sentence_embeddings(model, tok, texts))
                      for s, texts in splits.items()}
        cells = " | ".join(f"{rows[name][s]['cosine']:.4f} / {rows[name][s]['nn_agreement']:.3f}" for s in splits)
        print(f"| {name} | {cells} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
