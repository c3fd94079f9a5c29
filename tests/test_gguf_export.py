"""GGUF export: the Q4_0 / Q8_0 blocks hold exactly the codes and steps qat trained.

References: transformers' GGUF loader (dequantizes the file back to dense weights), the gguf
package's own reader and dequantizer, and the block layout decoded here by hand from the format
(fp16 d, then q4_0 nibbles j | j+16 << 4, or 32 int8). The tokenizer is a byte-level BPE trained
in the test on generated sentences (no download, no OS text).
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
import transformers

import qat
from qat.adapters import AdapterConfig, attach
from qat.gguf_export import GGUF_FILE, export_gguf, rotary_permute, train_for_gguf

VOCAB = 300  # tokenizer size; the models' embeddings have 320 rows (padded vocabulary, as real models do)


def bpe_tokenizer(folder):
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on generated sentences, saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["quant", "ization", "model", "weight", "step", "block", "llama", "serve", "train", "the", "a", "of",
             "and", "runtime", "exact", "blocks", "codes", "scales"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, head_dim=16)).eval()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True)).eval()
    if kind in ("gemma2", "gemma3"):
        # head_dim and query_pre_attn_scalar stay 256 (the class defaults transformers' reader assumes, and
        # llama.cpp scales queries by 1/sqrt(head_dim)); norm weights off their zero init so the
        # stored 1 + w is exercised (Gemma's RMSNorm multiplies by 1 + w).
        cls, config = ((transformers.Gemma2ForCausalLM, transformers.Gemma2Config) if kind == "gemma2" else
                       (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig))
        model = cls(config(**common, head_dim=256, query_pre_attn_scalar=256)).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(-0.4, 0.4)
        return model
    # Qwen3: transformers' GGUF reader does not take head_dim from the file (class default 128).
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=128)).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    bpe_tokenizer(folder)
    return folder


def qat_trained(kind: str, bits: int, folder, steps: int = 4):
    """A tiny model quantized at W<bits> g32 with fp16 steps, an inside LoRA, a few Adam steps on
    next-token loss (so codes and steps move off their initial values)."""
    model = tiny(kind)
    model.save_pretrained(folder)  # the export's source folder (tokenizer saved there too)
    model.requires_grad_(False)
    qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=32))
    train_for_gguf(model)
    attach(model, AdapterConfig(rank=4, init="zero"))
    for _, layer in qat.quant_layers(model):  # non-zero B: D changes the codes from the first step
        torch.nn.init.normal_(layer.adapter.lora_B, std=0.02)
    scales, lora = ([p for n, p in model.named_parameters() if p.requires_grad and ("weight_scale" in n) == want]
                    for want in (True, False))
    # Steps ~1e-2: an Adam lr of 1e-4 moves them by ~1% a step, enough to change fp16 values and codes.
    opt = torch.optim.Adam([{"params": scales, "lr": 1e-4}, {"params": lora, "lr": 1e-2}])
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _w_hat(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: layer.fake_quant_weight().detach().clone() for name, layer in qat.quant_layers(model)}


@pytest.mark.parametrize("kind,bits", [("llama", 4), ("llama", 8), ("mistral", 4), ("qwen2", 4), ("qwen3", 4),
                                       ("gemma2", 4), ("gemma3", 8)])
def test_transformers_reload_equals_trained_weights(tmp_path, tokenizer_dir, kind, bits):
    src = tmp_path / "src"
    model = qat_trained(kind, bits, src)
    bpe_tokenizer(src)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
    w_hat = _w_hat(model)
    export_gguf(model, tmp_path / "gguf", source_dir=src)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=GGUF_FILE,
                                                                 dtype=torch.float32).eval()
    # Mistral is a Llama in GGUF (llama.cpp's converter writes it so); transformers rebuilds a Llama.
    assert type(reloaded).__name__ == type(model).__name__.replace("Mistral", "Llama")
    state = reloaded.state_dict()
    for name, weight in w_hat.items():
        # Same codes, same fp16 steps, dequantized in fp32 by both (d * q is exact in fp32): equal.
        assert torch.equal(state[name + ".weight"], weight), name
    for key, tensor in model.state_dict().items():  # float tensors written as F32: equal too
        if key in state and not any(key.startswith(n + ".") for n in w_hat):
            if kind.startswith("gemma") and key.endswith("norm.weight"):
                # GGUF holds 1 + w and the reader subtracts 1: what the norm multiplies by is equal
                assert torch.equal(1.0 + state[key], 1.0 + tensor), key
            else:
                assert torch.equal(state[key], tensor), key
    with torch.no_grad():
        got = reloaded(ids).logits
    # Identical weights and the same fp32 ops (x @ W^T; the bias added apart, as QuantLinear does):
    # observed 0.0; allow 1e-5 for BLAS summation order.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_tokenizer_round_trip(tmp_path, tokenizer_dir):
    src = tmp_path / "src"
    model = qat_trained("llama", 4, src, steps=1)
    source_tok = bpe_tokenizer(src)
    export_gguf(model, tmp_path / "gguf", source_dir=src)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=GGUF_FILE)
    for text in ["the llama serves exact quantization of a model.", "codes, scales and blocks  of 32!"]:
        assert tok(text, add_special_tokens=False).input_ids == source_tok(text, add_special_tokens=False).input_ids
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary row permutation (written independently of rotary_permute)."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _decode_by_hand(raw: np.ndarray, bits: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """(codes [out, in] signed, d [out, G] fp16) from raw block bytes, per the GGUF spec."""
    out_features, in_features = shape
    blocks = raw.reshape(out_features, in_features // 32, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if bits == 4:
        nib = blocks[..., 2:]
        codes = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.int16) - 8
    else:
        codes = blocks[..., 2:].copy().view(np.int8).astype(np.int16)
    return codes.reshape(out_features, in_features), d


@pytest.mark.parametrize("bits", [4, 8])
def test_gguf_reader_blocks_hold_the_trained_codes(tmp_path, tokenizer_dir, bits):
    import gguf

    src = tmp_path / "src"
    model = qat_trained("llama", bits, src)
    bpe_tokenizer(src)
    export_gguf(model, tmp_path / "gguf", source_dir=src)
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    for name, layer in qat.quant_layers(model):
        codes, scale, _ = layer.export_codes()
        i, rest = name.split(".")[2], name.split(".")[-1]
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[rest]
        t = tensors[f"blk.{i}.{gguf_name}.weight"]
        assert t.tensor_type == (gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0)
        shape = (layer.out_features, layer.in_features)
        got_codes, got_d = _decode_by_hand(np.asarray(t.data), bits, shape)
        dense = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(rest)
        if heads:
            got_codes, got_d, dense = (_unpermute(a, heads) for a in (got_codes, got_d, dense))
        assert np.array_equal(got_codes, codes.numpy().astype(np.int16)), name
        assert np.array_equal(got_d.astype(np.float32), scale.numpy()), name
        # gguf's own dequantizer: d (fp16 -> fp32) * q, equal to the layer's W_hat.
        assert np.array_equal(dense, layer.fake_quant_weight().detach().numpy()), name


def test_rotary_permute_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = torch.arange(64 * 3).reshape(64, 3)
    permuted = rotary_permute(rows, 4).numpy()
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, 4, 4)
    assert np.array_equal(back, rows.numpy())
    assert not np.array_equal(permuted, rows.numpy())


def _quantized(kind="llama", **cfg):
    model = tiny(kind)
    model.requires_grad_(False)
    qat.quantize_model(model, qat.QuantConfig(**cfg))
    train_for_gguf(model)
    return model


@pytest.mark.parametrize("cfg,words", [
    (dict(bits=4, group_size=64), "set group_size 32"),
    (dict(bits=4, group_size=None), "set group_size 32"),
    (dict(bits=4, symmetric=False), "set symmetric true"),
    (dict(bits=3), "use bits 4 (Q4_0)"),
    (dict(bits=1.58), "use bits 4 (Q4_0)"),
    (dict(bits=6), "use bits 8 (Q8_0)"),
])
def test_unrepresentable_grids_are_refused(tmp_path, tokenizer_dir, cfg, words):
    model = _quantized(**cfg)
    with pytest.raises(ValueError, match=re.escape(words)):
        export_gguf(model, tmp_path / "out", source_dir=tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_non_fp16_steps_are_refused(tmp_path, tokenizer_dir):
    model = tiny("llama")
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32))  # fp32 MSE steps, no fp16 rounding
    with pytest.raises(ValueError, match="not fp16 values.*export_format: gguf"):
        export_gguf(model, tmp_path / "out", source_dir=tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_fp16_steps_change_the_forward_by_the_rounding_only():
    """train_for_gguf rounds the steps the forward uses to fp16 and leaves the fp32 master alone."""
    model = _quantized(bits=4, group_size=32)
    for _, layer in qat.quant_layers(model):
        scale, _ = layer.fake_quant_steps()
        assert torch.equal(scale, layer.weight_scale.detach().half().float())
        assert scale.requires_grad  # gradient flows straight through to the fp32 master


def test_other_architectures_and_busy_folders_are_refused(tmp_path, tokenizer_dir, minilm_path):
    bert = transformers.AutoModel.from_pretrained(minilm_path).eval()
    qat.quantize_model(bert, qat.QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="not an architecture qat writes to GGUF"):
        export_gguf(bert, tmp_path / "bert", source_dir=minilm_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_gguf(_quantized(bits=4, group_size=32), busy, source_dir=tokenizer_dir)
    assert (busy / "keep.txt").read_text() == "mine"


def test_cli_reexports_a_compressed_tensors_checkpoint_as_gguf(tmp_path, tokenizer_dir):
    """`qat export CKPT --format gguf`: a compressed-tensors export trained with fp16 steps becomes
    a GGUF with the same weights; one trained without them is refused in one sentence."""
    from qat.cli import main as cli

    src = tmp_path / "src"
    model = qat_trained("llama", 4, src)
    bpe_tokenizer(src)
    w_hat = _w_hat(model)
    qat.export_model(model, tmp_path / "ct", source_dir=src)
    assert cli(["export", str(tmp_path / "ct"), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=GGUF_FILE,
                                                                 dtype=torch.float32)
    state = reloaded.state_dict()
    for name, weight in w_hat.items():
        assert torch.equal(state[name + ".weight"], weight), name  # fp32 steps on disk, fp16 values: exact
    plain = tiny("llama")
    qat.quantize_model(plain, qat.QuantConfig(bits=4, group_size=32))
    qat.export_model(plain, tmp_path / "ct32", source_dir=src)
    with pytest.raises(SystemExit, match="steps are not fp16 values") as err:
        cli(["export", str(tmp_path / "ct32"), "--format", "gguf", "--out", str(tmp_path / "gguf32")])
    assert "\n" not in str(err.value) and not (tmp_path / "gguf32").exists()


def spm_tokenizer(folder, add_bos: bool = True):
    """A SentencePiece-style BPE (byte fallback, "▁" for spaces), as Llama 2 / Mistral ship."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    words = ["quant", "ization", "model", "weight", "step", "block", "llama", "serve", "the", "of", "and"]
    rng = random.Random(1)
    texts = [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials))
    fast = transformers.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", add_bos_token=add_bos)
    fast.save_pretrained(folder)
    return fast


