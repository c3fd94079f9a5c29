"""The tokenizer of a GGUF export, from a Hugging Face ``tokenizer.json``, through the gguf package.

Two kinds, as llama.cpp's own converter writes them:

- byte-level BPE (GPT-2, Llama 3, Qwen2/3): ``tokenizer.ggml.model = "gpt2"``, the vocabulary and
  merges as they are in tokenizer.json, and ``tokenizer.ggml.pre`` naming the pre-tokenizer split
  (llama.cpp and transformers' GGUF reader both choose the split regex by that name);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): ``"llama"``, read with
  ``gguf.LlamaHfVocab``.

Special token ids, add-BOS/EOS flags and the chat template go in with ``gguf.SpecialVocab``. Rows
of the embedding beyond the tokenizer (padded vocabularies) get unused ``[PAD<i>]`` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

# A byte-level tokenizer whose pre-tokenizer is GPT-2's own (ByteLevel with its regex).
GPT2_PRE = "gpt-2"


def _bpe_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer split."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PRE
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    by_regex: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        by_regex.setdefault(regex, name)  # first (canonical) name of each split
    for pattern in patterns:
        if pattern in by_regex:
            return by_regex[pattern]
    raise ValueError("the tokenizer's pre-tokenizer split is not one llama.cpp names (GPT-2, Llama 3, Qwen2, ...), "
                     "so llama.cpp would tokenize differently: export compressed-tensors for this tokenizer")


def _token_type(token_id: int, added: dict[int, dict]):
    import gguf

    if token_id not in added:
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if added[token_id].get("special") else gguf.TokenType.USER_DEFINED


def _byte_level(tokenizer_json: dict) -> tuple[list[str], list]:
    """(tokens by id, token types) of a byte-level BPE tokenizer.json."""
    vocab: dict[str, int] = dict(tokenizer_json["model"]["vocab"])
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    for token_id, token in added.items():
        vocab.setdefault(token["content"], token_id)
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous from 0, which GGUF's token list needs: "
                         "export compressed-tensors for this tokenizer")
    tokens = [by_id[i] for i in range(len(by_id))]
    return tokens, [_token_type(i, added) for i in range(len(tokens))]


def add_vocab(writer, folder: Path, n_vocab: int) -> None:
    """Write the tokenizer in ``folder`` (a ``tokenizer.json``) into ``writer``, padded to n_vocab."""
    import gguf

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json, which the GGUF file needs: pass the model folder "
                         "(or a tokenizer) that has one")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    scores = None
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        kind, pre = "gpt2", _bpe_pre(tokenizer_json)
        tokens, types = _byte_level(tokenizer_json)
    elif model.get("type") == "BPE":
        kind, pre = "llama", "default"
        vocab = gguf.LlamaHfVocab(Path(folder))
        entries = list(vocab.all_tokens())
        tokens = [t.decode("utf-8") if isinstance(t, bytes) else t for t, _, _ in entries]
        scores = [s for _, s, _ in entries]
        types = [k for _, _, k in entries]
    else:
        raise ValueError(f"tokenizer model {model.get('type')!r} is not BPE: qat writes BPE tokenizers to GGUF "
                         "(byte-level or SentencePiece-style); export compressed-tensors for this model")
    if len(tokens) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {n_vocab} rows: "
                         "pass the tokenizer the model was trained with")
    for i in range(len(tokens), n_vocab):  # padded embedding rows, as llama.cpp's converter fills them
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=n_vocab)
    for kind_, token_id in special.special_token_ids.items():
        if kind_ in ("bos", "eos") and kind_ not in special.add_special_token:
            # Stated, not left to each reader's default (transformers' adds BOS to "llama" vocabularies).
            special.add_special_token[kind_] = token_id in _template_ids(tokenizer_json)
    special.add_to_gguf(writer, quiet=True)


def _template_ids(tokenizer_json: dict) -> set[int]:
    """Ids of the special tokens tokenizer.json's post-processor adds around a single text."""
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    ids = set()
    for step in steps:
        if step.get("type") != "TemplateProcessing":
            continue
        for item in step.get("single", []):
            name = item.get("SpecialToken", {}).get("id")
            if name is not None:
                ids.update(step.get("special_tokens", {}).get(name, {}).get("ids", []))
    return ids
