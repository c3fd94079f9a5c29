"""Multi-process worker: QATTrainer's own FSDP2 path (accelerate's fsdp2_prepare_model) on 2 CPU processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/trainer_worker.py OUT_DIR

OUT_DIR holds ``model/`` (a tiny Llama + tokenizer) and ``data.txt`` for the main-job scenario, written
by the test first. accelerate refuses FSDP on CPU; :func:`cpu_accelerate.allow_fsdp_on_cpu` lifts
exactly that refusal (see its docstring). Scenarios, in one launch (process start-up is paid once):

- ``full`` / ``sharded``: the recipe of tests/distributed/recipe.py through QATTrainer with
  ``fsdp_config`` state_dict_type FULL_STATE_DICT (transformers' default) / SHARDED_STATE_DICT
  (accelerate's fsdp2 default, scripts/accelerate/fsdp2.yaml): losses, first-step gradients, a
  checkpoint at step 3, then a second Trainer (other trainable values) resumed from it;
- ``int8``: ``quantized_grads: int8`` installed by the Trainer;
- ``bf16``: ``bf16: true`` (accelerate's FSDP2 MixedPrecisionPolicy, bf16 compute and reduction);
- ``zero3``: ``deepspeed=scripts/accelerate/ds_zero3.json`` (DeepSpeed's CPU accelerator, gloo; no
  lift needed with ``use_cpu``): losses,
  codes partitioned as int32, qat checkpoint and DeepSpeed's own at step 3, resume, export;
- ``dropped``: accelerate as released: FSDP2 with ``use_cpu`` (accelerate drops it) and ZeRO-3 without
  (accelerate counts one process): QATTrainer's errors;
- ``job``: ``qat.trainers.run`` (the main job) with FSDP2, written to OUT_DIR/job_fsdp (last: it ends the
  process group, as the job does).
Rank 0 saves what the tests assert on to OUT_DIR/trainer_results.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.` imports;
# last, so its kernels/ folder cannot shadow the PyPI package `kernels` transformers imports

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests.distributed import recipe as R  # noqa: E402
from tests.distributed.cpu_accelerate import accelerate_as_shipped, allow_fsdp_on_cpu  # noqa: E402

RESUME_AT = 3


class FirstGrads(TrainerCallback):
    """The first step's averaged gradients, made whole (a collective: runs on every rank)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}


def recipe_args(out: Path, **kw):
    from qat.trainers.arguments import QATArguments

    base = dict(output_dir=str(out), use_cpu=True, fsdp=True, fsdp_config=dict(R.FSDP2_CONFIG),
                per_device_train_batch_size=R.GLOBAL_BATCH // dist.get_world_size(), max_steps=R.STEPS,
                learning_rate=R.LR, lr_scheduler_type="constant", weight_decay=0.0, adapter="none",
                logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True)
    return QATArguments(**{**base, **kw})


def recipe_trainer(args, scale: float = 1.0):
    """QATTrainer on recipe.build_model; ``scale`` != 1 multiplies every trainable tensor (a resumed
    run must overwrite them from the checkpoint)."""
    from datasets import Dataset

    from qat.trainers.trainer import QATTrainer

    model = R.build_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(scale)
    ids = R.batches(1)[0].tolist()  # the global batch: one step of 2 x 2 rows is the whole dataset
    return QATTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))


