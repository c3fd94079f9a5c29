"""scripts/benchmarks/act_rotation.py's W4A4 breakdown on a tiny random Llama: holding a kind of linear's
inputs at 8 bits really changes those layers' activation width, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers


@pytest.fixture(scope="module")
def script(load_bench_script):
    with load_bench_script("act_rotation") as module:
        yield module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random Llama folder and 4 blocks of 16 random tokens (labels = inputs)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      initializer_range=0.3)  # large weights: peaked logits, so A4 costs
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    ids = torch.randint(0, 96, (4, 16))
    blocks = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    return folder, blocks, collate


def direct(folder: Path, act_bits: int, rotate: bool, blocks, collate, script) -> float:
    """The same W4 g32 RTN model built with one activation width for every layer."""
    import qat
    from qat.rotation import rotate_model
    from qat.trainers.run import load_model

    model = load_model(str(folder), "causal_lm").eval()
    if rotate:
        rotate_model(model)
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init="rtn", act_bits=act_bits))
    return script.perplexity(model, blocks, collate)


@pytest.mark.parametrize("rotate", [False, True])
def test_a8_kinds_set_exactly_those_layers_to_8_bits(script, tiny, rotate):
    folder, blocks, collate = tiny
    # Same layers, same ops, same order: the two builds compute the same thing (1e-9 allows summation order).
    every_kind_a8 = script.w4a4_rtn_perplexity(folder, rotate, script.LINEAR_KINDS, blocks, collate)
    assert every_kind_a8 == pytest.approx(direct(folder, 8, rotate, blocks, collate, script), rel=1e-9)
    none_a8 = script.w4a4_rtn_perplexity(folder, rotate, (), blocks, collate)
    assert none_a8 == pytest.approx(direct(folder, 4, rotate, blocks, collate, script), rel=1e-9)
    # and 4-bit activations do cost something on this model, so the two checks above can tell them apart
    assert abs(none_a8 - every_kind_a8) > 1e-3 * every_kind_a8
    rows = script.a4_breakdown_rows(folder, rotate, blocks, collate)
    assert rows["all at A4"] == pytest.approx(none_a8, rel=1e-9)
    assert set(rows) == {"all at A4", "o_proj at A8", "only o_proj at A4", "down_proj at A8", "only down_proj at A4"}
