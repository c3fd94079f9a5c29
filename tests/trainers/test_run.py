"""The main job end to end (`qat train`): recipes on local models, resume, export, reload, bad input."""

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from qat.trainers.run import main
from tests.trainers.helpers import chat_jsonl, text_file, tiny_llama_dir

RECIPES = Path(__file__).resolve().parents[2] / "scripts" / "recipes"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def _sft(llama_dir, data, out, *extra):
    return ["--config", str(RECIPES / "causal_lm_sft.yaml"), "--model_name_or_path", str(llama_dir),
            "--dataset", str(data), "--output_dir", str(out), "--max_length", "64", "--adapter_rank", "4",
            "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "4", "--eval_ratio", "0.2",
            "--logging_steps", "1", "--save_steps", "2", "--eval_steps", "2", "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false", *extra]


def test_chat_recipe_trains_resumes_exports_and_generates(llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    assert main(_sft(llama_dir, data, out, "--max_steps", "2")) == 0
    assert main(_sft(llama_dir, data, out, "--max_steps", "4", "--resume_from_checkpoint", "true")) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["export_max_abs_diff"] <= 1e-5  # fp32 BLAS order only
    export = out / "export"
    assert json.loads((export / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is assert?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5
    # metrics.json rows: float / post-training / qat eval loss on the held-out split
    assert set(metrics["rows"]) == {"float", "post-training", "qat"}


def test_text_recipe_with_outside_lora_exports_base_plus_peft_adapter(llama_dir, tmp_path):
    data = text_file(tmp_path / "corpus.txt")
    out = tmp_path / "cpt"
    args = ["--config", str(RECIPES / "causal_lm_cpt.yaml"), "--model_name_or_path", str(llama_dir),
            "--dataset", str(data), "--output_dir", str(out), "--max_length", "32", "--max_steps", "2",
            "--adapter_rank", "4", "--gradient_accumulation_steps", "1", "--adapter_placement", "outside",
            "--adapter_init", "loftq", "--group_size", "32", "--eval_strategy", "no", "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export_max_abs_diff"] <= 1e-5  # base + PeftModel reproduce the trained model
    assert (out / "export-adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--text_column", "body", "--messages_column", "conversation"], "no 'body' column: set `text_column"),
    (["--model_name_or_path", "/no/such/model"], "model '/no/such/model' does not exist"),
    (["--adaptor_rank", "3"], "did you mean 'adapter_rank'"),
    (["--dataset", "/no/such.jsonl"], "dataset '/no/such.jsonl' does not exist"),
])
def test_bad_input_is_a_clear_error_before_any_work(llama_dir, tmp_path, extra, message):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    with pytest.raises(SystemExit, match=message):
        main(_sft(llama_dir, data, tmp_path / "o", "--max_steps", "1", *extra))
    assert not (tmp_path / "o").exists()


def test_an_existing_run_is_never_overwritten(llama_dir, tmp_path):
    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds a run"):
        main(_sft(llama_dir, data, out, "--max_steps", "1"))
    assert (out / "notes.txt").read_text() == "mine"


def test_default_main_job_beats_post_training(minilm_path, tmp_path, capsys):
    # The real default recipe, cut to a few steps so CI stays fast (the full job: README / note).
    out = tmp_path / "minilm"
    # GPTQ calibrated on 32 sentences (not 1024), batch 16, a 4-step warm-up: the default's shape in CI's
    # time. 48 steps, not 16: step training first raises the 48-sentence dev score, then lowers it below
    # the start (asymmetric default, 1 - cos x 1e3: 11.72 -> 13.40 at step 8 -> 11.00 at 48; 16 steps
    # never got back below 11.72, and the old symmetric default passed at 16 by 0.3).
    argv = ["--output_dir", str(out), "--max_steps", "48", "--max_eval_samples", "48", "--calibration_samples", "32",
            "--warmup_steps", "4", "--keep_best_steps", "8",
            "--per_device_train_batch_size", "16", "--save_steps", "8", "--logging_steps", "8",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    # The qat row, recomputed here from what a user gets: the export reloaded by transformers,
    # against the float model, on the run's own held-out texts.
    from qat.evaluation import embedding_agreement, sentence_embeddings
    from qat.trainers.data import build_datasets
    from qat.trainers.recipes import build_arguments

    args = build_arguments(argv)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    texts = build_datasets(args, tok)[2]
    assert len(texts) == 48
    float_model = transformers.AutoModel.from_pretrained(minilm_path).eval()
    exported = transformers.AutoModel.from_pretrained(out / "export").eval()
    want = embedding_agreement(sentence_embeddings(float_model, tok, texts, max_length=args.max_length),
                               sentence_embeddings(exported, tok, texts, max_length=args.max_length))
    # The same model and texts, run twice in fp32 (BLAS order only): a mean of cosines ~1e-7 apart.
    assert rows["qat"]["cosine"] == pytest.approx(want["cosine"], abs=1e-5)
    assert want["cosine"] < 1 - 1e-4  # quantized: the export is not the float model
    assert rows["qat"]["cosine"] > rows["post-training"]["cosine"]
    assert metrics["export_max_abs_diff"] <= 1e-4  # 384-wide fp32 hidden states, BLAS order only
    printed = capsys.readouterr().out
    assert "| qat |" in printed and str(out / "export") in printed
    assert (out / "loss.png").stat().st_size > 0
    cfg = yaml.safe_load(json.dumps(metrics["recipe"]))
    assert cfg["bits"] == 4 and cfg["quant_init"] == "gptq" and cfg["train_mode"] == "frozen_codes"
    assert torch.load(out / "checkpoint-48" / "training_args.bin", weights_only=False).max_steps == 48


def test_data_parallel_run_with_torchrun(llama_dir, tmp_path):
    # 2 CPU processes (gloo DDP through the Trainer; use_cpu makes accelerate run them data parallel, without
    # it the job is refused, tests/test_switch.py): train, then rank 0 exports and verifies alone.
    import subprocess
    import sys

    data = chat_jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "ddp"
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    from tests.trainers.test_zo_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), *_sft(llama_dir, data, out, "--max_steps", "2", "--use_cpu", "true")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["export_max_abs_diff"] <= 1e-5
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 4  # per device; the global batch is 2 x 4


def test_same_recipe_same_result_whatever_ran_before(llama_dir, tmp_path):
    """run() seeds before attaching adapters: the random LoRA start must not depend on the caller's RNG."""
    data = chat_jsonl(tmp_path / "chat.jsonl")
    losses = []
    for i, noise in enumerate((0, 5)):
        torch.manual_seed(123)
        torch.rand(noise)  # the caller drew different random numbers before calling the job
        out = tmp_path / f"run{i}"
        # No warm-up: B moves off zero at step 1, so the trained model depends on the random A.
        assert main(_sft(llama_dir, data, out, "--max_steps", "2", "--save_strategy", "no", "--warmup_steps", "0",
                         "--lr_scheduler_type", "constant")) == 0
        losses.append(json.loads((out / "metrics.json").read_text())["rows"]["qat"]["loss"])
    assert losses[0] == losses[1]  # same seed, same data order, same ops: bit-identical
