"""Local models and data for trainer tests: a tiny Llama with a real (small) BPE tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pydoc_text(n_topics: int = 40) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:n_topics]]


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_text(), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_dir(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Llama (2 layers, hidden 64) and its tokenizer to ``folder``; returns it."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def chat_jsonl(path: Path, n: int = 48) -> Path:
    """Instruction data in the `messages` format: questions about pydoc topics, answers from their text."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:n]
    with open(path, "w") as f:
        for k in keys:
            answer = " ".join(topics[k].split()[:24])
            msgs = [{"role": "user", "content": f"What is {k}?"}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def text_file(path: Path, n_topics: int = 30) -> Path:
    path.write_text("\n".join(" ".join(t.split()) for t in pydoc_text(n_topics)))
    return path
