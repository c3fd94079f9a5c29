"""Data loading and tokenisation: every local format, packing, chat masking, classification."""

import json
from types import SimpleNamespace

import pytest
import transformers
from datasets import Dataset

from qat.trainers.data import IGNORE_INDEX, chat_example, load_raw, tokenize
from qat.trainers.run import main
from tests.trainers.helpers import tiny_llama_dir, tiny_tokenizer

ROWS = [{"text": f"sentence number {i} about lists and dicts", "label": i % 2} for i in range(20)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt", "saved"])
def test_every_local_format_loads(fmt, tmp_path):
    ds = Dataset.from_list(ROWS)
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "json":
        ds.to_json(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "txt":
        path.write_text("\n".join(r["text"] for r in ROWS))
    else:
        ds.save_to_disk(str(path))
    got = load_raw(str(path))
    assert list(got["text"]) == [r["text"] for r in ROWS]


def test_unsupported_extension_is_named(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"unsupported extension; use one of \['.csv'"):
        load_raw(str(tmp_path / "data.xml"))


def test_packing_makes_full_blocks_from_all_text():
    tok = tiny_tokenizer()
    ds = Dataset.from_list(ROWS)
    args = SimpleNamespace(task="causal_lm", messages_column="messages", text_column="text", packing=True,
                           max_length=16)
    packed = tokenize(ds, tok, args, "rows")
    stream = [t for r in ROWS for t in tok(r["text"])["input_ids"] + [tok.eos_token_id]]
    assert len(packed) == len(stream) // 16
    assert [t for b in packed["input_ids"] for t in b] == stream[: 16 * len(packed)]
    assert packed["labels"] == packed["input_ids"]


def test_chat_labels_cover_exactly_the_assistant_turns():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."},
            {"role": "user", "content": "And a dict?"}, {"role": "assistant", "content": "A mapping."}]
    ex = chat_example(tok, msgs, max_length=256)
    kept = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(ex["input_ids"], ex["labels"]))
    answers = tok("A sequence.</s>", add_special_tokens=False)["input_ids"] + \
        tok("A mapping.</s>", add_special_tokens=False)["input_ids"]
    assert kept == answers  # the answers and their end-of-turn token; no prompt token is trained on


def test_sequence_classification_recipe_runs(tmp_path):
    model_dir = tiny_llama_dir(tmp_path / "m")
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cfg.architectures = ["LlamaForSequenceClassification"]
    cfg.save_pretrained(model_dir)
    Dataset.from_list(ROWS).to_csv(str(tmp_path / "cls.csv"), index=False)
    out = tmp_path / "out"
    assert main(["--model_name_or_path", str(model_dir), "--task", "seq_cls", "--dataset", str(tmp_path / "cls.csv"),
                 "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--distill", "kl", "--distill_weight", "0.5", "--adapter_rank", "4", "--disable_tqdm", "true",
                 "--max_length", "16", "--report_to", "none", "--save_steps", "10"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export_max_abs_diff"] <= 1e-5
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "export")
    assert model.config.num_labels == 2