def losses_of(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def train_and_resume(out: Path, state_dict_type: str) -> dict:
    from qat.trainers.sharded_export import export_sharded
    from tests.distributed.worker import full_raw_params

    config = {**R.FSDP2_CONFIG, "state_dict_type": state_dict_type}
    run_dir = out / state_dict_type
    trainer = recipe_trainer(recipe_args(run_dir, fsdp_config=config, save_strategy="steps", save_steps=RESUME_AT))
    grads = FirstGrads()
    trainer.add_callback(grads)
    trainer.train()
    checkpoint = run_dir / f"checkpoint-{RESUME_AT}"
    result = dict(losses=losses_of(trainer), first_grads=grads.grads, files=sorted(os.listdir(checkpoint)),
                  code_dtypes={str(p.dtype) for n, p in trainer.model.named_parameters() if n.endswith("base_packed")})
    result["export"] = str(export_sharded(trainer.model, out / f"export_{state_dict_type}"))
    result["raw"] = full_raw_params(trainer.model)
    resumed = recipe_trainer(recipe_args(out / f"resumed_{state_dict_type}", fsdp_config=config), scale=1.5)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    result["resumed_losses"] = losses_of(resumed)
    return result


def train_int8(out: Path) -> dict:
    from qat.trainers.comm import QuantizedReduceScatter
    from qat.trainers.fsdp import fsdp_modules

    trainer = recipe_trainer(recipe_args(out / "int8", quantized_grads="int8"))
    trainer.train()
    groups = [g for m in fsdp_modules(trainer.model) for g in m._get_fsdp_state()._fsdp_param_groups]
    hooked = sum(isinstance(g._reduce_scatter_comm, QuantizedReduceScatter) for g in groups)
    return dict(losses=losses_of(trainer), fsdp_groups=len(groups), hooked=hooked)


def train_bf16(out: Path) -> dict:
    trainer = recipe_trainer(recipe_args(out / "bf16", bf16=True))
    trainer.train()
    dtypes = {n: str(p.dtype) for n, p in trainer.model.named_parameters()}
    return dict(losses=losses_of(trainer), mixed_precision=trainer.accelerator.mixed_precision,
                codes={d for n, d in dtypes.items() if n.endswith("base_packed")},
                trainable={str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})


def train_zero3(out: Path) -> dict:
    import deepspeed.ops

    from qat.trainers.checkpoint import load_checkpoint
    from qat.trainers.sharded_export import export_sharded
    from tests.distributed.worker import full_raw_params

    # DeepSpeed's shared-memory all-reduce JIT-compiles on first use (minutes); gloo carries it here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = str(Path(__file__).resolve().parents[2] / "scripts" / "accelerate" / "ds_zero3.json")
    try:
        trainer = recipe_trainer(recipe_args(out / "zero3", fsdp=None, fsdp_config=None, deepspeed=config,
                                             save_strategy="steps", save_steps=RESUME_AT))
        trainer.train()
        codes = trainer.model.model.layers[0].self_attn.q_proj.base_packed.ds_tensor
        result = dict(losses=losses_of(trainer), partition=(str(codes.dtype), codes.numel()))
        result["export"] = str(export_sharded(trainer.model, out / "export_zero3"))
        result["raw"] = full_raw_params(trainer.model)
        # load_checkpoint into the partitioned model (what _load_best_model does): rank 0's values
        # re-partitioned by DeepSpeed
        load_checkpoint(trainer.model, out / "zero3" / f"checkpoint-{RESUME_AT}")
        result["loaded"] = full_raw_params(trainer.model)
        resumed = recipe_trainer(recipe_args(out / "resumed_zero3", fsdp=None, fsdp_config=None, deepspeed=config),
                                 scale=1.5)
        resumed.train(resume_from_checkpoint=str(out / "zero3" / f"checkpoint-{RESUME_AT}"))
        result["resumed_losses"] = losses_of(resumed)
    finally:  # accelerate leaves this set, and TrainingArguments would then build DeepSpeed for the job too
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    return result


def dropped_engines(out: Path) -> dict:
    """What QATTrainer says when accelerate (unpatched) drops the FSDP / DeepSpeed request on CPU."""
    config = str(Path(__file__).resolve().parents[2] / "scripts" / "accelerate" / "ds_zero3.json")
    asks = {"fsdp": {}, "deepspeed": dict(fsdp=None, fsdp_config=None, deepspeed=config, use_cpu=False)}
    errors = {}
    try:
        for name, kw in asks.items():
            with accelerate_as_shipped():
                try:
                    recipe_trainer(recipe_args(out / f"dropped_{name}", **kw))
                    errors[name] = ""
                except ValueError as err:
                    errors[name] = str(err)
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # see train_zero3
    return errors


def run_job(out: Path) -> dict:
    """The main job with FSDP2; in YAML (the command line's syntax) the fsdp_config is a JSON object."""
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import run

    argv = R.job_argv(out, "job_fsdp", per_device=R.GLOBAL_BATCH // dist.get_world_size())
    argv += ["--use_cpu", "true", "--fsdp", "true", "--fsdp_config", json.dumps(R.FSDP2_CONFIG)]
    return run(build_arguments(argv))


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    allow_fsdp_on_cpu()
    torch.manual_seed(0)
    results: dict = {}
    for kind in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
        results[kind] = train_and_resume(out, kind)
    results["int8"] = train_int8(out)
    results["bf16"] = train_bf16(out)
    results["zero3"] = train_zero3(out)
    results["dropped"] = dropped_engines(out)
    rank = dist.get_rank()
    results["job"] = run_job(out)  # ends the process group
    if rank == 0:
        torch.save(results, out / "trainer_results.pt")


if __name__ == "__main__":
    main()
