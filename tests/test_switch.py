"""The three-line switch: get_qat_model + QATTrainer with plain TrainingArguments, TRL, save_model, no traps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from datasets import Dataset

import qat
from qat.quant_linear import QuantLinear
from qat.trainers import QATArguments
from tests.conftest import tiny_llama
from tests.trainers.helpers import tiny_llama_dir

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 64, 3, 12]])


def _data(n=16, length=16):
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 128, (n, 1), generator=g) + 3 * torch.arange(length)) % 128
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(out, cls=transformers.TrainingArguments, **kw):
    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0,
                disable_tqdm=True, dataloader_pin_memory=False)
    return cls(**{**base, **kw})


def _lora(**kw):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------- what trains
def test_get_qat_model_trains_exactly_the_steps_and_the_adapters_peft_would(tmp_path):
    model = qat.get_qat_model(tiny_llama(), _lora(), bits=4, group_size=32)
    reference = peft.get_peft_model(tiny_llama(), _lora())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    steps = {n for n in trainable if n.endswith(".weight_scale")}
    adapters = {n for n in trainable if ".adapter." in n}
    # 2 blocks x 7 linears, lm_head left in float; LoRA on q_proj and v_proj: 2 x 2 x (A, B).
    # r * (in + out) values per LoRA: q_proj 64 -> 64, v_proj 64 -> 32 (2 key-value heads of 16).
    assert len(layers) == 14 and steps == {f"{n}.weight_scale" for n in layers}
    assert len(adapters) == 8 and set(trainable) == steps | adapters
    step_values = sum(m.out_features * m.in_features // 32 for m in layers.values())  # one step per group of 32
    assert sum(trainable[n].numel() for n in steps) == step_values
    # The adapters hold as many values as peft's LoRA on the same config, on the same layers.
    peft_trainable = {n: p.numel() for n, p in reference.named_parameters() if p.requires_grad}
    lora_values = 2 * 4 * ((64 + 64) + (64 + 32))
    assert sum(trainable[n].numel() for n in adapters) == sum(peft_trainable.values()) == lora_values
    assert {re.sub(r"\.adapter\.lora_(A|B)$", "", n) for n in adapters} == \
        {re.sub(r"^base_model\.model\.|\.lora_(A|B)\.default\.weight$", "", n) for n in peft_trainable}

    before = {n: t.clone() for n, t in model.state_dict().items()}
    qat.QATTrainer(model=model, args=_args(tmp_path), train_dataset=_data()).train()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # Exactly the trainable tensors moved (lora_A too: B is nonzero after step 1); embeddings, norms,
    # lm_head and the packed codes are bit for bit what they were.
    assert changed == set(trainable)


def test_readme_from_python_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("From Python"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    folder = tiny_llama_dir(tmp_path / "tiny")
    texts = [f"Item {i} is followed by item {i + 1}." for i in range(16)]
    monkeypatch.chdir(tmp_path)
    namespace = {"model_name": str(folder), "texts": texts}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    trainer, model = namespace["trainer"], namespace["model"]
    assert trainer.state.global_step == 2  # 16 texts, 8 per batch, one epoch
    # target_modules="all-linear": every quantized linear gets a LoRA; nothing else trains.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and len(trainable) == 14 * 3
    float_model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert torch.equal(model.get_parameter(name), float_model.get_parameter(name)), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    ids = IDS % model.config.vocab_size
    # Same codes and steps; compressed-tensors decompresses in another order: fp32 round-off only.
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "out" / "final" / "tokenizer.json").exists()


# ---------------------------------------------------------------------------------------- no silent traps
def test_the_quantized_model_as_its_own_teacher_is_refused_with_the_cause(tmp_path):
    model = tiny_llama()
    float_model = model  # not a copy: get_qat_model quantizes this very object
    model = qat.get_qat_model(model, _lora())
    args = _args(tmp_path, QATArguments, distill="kl")
    with pytest.raises(ValueError, match="teacher= is a quantized model"):
        qat.QATTrainer(model=model, args=args, teacher=float_model, train_dataset=_data())
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("weight_scale"))  # untouched
    with pytest.raises(ValueError, match="keep_teacher=True"):
        qat.QATTrainer(model=model, args=args, train_dataset=_data())
    with pytest.raises(ValueError, match="distill is 'none'"):
        qat.QATTrainer(model=model, args=_args(tmp_path), teacher=tiny_llama(), train_dataset=_data())


def test_kept_teacher_distills_with_the_labels_and_logs_both_losses(tmp_path):
    model = qat.get_qat_model(tiny_llama(), _lora(), keep_teacher=True)
    args = _args(tmp_path, QATArguments, distill="kl")
    assert args.distill_weight == 0.5  # labels count unless the weight says otherwise
    trainer = qat.QATTrainer(model=model, args=args, train_dataset=_data())
    assert not any(isinstance(m, QuantLinear) for m in trainer.teacher.modules())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["distill_weight"] == 0.5 and h["distill_loss"] > 0 and h["task_loss"] > 1.0
        # one micro-batch per logged step: the logged loss is the mix of the two logged parts
        assert h["loss"] == pytest.approx(0.5 * h["task_loss"] + 0.5 * h["distill_loss"], rel=1e-5)


def test_a_stray_trainable_parameter_is_refused_before_training(tmp_path):
    model = qat.quantize_model(tiny_llama(), qat.QuantConfig())  # not frozen first: embeddings, norms, lm_head
    with pytest.raises(ValueError, match=r"parameters outside the steps and adapters would train \(\d[\d,]* values: "
                                         r"model\.embed_tokens\.weight"):
        qat.QATTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
    with pytest.raises(ValueError, match="no quantized layers"):
        qat.QATTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_data())


def test_modules_to_save_train_in_full_and_say_so(tmp_path, caplog):
    model = qat.get_qat_model(tiny_llama(), _lora(modules_to_save=["lm_head"]))
    assert not isinstance(model.lm_head, QuantLinear) and model.lm_head.weight.requires_grad
    head = model.lm_head.weight.detach().clone()
    with caplog.at_level("WARNING", logger="qat"):
        trainer = qat.QATTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
    assert "training 1 modules in full" in caplog.text and "lm_head" in caplog.text
    trainer.train()
    assert not torch.equal(head, model.lm_head.weight)


def test_unsupported_peft_options_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="use_dora"):
        qat.get_qat_model(model, _lora(use_dora=True))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any change
    with pytest.warns(UserWarning, match="lora_dropout=0.1 is not used"):
        qat.get_qat_model(model, _lora(lora_dropout=0.1))


# ---------------------------------------------------------------------------------------- saving
def test_save_model_writes_the_export_beside_the_checkpoints(tmp_path):
    model = qat.get_qat_model(tiny_llama(), _lora(), bits=3, group_size=32)
    out = tmp_path / "run"
    trainer = qat.QATTrainer(model=model, args=_args(out, max_steps=4, save_strategy="steps", save_steps=2),
                             train_dataset=_data())
    trainer.train()
    trainer.save_model()
    trainer.save_model()  # a second save replaces the export, never the checkpoints
    assert (out / "checkpoint-2" / "qat_trainable.safetensors").exists()
    assert (out / "checkpoint-4" / "qat_trainable.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert json.loads((out / "qat_config.json").read_text())["recipe"]["bits"] == 3  # the model's, not a default
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=1e-5)  # fp32 order only
    # The checkpoints still resume: the same run continued from step 2 ends where the first did.
    resumed_model = qat.get_qat_model(tiny_llama(), _lora(), bits=3, group_size=32)
    resumed = qat.QATTrainer(model=resumed_model, args=_args(tmp_path / "again", max_steps=4), train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    torch.testing.assert_close(_logits(resumed_model), _logits(model), atol=1e-5, rtol=1e-5)


def test_outside_lora_export_loads_with_plain_peft(tmp_path):
    model = qat.get_qat_model(tiny_llama(), _lora(), placement="outside")
    trainer = qat.QATTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_data())
    trainer.train()
    trainer.save_model(tmp_path / "final")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "final" / "adapter")
    assert json.loads((tmp_path / "final" / "config.json").read_text())["quantization_config"]["dequantize"]
    # Same codes, steps and LoRA factors; peft adds the LoRA product in another association: fp32 round-off.
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- TRL
def test_qat_sft_trainer_takes_the_peft_config_and_trl_formats(tmp_path):
    folder = tiny_llama_dir(tmp_path / "tiny")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    data = Dataset.from_dict({"prompt": [f"Count from {i}:" for i in range(16)],
                              "completion": [f" {i + 1} {i + 2}" for i in range(16)]})
    import trl

    args = _args(tmp_path / "run", trl.SFTConfig, bf16=False, max_length=32)
    trainer = qat.QATSFTTrainer(model=str(folder), args=args, train_dataset=data, processing_class=tok,
                                peft_config=_lora())
    assert isinstance(trainer.args, qat.QATSFTConfig) and trainer.args.completion_only_loss is not False
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(trained) == 14 + 8
    batch = trainer.data_collator([trainer.train_dataset[0]])
    prompt_len = len(tok(data[0]["prompt"])["input_ids"])
    assert (batch["labels"][0, :prompt_len] == -100).all()  # TRL's completion-only labels reach our loss
    trainer.train()
    trainer.save_model()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(_logits(reloaded), _logits(trainer.model), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- data parallel
def _torchrun(*args, timeout=300):
    from tests.trainers.test_zo_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_torchrun_on_cpu_trains_data_parallel_or_refuses(tmp_path):
    worker = str(ROOT / "tests" / "switch_ddp_worker.py")
    refused = _torchrun(worker, str(tmp_path / "plain"), "4")
    assert refused.returncode != 0 and "pass --use_cpu true" in refused.stderr
    assert not (tmp_path / "plain").exists()  # refused before any work
    (tmp_path / "ddp").mkdir()
    done = _torchrun(worker, str(tmp_path / "ddp"), "4", "use_cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "one").mkdir()
    single = subprocess.run([sys.executable, worker, str(tmp_path / "one"), "8"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert set(rank0) == set(one) and len(one) == 14 + 8
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name  # both ranks end with the same weights
        # 2 x 4 examples per step vs 8 in one process, SGD: the same update up to fp32 summation order.
        torch.testing.assert_close(rank0[name], one[name], atol=1e-6, rtol=1e-5)


def test_the_cli_refuses_torchrun_without_use_cpu_before_loading(tmp_path):
    out = tmp_path / "job"
    done = _torchrun(str(ROOT / "scripts" / "train.py"), "--model_name_or_path", str(tmp_path), "--dataset", "pydoc",
                     "--output_dir", str(out), "--ddp_backend", "gloo")
    assert done.returncode != 0 and "pass --use_cpu true" in done.stderr
    assert not out.exists()



def test_accelerate_launch_cpu_with_several_processes_is_refused_before_loading(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (its simple launcher); the job
    would train alone while the user asked for two: refused in one sentence, before any work."""
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "train.py"),
           "--model_name_or_path", str(tmp_path), "--dataset", "pydoc", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "accelerate launch --cpu started one process" in done.stderr, done.stderr[-2000:]
    # accelerate's launcher prints its own traceback for any failing child; none comes from qat's code
    assert not any(f'File "{ROOT / part}' in done.stderr for part in ("qat", "trainers", "scripts"))
    assert not out.exists()


