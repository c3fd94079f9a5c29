"""How much of the out-of-domain nearest-neighbour (NN) disagreement is near-ties of the float model.

quality.py's NN agreement asks whether each test sentence keeps the float model's top-1 neighbour.
Where the float model's top-1 and top-2 neighbours are almost equally similar (a small margin), any
perturbation of the embeddings can swap them. This prints the float model's margin distribution on
the quality benchmark's out-of-domain split and, for each export given, how many of its disagreements
sit on small margins and how many picked the float model's second neighbour.

    python scripts/benchmarks/nn_margins.py EXPORT_DIR [EXPORT_DIR ...]

An export is loaded the way quality.py scores it: transformers (decompressing with
``run_compressed=False``, which every qat and llm-compressor export loads with), then its online
transforms, if any, applied (qat.online_hadamard.apply_export_transforms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_common import load_export  # noqa: E402  (a sibling, as in every script of this folder)

MARGINS = (1e-3, 3e-3, 1e-2)


def top2(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [n, 2], indices [n, 2]) of each row's two nearest other rows (unit rows)."""
    sim = embeddings @ embeddings.t()
    sim.fill_diagonal_(-2)
    return sim.topk(2, dim=1)


def neighbours_and_margin(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [n, 2] of each row's two nearest other rows, top-1 minus top-2 similarity [n])."""
    sim, idx = top2(embeddings)
    return idx, sim[:, 0] - sim[:, 1]


def margin_report(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Disagreements of candidate's top-1 neighbour with reference's, split by reference's top-1/top-2 margin."""
    from qat.evaluation import embedding_agreement

    idx, margin = neighbours_and_margin(reference)
    _, cand_idx = top2(candidate)
    wrong = cand_idx[:, 0] != idx[:, 0]
    return {**embedding_agreement(reference, candidate),  # the scores quality.py reports
            "disagreements": int(wrong.sum()),
            **{f"disagreements_margin_below_{m:g}": int((wrong & (margin < m)).sum()) for m in MARGINS},
            "picked_float_second": int((wrong & (cand_idx[:, 0] == idx[:, 1])).sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exports", nargs="*", help="export folders to compare with the float model")
    parser.add_argument("--test_sentences", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    from qat.corpus import ood_test_sentences
    from qat.evaluation import sentence_embeddings
    from qat.trainers.recipes import DEFAULT_RECIPE, default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ood_test_sentences(a.test_sentences, seed=a.seed)

    def embed(model):
        e = sentence_embeddings(model.eval(), tokenizer, texts, max_length=DEFAULT_RECIPE["max_length"])
        return F.normalize(e.float(), dim=-1)

    reference = embed(AutoModel.from_pretrained(path, dtype=torch.float32))
    _, margin = neighbours_and_margin(reference)
    report = {"sentences": len(texts),
              "float": {f"share_margin_below_{m:g}": (margin < m).float().mean().item() for m in MARGINS}}
    for export in a.exports:
        report[export] = margin_report(reference, embed(load_export(export)))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
