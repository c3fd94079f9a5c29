"""What the example pairs share: a tiny Llama built from a config, a tokenizer trained here, and data.

Everything is made offline, in a few seconds, so the examples run anywhere. In a real script these are
``AutoTokenizer.from_pretrained(name)``, ``AutoModelForCausalLM.from_pretrained(name)`` and your dataset.
The data is synthetic arithmetic ("What is 3 plus 4?" -> "7"), small enough to learn in a few dozen steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def parse_args() -> argparse.Namespace:
    """--output_dir (default out/<script name>) and --max_steps, the two things a test changes."""
    parser = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").splitlines()[0])
    parser.add_argument("--output_dir", default=str(Path("out") / Path(sys.argv[0]).stem),
                        help="Where the trainer writes its checkpoints and the saved model.")
    parser.add_argument("--max_steps", type=int, default=60, help="How many optimizer steps to train.")
    return parser.parse_args()


def pairs(n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs of small additions, in a fixed random order."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 10, (2, n), generator=g).tolist()
    return [(f"What is {x} plus {y}?", str(x + y)) for x, y in zip(a, b)]


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary 300) trained on the example data, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{q} {a}" for q, a in pairs()], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama(tok) -> transformers.LlamaForCausalLM:
    """A 2-block Llama (hidden 64) with random weights: the stand-in for a pretrained model."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def text_dataset() -> Dataset:
    """TRL's 'text' format: one string per example (what a Trainer script tokenizes itself)."""
    return Dataset.from_dict({"text": [f"{q} {a}</s>" for q, a in pairs()]})


def prompt_completion_dataset() -> Dataset:
    """TRL's 'prompt' / 'completion' format: the loss counts the completion only."""
    qa = pairs()
    return Dataset.from_dict({"prompt": [q for q, _ in qa], "completion": [f" {a}" for _, a in qa]})


def show_generation(model, tok, question: str = "What is 3 plus 4?") -> str:
    """Greedy answer of the trained model to one question, printed and returned."""
    model.eval()
    ids = tok(question, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"{question} -> {answer!r}")
    return answer
