"""Embedding-quality metrics for encoders (sentence embeddings) on real English text."""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F


def pydoc_sentences(split: str = "eval", n: int = 256, seed: int = 0, min_words: int = 6) -> list[str]:
    """Sentences from the standard library's documentation (``pydoc_data.topics``).

    Topics are split deterministically: every 5th topic is held out ("eval"), the rest are
    "train", so evaluation text never appears in calibration or training text.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 5 == 0) == (split == "eval")]
    sentences = []
    for key in chosen:
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+", text):
            if len(s.split()) >= min_words and len(s) < 400:
                sentences.append(s.strip())
    rng = random.Random(seed)
    rng.shuffle(sentences)
    return sentences[:n]


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states (the all-MiniLM-L6-v2 pooling), L2-normalised; [N, hidden]."""
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Mean cosine of paired embeddings and nearest-neighbour agreement (same top-1 neighbour)."""
    cosine = (reference * candidate).sum(-1).mean().item()

    def nearest(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2)
        return sim.argmax(-1)

    nn_agree = (nearest(reference) == nearest(candidate)).float().mean().item()
    return {"cosine": cosine, "nn_agreement": nn_agree}
