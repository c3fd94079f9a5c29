"""QATTrainer's own FSDP2 and DeepSpeed ZeRO-3 paths on two CPU processes (gloo) against one process.

One ``torch.distributed.run`` launch of tests/distributed/trainer_worker.py runs every scenario through
the Trainer (accelerate's ``fsdp2_prepare_model`` / ``deepspeed.initialize``, checkpointing and
resuming, the main job of ``qat.trainers.run``); the only change to the libraries is
tests/distributed/cpu_accelerate.py, which lifts accelerate's refusal of both on CPU. The references
are computed here, in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qat
from qat.packing import unpack_int32
from tests.distributed import recipe as R
from tests.distributed.test_multiprocess import WORLD, _export_single_process, _free_port, _max_rel_grad_error

WORKER = Path(__file__).with_name("trainer_worker.py")
ROOT = Path(__file__).resolve().parents[2]
KINDS = ["FULL_STATE_DICT", "SHARDED_STATE_DICT"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.trainers.helpers import text_file, tiny_llama_dir

    out = tmp_path_factory.mktemp("trainer_sharded")
    tiny_llama_dir(out / "model")
    text_file(out / "data.txt")
    return out


@pytest.fixture(scope="module")
def results(folder):
    # No PYTHONPATH: the worker appends the repo root itself, last (its kernels/ folder would
    # shadow the PyPI package `kernels` that transformers imports).
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={_free_port()}", str(WORKER), str(folder)]
    # ~40 s on 2 cores; a collective entered by one rank only (a rank-0-only gather) hangs instead
    # of failing, so give up after 300 s.
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(folder / "trainer_results.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference():
    return R.reference_run()


def _curve(losses: dict) -> list[float]:
    return [losses[step] for step in range(1, R.STEPS + 1)]


# ------------------------------------------------------------------ FSDP2 through the Trainer
@pytest.mark.parametrize("kind", KINDS)
def test_trainer_fsdp2_matches_one_process(results, reference, kind):
    # accelerate reduces with FSDP's default ReduceOp.AVG, which gloo implements correctly in torch
    # 2.13 (a summing AVG would double every gradient). Gradients: fp32 summation order only,
    # measured 4.7e-7 of each tensor's largest entry (bound 1e-5, as for shard_model). Losses:
    # measured 1.9e-6 over 5 steps; 1e-4 is far below the 0.27 the loss falls by.
    run = results[kind]
    assert _max_rel_grad_error(run["first_grads"], reference["first_grads"]) < 1e-5
    losses = _curve(run["losses"])
    assert max(abs(a - b) for a, b in zip(losses, reference["losses"])) < 1e-4
    assert losses[-1] < losses[0] - 0.2
    assert run["code_dtypes"] == {"torch.int32"}  # accelerate's sharding kept the codes packed


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_fsdp2_checkpoint_resumes_the_same_run(results, kind):
    # A second Trainer, its trainable tensors scaled by 1.5, resumed from checkpoint-3: steps 4 and 5
    # repeat the uninterrupted run. Same shards, same reduction order: measured identical; 1e-6
    # allows only fp32 round-off, while a resume that kept the scaled tensors is off by > 0.01.
    run = results[kind]
    assert {"qat_trainable.safetensors", "qat_checkpoint.json"} <= set(run["files"])
    for step in (R.STEPS - 1, R.STEPS):
        assert run["resumed_losses"][step] == pytest.approx(run["losses"][step], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_fsdp2_export_equals_one_process_export(results, tmp_path, kind):
    # export_sharded of the Trainer's sharded model vs qat.export_model of the same parameters
    # held by one process: identical bytes.
    run = results[kind]
    single = _export_single_process(run["raw"], tmp_path / "single")
    assert (Path(run["export"]) / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()


def test_trainer_int8_gradients_stay_in_band(results, reference):
    # quantized_grads installed by the Trainer on every FSDP2 unit accelerate made (2 blocks,
    # embeddings, head + norm, root). Band as for shard_model's int8 run: measured 0.0040,
    # asserted 0.02, inside the 0.27 the loss falls by; the first loss precedes any update.
    run = results["int8"]
    assert run["hooked"] == run["fsdp_groups"] == 5
    losses = _curve(run["losses"])
    assert losses[0] == pytest.approx(reference["losses"][0], abs=1e-5)
    assert 0 < max(abs(a - b) for a, b in zip(losses, reference["losses"])) < 0.02
    assert losses[-1] < losses[0] - 0.2


def test_trainer_fsdp2_bf16_keeps_codes_packed(results, reference):
    # bf16: true -> accelerate's MixedPrecisionPolicy (bf16 compute and gradient reduction, fp32
    # masters of the trainables); the int32 codes are never cast. Losses are computed in bf16,
    # whose spacing at 4-8 is 2^-5: measured within 0.0078 of the fp32 run, asserted one spacing.
    run = results["bf16"]
    assert run["mixed_precision"] == "bf16" and run["codes"] == {"torch.int32"}
    assert run["trainable"] == {"torch.float32"}
    losses = _curve(run["losses"])
    assert max(abs(a - b) for a, b in zip(losses, reference["losses"])) < 2 ** -5
    assert losses[-1] < losses[0] - 0.2


# ------------------------------------------------------------------ DeepSpeed ZeRO-3 through the Trainer
def test_trainer_zero3_matches_one_process(results, reference):
    # scripts/accelerate/ds_zero3.json with DeepSpeed's CPU accelerator. Same tolerance as FSDP2
    # (measured 1.4e-6); the codes are partitioned as int32, half of q_proj's 64 x 8 words per rank.
    run = results["zero3"]
    assert run["partition"] == ("torch.int32", 64 * 8 // WORLD)
    assert max(abs(a - b) for a, b in zip(_curve(run["losses"]), reference["losses"])) < 1e-4


def test_trainer_zero3_checkpoint_and_resume(results, folder):
    # The qat checkpoint of a ZeRO-3 run holds the whole trainable tensors (the Trainer alone would
    # hand rank 0 an empty state dict and fingerprint empty partitions): it loads into a model built
    # in one process and equals the FSDP2 run's checkpoint at the same step (measured 1.1e-7;
    # 1e-5 is fp32 round-off after 3 Adam updates of 3e-3, an empty or stale tensor is off by > 1e-3).
    from qat.trainers.checkpoint import load_checkpoint

    zero3 = folder / "zero3" / "checkpoint-3"
    load_checkpoint(R.build_model(), zero3)
    a = load_file(str(zero3 / "qat_trainable.safetensors"))
    b = load_file(str(folder / "FULL_STATE_DICT" / "checkpoint-3" / "qat_trainable.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # load_checkpoint into the partitioned ZeRO-3 model sets exactly the saved values, and only them.
    run = results["zero3"]
    assert all(torch.equal(run["loaded"][k], a[k]) for k in a)
    assert all(torch.equal(v, run["raw"][k]) for k, v in run["loaded"].items() if k not in a)
    # DeepSpeed's own checkpoint resumes the run: steps 4 and 5 repeat (measured identical).
    for step in (R.STEPS - 1, R.STEPS):
        assert run["resumed_losses"][step] == pytest.approx(run["losses"][step], abs=1e-6)


def test_trainer_zero3_export_equals_one_process_export(results, tmp_path):
    run = results["zero3"]
    single = _export_single_process(run["raw"], tmp_path / "single")
    assert (Path(run["export"]) / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()


# ------------------------------------------------------------------ the main job (qat.trainers.run)
@pytest.fixture(scope="module")
def single_job(results, folder):
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import run

    args = build_arguments(R.job_argv(folder, "job_single", per_device=R.GLOBAL_BATCH))
    run(args)
    return args


def _job_losses(folder: Path, name: str) -> list[float]:
    import json

    state = json.loads((folder / name / f"checkpoint-{R.JOB_STEPS}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_job_fsdp2_export_is_the_trained_parameters(results, folder, single_job, tmp_path):
    # The job's export (gathered layer by layer from the FSDP2 shards, written by rank 0) equals,
    # byte for byte, the one-process export of the trained parameters its last checkpoint holds.
    from qat.trainers.checkpoint import load_checkpoint
    from qat.trainers.run import attach_adapters, load_model, quantize

    rows = results["job"]["rows"]  # the QAT row is measured on the export reloaded by transformers
    assert results["job"]["steps"] == R.JOB_STEPS and rows["qat"]["loss"] < rows["post-training"]["loss"]
    model = load_model(str(folder / "model"), "causal_lm")
    quantize(single_job, model)
    attach_adapters(single_job, model, {})
    load_checkpoint(model, folder / "job_fsdp" / f"checkpoint-{R.JOB_STEPS}")
    mine = qat.export_model(model, tmp_path / "export") / "model.safetensors"
    assert (folder / "job_fsdp" / "export" / "model.safetensors").read_bytes() == mine.read_bytes()


def test_job_fsdp2_against_the_one_process_job(folder, single_job):
    # Same recipe, same global batches (sequential sampling), one process vs two. Not the same
    # bytes: the job's LoRA B starts at zero, so most step gradients are at fp32 round-off (93%
    # below 1e-8, 39% exactly 0) and the two summation orders give 0 in one run and ~6e-11 in the
    # other; AdamW turns 6e-11 into lr * 6e-11 / (6e-11 + eps) = 0.6% of an update. Measured: first
    # loss equal (no update yet), later losses within 8e-4; steps within 4.1e-4; 1.7% of codes
    # flipped (a step crossing a rounding boundary). Asserted: 1e-5 / 2e-3; each step within two
    # runs of JOB_STEPS updates of at most ~step lr in opposite directions; at most 5% of codes.
    a, b = _job_losses(folder, "job_fsdp"), _job_losses(folder, "job_single")
    assert len(a) == len(b) == R.JOB_STEPS and a[0] == pytest.approx(b[0], abs=1e-5)
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3
    fsdp = load_file(str(folder / "job_fsdp" / "export" / "model.safetensors"))
    single = load_file(str(folder / "job_single" / "export" / "model.safetensors"))
    assert fsdp.keys() == single.keys()
    bound = 2 * R.JOB_STEPS * single_job.step_learning_rate
    for key, t in single.items():
        if key.endswith("weight_packed"):
            codes = lambda w: unpack_int32(w, 4, w.shape[1] * 8)  # noqa: E731
            assert (codes(t) != codes(fsdp[key])).float().mean() <= 0.05, key
        elif key.endswith("weight_scale"):
            assert (fsdp[key].float() - t.float()).abs().max() <= bound, key
        else:
            assert torch.equal(fsdp[key], t), key  # frozen: embeddings, norms, head


# ------------------------------------------------------------------ bad input
def test_fsdp_that_accelerate_drops_is_refused(results):
    # accelerate as released, on CPU processes (use_cpu: MULTI_CPU), ignores the FSDP plugin and the
    # Trainer would train with DDP, every rank holding the whole model.
    assert "fsdp was requested but accelerate runs this job as MULTI_CPU" in results["dropped"]["fsdp"]


def test_deepspeed_without_use_cpu_is_refused(results):
    # Without use_cpu accelerate counts 1 process where DeepSpeed started 2; DeepSpeed itself would
    # stop later with "train_batch_size is not equal to micro_batch_per_gpu * ... 2 != 2 * 1 * 2".
    assert "DeepSpeed started 2 processes but accelerate counts 1" in results["dropped"]["deepspeed"]
