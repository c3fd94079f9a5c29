"""Training data: load (local files, saved datasets, the Hub, or the built-in 'pydoc' corpus) and tokenise.

Per task:
  causal_lm   TRL's three dataset formats:
              `text` -> packed blocks of max_length (labels = inputs);
              chat `messages` -> one example per conversation, the loss on the assistant turns only;
              `prompt` + `completion` (strings, or lists of {role, content} rendered with the chat
              template) -> one example each, the loss on the completion only (labels -100 elsewhere)
  seq_cls     text + label column
  embedding   text, truncated to max_length (distilled from the teacher's hidden states: no labels)
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import datasets
from datasets import Dataset

FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
IGNORE_INDEX = -100


def _pydoc(split: str) -> Dataset:
    from qat.evaluation import pydoc_sentences

    # "eval" topics never appear in "train" (qat.evaluation splits by topic).
    return Dataset.from_dict({"text": pydoc_sentences("eval" if split == "eval" else "train", n=100_000)})


def load_raw(spec: str, config: str | None = None, split: str = "train") -> Dataset:
    """A `datasets.Dataset` from a file, a folder of files, a `save_to_disk` folder, 'pydoc' or a Hub name."""
    if spec == "pydoc":
        return _pydoc(split)
    path = Path(spec)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"dataset file {spec!r}: unsupported extension; use one of {sorted(FILE_BUILDERS)}")
        if path.stat().st_size == 0:
            raise ValueError(f"dataset file {spec} is empty: point --dataset at a file with examples")
        try:
            with _quiet_datasets():  # its own error log would come before our sentence
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets wraps the cause deep inside: find the line / byte ourselves
            raise ValueError(file_problem(path) or f"dataset file {spec} could not be read ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); check its format") from None
        if len(ds) == 0:
            raise ValueError(f"dataset file {spec} holds no examples: point --dataset at a file with examples")
        return ds
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(str(path), config, split=split)
    if path.suffix.lower() in FILE_BUILDERS or spec.startswith((".", "/")):
        raise ValueError(f"dataset {spec!r} does not exist")
    try:
        return datasets.load_dataset(spec, config, split=split)
    except Exception as err:  # offline, unknown name, no such split: say what to pass instead
        raise ValueError(f"could not load dataset {spec!r} from the Hub ({type(err).__name__}: {err}); "
                         "pass a local file (txt/json/jsonl/parquet/csv) or a save_to_disk folder") from None


@contextlib.contextmanager
def _quiet_datasets():
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def file_problem(path: Path) -> str | None:
    """The first thing wrong in a data file, as one sentence: bytes that are not UTF-8 (offset and
    line), a malformed JSON line (line and column); None when none is found. Run only on failure."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return (f"dataset file {path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                f"(line {line}); re-save the file as UTF-8")
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"dataset file {path}, line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}); fix it there"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return (f"dataset file {path}, line {number}: malformed JSON ({err.msg}, column {err.colno}); "
                    "fix or remove that line (JSON Lines: one object per line)")
        if not isinstance(record, dict):
            return f"dataset file {path}, line {number}: a JSON {type(record).__name__}, not an object; write one " \
                   "{...} object per line"
    return None


def _require(ds: Dataset, column: str, key: str, spec: str, also: str = "") -> None:
    if column not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has columns {ds.column_names} but no {column!r} column: "
                         f"set `{key}` to the column that holds it{also}")


def _tokenize_text(ds, tokenizer, column, max_length):
    return ds.map(lambda b: tokenizer(b[column], truncation=True, max_length=max_length),
                  batched=True, remove_columns=ds.column_names)