@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_style_tokenizer_round_trip(tmp_path, add_bos):
    src = tmp_path / "src"
    source_tok = spm_tokenizer(src, add_bos)
    model = tiny("llama")
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32))
    train_for_gguf(model)
    export_gguf(model, tmp_path / "gguf", source_dir=src)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=GGUF_FILE)
    for text in ["the llama serves the model.", "quantization of a weight step, \u00e9t\u00e9"]:  # byte fallback too
        expected = source_tok(text).input_ids
        # BOS as the source adds it: the GGUF states it (transformers' reader would add it by default)
        assert (expected[0] == source_tok.bos_token_id) == add_bos
        assert tok(text).input_ids == expected


def test_config_transformers_would_misread_is_refused(tmp_path, tokenizer_dir):
    """transformers' GGUF reader takes Qwen3's head_dim from the class default (128), not the file."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32))
    train_for_gguf(model)
    with pytest.raises(ValueError, match="rebuilds head_dim 128 where the model has 16"):
        export_gguf(model, tmp_path / "out", source_dir=tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_f16_float_tensors_halve_the_embeddings_and_keep_the_blocks(tmp_path, tokenizer_dir):
    import gguf

    model = _quantized(bits=4, group_size=32)
    w_hat = _w_hat(model)
    export_gguf(model, tmp_path / "f16", source_dir=tokenizer_dir, float_type="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "f16" / GGUF_FILE)).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay F32 for llama.cpp
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f16", gguf_file=GGUF_FILE,
                                                                 dtype=torch.float32)
    state = reloaded.state_dict()
    emb = model.model.embed_tokens.weight
    assert torch.equal(state["model.embed_tokens.weight"], emb.half().float())  # rounded, as asked
    assert not torch.equal(emb.half().float(), emb)
    for name, weight in w_hat.items():
        assert torch.equal(state[name + ".weight"], weight), name  # the quantized blocks are unchanged
    with pytest.raises(ValueError, match="float_type='bf16': use one of"):
        export_gguf(model, tmp_path / "bf16", source_dir=tokenizer_dir, float_type="bf16")


@pytest.mark.parametrize("change,words", [
    (dict(attn_logit_softcapping=20.0), "keeps attn_logit_softcapping=50.0 \\(its default\\) where the model has 20.0"),
    (dict(query_pre_attn_scalar=144), "query_pre_attn_scalar 144 differs from head_dim 256"),
])
def test_gemma_settings_a_reader_would_not_reproduce_are_refused(tmp_path, tokenizer_dir, change, words):
    """transformers' GGUF reader keeps Gemma 2's soft-caps at the class defaults; llama.cpp scales
    queries by 1/sqrt(head_dim): a model either would compute differently is refused, no file left."""
    cfg = transformers.Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=256, **change)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32))
    train_for_gguf(model)
    with pytest.raises(ValueError, match=words):
        export_gguf(model, tmp_path / "out", source_dir=tokenizer_dir)
    assert not (tmp_path / "out").exists()
