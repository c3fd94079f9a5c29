"""Issue 17, items 9-10: each bad input is one sentence naming the problem and the fix, before work,
with exit code 1 and no traceback; a model's own code is never run (nor asked about)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.reliability.helpers import SFT, one_line_error, run_in_process, run_subprocess, train_args


def _chat_line(user="Hi?", answer="Hello there."):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def _write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


DATA_CASES = {  # file name, content, expected words
    "empty": ("empty.jsonl", "", "is empty"),
    "malformed": ("bad.jsonl", "\n".join([_chat_line()] * 3 + ['{"messages": [}'] + [_chat_line()] * 2),
                  "line 4: malformed JSON"),
    "not-utf8": ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") + b"more text\n", "not UTF-8 text: byte 0xe9 "
                 "at offset 3 (line 1)"),
    "messages-str": ("str.jsonl", "\n".join(json.dumps({"messages": "hello"}) for _ in range(6)),
                     "`messages` is a str, not a list"),
    "messages-no-role": ("norole.jsonl", "\n".join(json.dumps({"messages": [{"content": "x"}]}) for _ in range(6)),
                         "not a {role, content} object"),
    "answer-cut-off": ("long.jsonl", "\n".join(_chat_line(user="why " * 200) for _ in range(6)),
                       "keeps an answer token within max_length 64"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_dataset_is_one_sentence(case, llama, tmp_path, capsys):
    name, content, expected = DATA_CASES[case]
    data = _write(tmp_path / name, content)
    code, err = run_in_process(["train", *train_args(llama, data, tmp_path / "o", "--max_steps", "1")], capsys)
    assert code == 1
    one_line_error(err, expected)
    assert not (tmp_path / "o").exists()  # refused before the run wrote anything


def _recipe(tmp_path: Path, text: str) -> Path:
    return _write(tmp_path / "recipe.yaml", text)


RECIPE_CASES = {
    "max_steps-ten": ("max_steps: ten\n", "max_steps: 'ten' is not a whole number"),
    "lr-fast": ("learning_rate: fast\n", "learning_rate: 'fast' is not a number"),
    # {n}: the lines of the base recipe the case is appended to
    "yaml-syntax": ("bits: 4\nadapter_targets: [q_proj, v_proj\nmax_steps: 3\n", "recipe.yaml, line {n3}, column 10"),
    "duplicate-key": ("bits: 4\nmax_steps: 3\nbits: 2\n", "recipe.yaml, line {n3}: key 'bits' is set twice (first "
                      "on line {n1})"),
    "group-zero": ("group_size: 0\n", "group size 0: use a positive number"),
    "group-negative": ("group_size: -8\n", "group size -8: use a positive number"),
    "bits-four": ("bits: four\n", "bits: 'four' is not a number: write e.g. bits: 4"),
    "max_steps-zero": ("max_steps: 0\n", "max_steps=0 trains nothing: use a positive step count"),
    "wht-outside": ("adapter: wht\nadapter_placement: outside\nadapter_init: zero\n", "cannot be exported"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_is_one_sentence_when_read(case, llama, chat, tmp_path, capsys):
    text, expected = RECIPE_CASES[case]
    base = [line for line in SFT.read_text().splitlines() if line.split(":")[0] not in text]
    recipe = _recipe(tmp_path, "\n".join(base) + "\n" + text)
    expected = expected.format(n1=len(base) + 1, n3=len(base) + 3)
    argv = [a if a != str(SFT) else str(recipe) for a in train_args(llama, chat, tmp_path / "o", "--max_steps", "1")]
    if case.startswith("max_steps"):
        argv = argv[:-2]  # the recipe's value, not the command line's
    code, err = run_in_process(["train", *argv], capsys)
    assert code == 1
    one_line_error(err, expected)
    assert not (tmp_path / "o").exists()


def test_bits_four_on_the_command_lines(llama, chat, tmp_path, capsys, minilm_path):
    code, err = run_in_process(["train", *train_args(llama, chat, tmp_path / "o", "--bits", "four")], capsys)
    assert code == 1
    one_line_error(err, "bits: 'four' is not a number: write e.g. bits: 4")
    code, err = run_in_process(["quantize", "--model", minilm_path, "--bits", "four", "--out", str(tmp_path / "q")],
                               capsys)
    assert code == 2 and "bit width 'four' is not a number" in err and "Traceback" not in err  # argparse's usage


def test_model_problems_are_one_sentence(llama, chat, tmp_path, capsys):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hi")
    for command in (["train", *train_args(not_a_model, chat, tmp_path / "o", "--max_steps", "1")],
                    ["quantize", "--model", str(not_a_model), "--out", str(tmp_path / "q")]):
        code, err = run_in_process(command, capsys)
        assert code == 1
        one_line_error(err, "is not a model folder (it has no config.json)")
    code, err = run_in_process(["train", *train_args(llama, chat, tmp_path / "o", "--max_length", "4096")], capsys)
    assert code == 1
    one_line_error(err, "max_length 4096 is beyond the 128 positions")
    code, err = run_in_process(["train", *train_args(llama, chat, tmp_path / "o", "--max_steps", "1",
                                                     "--quant_overrides", "{'dwn_proj$': {bits: 8}}")], capsys)
    assert code == 1
    one_line_error(err, "override pattern 'dwn_proj$' matches no quantized layer")
    assert not (tmp_path / "o").exists() and not (tmp_path / "q").exists()


def test_corrupt_optimizer_and_nan_loss_are_one_sentence(llama, chat, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_in_process(["train", *train_args(llama, chat, out, "--max_steps", "1", "--verify_export",
                                                "false")], capsys)[0] == 0
    optimizer = out / "checkpoint-1" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # truncated
    (out / "checkpoint-1" / "qat_complete.json").unlink()  # as written before manifests: torch.load meets it
    code, err = run_in_process(["train", *train_args(llama, chat, out, "--max_steps", "2", "--resume_from_checkpoint",
                                                     "true", "--verify_export", "false")], capsys)
    assert code == 1
    one_line_error(err, "the optimizer state in")
    # NonFiniteLossError: a learning rate that overflows the first step, as a real process prints it.
    done = run_subprocess(["train", *train_args(llama, chat, tmp_path / "nan", "--max_steps", "3", "--learning_rate",
                                                "1e38", "--step_learning_rate", "1e38", "--max_grad_norm", "0")],
                          cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    one_line_error(done.stderr, "qat train: ")
    assert "diverged" in done.stderr or "loss became nan" in done.stderr


def test_remote_code_is_never_run_nor_asked(llama, chat, tmp_path, capsys):
    # Item 10: a model folder with auto_map made `qat train` ask "Do you wish to run the custom code?".
    custom = tmp_path / "custom"
    shutil.copytree(llama, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text("open(__file__ + '.ran', 'w').write('ran')\n")
    done = run_subprocess(["train", *train_args(custom, chat, tmp_path / "o", "--max_steps", "1")], cwd=tmp_path,
                          timeout=120)  # stdin is not a terminal: a prompt would read EOF or time out
    assert done.returncode == 1 and "Do you wish" not in done.stdout + done.stderr
    one_line_error(done.stderr, "qat train: ")
    assert not (custom / "evil.py.ran").exists()
    # `qat inspect` of an untrusted export: config.json may name any attribute of transformers.
    from tests.conftest import tiny_llama
    import qat

    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(init="rtn"))
    export = qat.export_model(model, tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    config["architectures"] = ["pipeline"]  # a transformers function, not a model class
    (export / "config.json").write_text(json.dumps(config))
    code, err = run_in_process(["inspect", str(export)], capsys)
    assert code == 1
    one_line_error(err, "names architecture 'pipeline', which is not a transformers model class")