def _pack(ds, tokenizer, column, max_length):
    """Concatenate every text (each followed by EOS) and cut into max_length blocks; drop the tail."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def pack(batch):
        ids = [t for text in tokenizer(batch[column])["input_ids"] for t in text + eos]
        n = len(ids) // max_length * max_length
        blocks = [ids[i: i + max_length] for i in range(0, n, max_length)]
        return {"input_ids": blocks, "attention_mask": [[1] * max_length for _ in blocks],
                "labels": [list(b) for b in blocks]}

    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names)


def chat_example(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids of a rendered conversation; labels keep only the assistant turns' tokens.

    Each assistant turn's span is found by rendering the conversation up to it with the generation
    prompt (the prefix) and up to and including it (the end): the tokens in between are the answer.
    """
    def ids(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                             return_dict=False)

    full = list(ids(messages, False))
    labels = [IGNORE_INDEX] * len(full)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
        labels[start:end] = full[start:end]
    full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def prompt_completion_example(tokenizer, prompt, completion, max_length: int) -> dict:
    """Token ids of prompt + completion; labels keep only the completion's tokens (TRL's default).

    Plain strings: the completion is tokenized without special tokens after the prompt and ends with EOS.
    Conversations (lists of {role, content}): the prompt rendered with the generation prompt is the
    prefix of the whole conversation rendered; the tokens after it are the completion.
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("prompt and completion must both be strings or both be lists of {role, content} messages")
    if isinstance(prompt, str):
        head = tokenizer(prompt)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        full = head + tail
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational prompt/completion data needs a tokenizer with a chat template")
        head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        full = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False))
    labels = [IGNORE_INDEX] * len(head) + full[len(head):]
    full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def _tokenize_prompt_completion(ds, tokenizer, max_length):
    return ds.map(lambda ex: prompt_completion_example(tokenizer, ex["prompt"], ex["completion"], max_length),
                  remove_columns=ds.column_names)


def _message_problem(messages) -> str | None:
    if not isinstance(messages, list):
        return f"is a {type(messages).__name__}, not a list"
    if not messages:
        return "is an empty list"
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            return f"holds {str(turn)[:60]!r}, not a {{role, content}} object with string values"
    return None


def _tokenize_chat(ds, tokenizer, column, max_length, spec: str = "the dataset"):
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat data needs a tokenizer with a chat template (tokenizer.chat_template is empty)")
    for index, messages in enumerate(ds[column]):  # before tokenising: one sentence, not a KeyError inside map
        problem = _message_problem(messages)
        if problem:
            raise ValueError(f"example {index} of {spec}: `{column}` {problem}; each example needs a list of "
                             '{"role": ..., "content": ...} turns')
    out = ds.map(lambda ex: chat_example(tokenizer, ex[column], max_length), remove_columns=ds.column_names)
    # An example whose answer max_length cut off has no counted token: its loss is 0/0 = NaN.
    answered = [i for i, labels in enumerate(out["labels"]) if any(t != IGNORE_INDEX for t in labels)]
    if not answered:
        raise ValueError(f"no conversation in {spec} keeps an answer token within max_length {max_length} (the "
                         "prompts fill it, or no turn is from the assistant): raise --max_length or shorten the prompts")
    if len(answered) < len(out):
        print(f"qat: dropped {len(out) - len(answered)} of {len(out)} conversations in {spec} whose answer is cut "
              f"off by max_length {max_length}", file=sys.stderr)
        out = out.select(answered)
    return out


def tokenize(ds: Dataset, tokenizer, args, spec: str) -> Dataset:
    if args.task == "causal_lm":
        if args.messages_column in ds.column_names:
            return _tokenize_chat(ds, tokenizer, args.messages_column, args.max_length, spec)
        if {"prompt", "completion"} <= set(ds.column_names):
            return _tokenize_prompt_completion(ds, tokenizer, args.max_length)
        _require(ds, args.text_column, "text_column", spec,
                 also=" (or `messages_column` for chat data, or `prompt` and `completion` columns)")
        if args.packing:
            return _pack(ds, tokenizer, args.text_column, args.max_length)
        out = _tokenize_text(ds, tokenizer, args.text_column, args.max_length)
        return out.map(lambda ex: {"labels": list(ex["input_ids"])})
    _require(ds, args.text_column, "text_column", spec)
    out = _tokenize_text(ds, tokenizer, args.text_column, args.max_length)  # drops every raw column
    if args.task == "seq_cls":
        _require(ds, args.label_column, "label_column", spec)
        out = out.add_column("labels", list(ds[args.label_column]))
    return out


def build_datasets(args, tokenizer) -> tuple[Dataset, Dataset, list[str]]:
    """(train, eval) tokenised datasets and the raw held-out texts (for embedding metrics)."""
    raw = load_raw(args.dataset, args.dataset_config, args.train_split)
    if args.eval_dataset:
        held = load_raw(args.eval_dataset, args.dataset_config, "eval" if args.eval_dataset == "pydoc" else "train")
    elif args.dataset == "pydoc":
        held = _pydoc("eval")
    else:
        split = raw.train_test_split(test_size=args.eval_ratio, seed=args.seed)
        raw, held = split["train"], split["test"]
    if args.max_train_samples:
        raw = raw.select(range(min(args.max_train_samples, len(raw))))
    if args.max_eval_samples:
        held = held.select(range(min(args.max_eval_samples, len(held))))
    texts = list(held[args.text_column]) if args.text_column in held.column_names else []
    return tokenize(raw, tokenizer, args, args.dataset), tokenize(held, tokenizer, args, args.eval_dataset or args.dataset), texts


def collator(tokenizer, task: str):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "causal_lm":  # pads labels with -100 so padding never counts in the loss
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return DataCollatorWithPadding(tokenizer)
