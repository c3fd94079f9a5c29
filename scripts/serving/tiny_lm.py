"""The tiny causal LM both serving checks use: a byte-level BPE trained on generated sentences of a
small grammar ("the X of Y and Z ."), and a Llama pre-trained on them in float, then QAT-trained.
No download and no OS text: everything is generated here."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ["quant", "ization", "model", "weight", "step", "block", "llama", "serve", "train", "the", "a", "of",
         "and", "runtime", "exact", "blocks", "codes", "scales", "serves"]
PROMPTS = ["the llama of", "the blocks of runtime and", "the exact", "the weight of the"]


def sentences(n: int = 2000) -> list[str]:
    rng = random.Random(0)
    return [" ".join(["the", rng.choice(WORDS), "of", rng.choice(WORDS), "and", rng.choice(WORDS), "."])
            for _ in range(n)]


def tokenizer(texts: list[str]):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def train(model, opt, data, steps: int) -> float:
    import torch

    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=torch.Generator().manual_seed(len(data) + _))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


# arch -> (model class, config class, settings beyond the shared ones); Gemma keeps head_dim and
# query_pre_attn_scalar at 256, the values GGUF readers assume (see qat.gguf_export)
_GEMMA = dict(head_dim=256, query_pre_attn_scalar=256)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "LlamaConfig", {}),
                 "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", _GEMMA),
                 "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", _GEMMA)}
ARCHS = tuple(ARCHITECTURES)


def float_model(folder: Path, steps: int, hidden: int = 128, heads: int = 4, arch: str = "llama"):
    """(model, tokenizer, data [n, length]) after ``steps`` float Adam steps; saved in ``folder``.
    ``arch``: one of ARCHITECTURES, the same size whichever."""
    import torch
    import transformers

    texts = sentences()
    tok = tokenizer(texts)
    torch.manual_seed(0)
    common = dict(vocab_size=416, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=128,
                  bos_token_id=0, eos_token_id=1)
    model_cls, config_cls, extra = ARCHITECTURES[arch]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common, **extra))
    ids = [tok(t).input_ids for t in texts]
    length = min(len(x) for x in ids)
    data = torch.tensor([x[:length] for x in ids])
    loss = train(model, torch.optim.Adam(model.parameters(), lr=3e-3), data, steps)
    print(f"float loss after {steps} steps: {loss:.4f}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, data


def qat_train(model, data, steps: int, bits: int = 4, serving: str = "llama.cpp", group_size: int | None = 32,
              act_bits: int | None = None):
    """Quantize to W<bits> g32 with the target's step dtype, inside LoRA; steps (lr 1e-5 at 4 bits,
    1e-6 at 8) and LoRA (lr 1e-3) train with QAT on next-token loss, as qat's recipes split them."""
    import torch

    import qat
    from qat.adapters import AdapterConfig, attach
    from qat.serving import train_for_target

    model.requires_grad_(False)
    qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=group_size, act_bits=act_bits))
    train_for_target(model, serving, "gguf" if serving == "llama.cpp" else "compressed-tensors")
    attach(model, AdapterConfig(rank=8, init="zero"))
    scales, lora = ([p for n, p in model.named_parameters() if p.requires_grad and ("weight_scale" in n) == want]
                    for want in (True, False))
    # Adam moves each step by ~lr per update: int8 steps (~4e-4 here) need a 10x smaller lr than int4 ones
    # (~5e-3), or a few hundred updates drive them through zero.
    step_lr = 1e-5 if bits <= 4 else 1e-6
    opt = torch.optim.Adam([{"params": scales, "lr": step_lr}, {"params": lora, "lr": 1e-3}])
    print(f"QAT loss after {steps} steps: {train(model, opt, data, steps):.4f}")
    return model