# ---------------------------------------------------------------------------------------- help
def test_train_help_lists_qat_keys_first_with_type_default_and_a_sentence():
    from qat.trainers.recipes import help_text

    text = help_text()
    first_trainer_key = text.index("TrainingArguments field")
    for key in QATArguments(output_dir="x").qat_dict():
        match = re.search(rf"--{key} \(([^,]+), default (.*)\)\n\s+([A-Z][^\n]*)", text)
        assert match and match.start() < first_trainer_key, key
    for term in ("step", "group", "storage bits"):
        assert re.search(rf"^  {term}\n", text, re.M), term
    assert "--learning_rate (" not in text  # the Trainer's keys are pointed to, not listed


def test_every_cli_option_has_help_and_no_learned_zero_points():
    from qat.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help and action.help[0].isupper() and action.help.endswith("."), (name, action.dest)
    assert "learned zero points" not in sub.choices["quantize"].format_help()
    assert "step" in parser.format_help() and "storage bits" in parser.format_help()


# ---------------------------------------------------------------------------------------- CLI data formats
def test_cli_reads_trl_prompt_completion_data_with_the_loss_on_the_completion():
    from types import SimpleNamespace

    from qat.trainers.data import IGNORE_INDEX, tokenize
    from tests.trainers.helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    args = SimpleNamespace(task="causal_lm", messages_column="messages", text_column="text", packing=True,
                           max_length=64)
    plain = Dataset.from_dict({"prompt": ["What is a list?"], "completion": [" A sequence."]})
    ex = tokenize(plain, tok, args, "rows")[0]
    prompt, answer = tok("What is a list?")["input_ids"], tok(" A sequence.", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_token_id]
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is a list?"}]],
                              "completion": [[{"role": "assistant", "content": "A sequence."}]]})
    ex = tokenize(chat, tok, args, "rows")[0]
    kept = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(kept) == "A sequence.</s>"  # the assistant turn and its end, nothing of the prompt
    with pytest.raises(ValueError, match="`prompt` and `completion` columns"):
        tokenize(Dataset.from_dict({"question": ["x"]}), tok, args, "rows")
