"""Multi-process worker for tests/distributed: run by ``torch.distributed.run`` with 2 CPU processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py OUT_DIR [scenario ...]

Scenarios: fsdp (FSDP2 without / with int8 / int4 quantized reduce-scatter, sharded export, DCP checkpoint),
rs (the quantized reduce-scatter on known tensors), deepspeed (ZeRO-3 and ZeRO-2 through
``deepspeed.initialize``), badworld (a mesh that does not fit the world size), zero3_job (the main job,
``qat.trainers.run``, with ``deepspeed: ds_zero3.json`` on OUT_DIR/model and OUT_DIR/data.txt; last,
since the job ends the process group).
Rank 0 saves everything the tests assert on to OUT_DIR/results.pt; the tests compare it with a
single-process reference computed in the pytest process.
"""

from __future__ import annotations

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

from tests.distributed import recipe as R  # noqa: E402


def global_loss(loss: torch.Tensor) -> float:
    """Mean of the per-rank losses = the global-batch loss (equal token counts per rank)."""
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def full_raw_params(model) -> dict[str, torch.Tensor]:
    """Every parameter, full, on CPU (test-only: a tiny model) to re-export in one process."""
    from qat.trainers.gather import full_parameters

    with full_parameters(model):
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def train_fsdp(quantized_grads, out: Path, rank: int, world: int) -> dict:
    from qat.trainers.fsdp import shard_model
    from qat.trainers.sharded_export import export_sharded

    model = shard_model(R.build_model(), quantized_grads=quantized_grads)
    opt = R.optimizer(model)
    losses, first_grads = [], None
    for ids in R.batches():
        loss = R.loss_of(model, R.local_rows(ids, rank, world))
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(global_loss(loss))
    result = dict(losses=losses, first_grads=first_grads)
    if quantized_grads is None:
        dtypes = {n: str(p.dtype) for n, p in model.named_parameters() if n.endswith("base_packed")}
        export_sharded(model, out / "fsdp_export")
        result.update(export=str(out / "fsdp_export"), raw=full_raw_params(model), code_dtypes=dtypes)
        result["dcp_export"] = str(checkpoint_round_trip(model, out))
    return result


def checkpoint_round_trip(model, out: Path) -> Path:
    """Save the sharded state with torch.distributed.checkpoint (what accelerate's FSDP2
    SHARDED_STATE_DICT writes), load it into a differently initialised sharded model, export."""
    import torch.distributed.checkpoint as dcp

    from qat.trainers.fsdp import shard_model
    from qat.trainers.sharded_export import export_sharded

    dcp.save(model.state_dict(), checkpoint_id=str(out / "dcp"))
    fresh = shard_model(R.build_model(seed=1))  # other weights, other codes
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    fresh.load_state_dict(state)
    return export_sharded(fresh, out / "fsdp_dcp_export")


def check_reduce_scatter(rank: int, world: int) -> dict:
    """Quantized vs exact reduce-scatter of known tensors, once and averaged over many draws."""
    from qat.trainers.comm import QuantizedReduceScatter

    group = dist.group.WORLD
    n = 1000  # not a multiple of the bucket: exercises the padding
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(world * n, generator=g) * torch.logspace(-3, 0, world * n)  # mixed magnitudes
    exact = torch.empty(n)
    dist.reduce_scatter_tensor(exact, x.clone(), op=dist.ReduceOp.SUM)
    inputs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(inputs, x)  # for the per-element bound in the test
    out = {"exact": exact, "inputs": inputs}
    for bits in (8, 4):
        comm = QuantizedReduceScatter(bits, bucket=64, seed=7, rank=rank)
        once = torch.empty(n)
        comm(once, x.clone(), group, dist.ReduceOp.SUM)
        mean = torch.zeros(n)
        draws = 400
        for _ in range(draws):
            y = torch.empty(n)
            comm(y, x.clone(), group, dist.ReduceOp.SUM)
            mean += y / draws
        avg = torch.empty(n)
        comm(avg, x.clone(), group, dist.ReduceOp.AVG)
        out[bits] = dict(once=once, mean=mean, draws=draws, avg=avg)
    return out


def ds_config(stage: int) -> dict:
    per_rank = R.GLOBAL_BATCH // dist.get_world_size()
    return {
        "train_batch_size": R.GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the same update as the reference
        "gradient_clipping": 0.0,
    }


def train_deepspeed(stage: int, out: Path, rank: int, world: int) -> dict:
    import deepspeed
    import deepspeed.ops

    from qat.trainers.deepspeed_utils import check_deepspeed_config, check_engine_codes, prepare_for_deepspeed
    from qat.trainers.sharded_export import export_sharded

    # The shared-memory all-reduce is a CPU-inference speedup that DeepSpeed JIT-compiles on first
    # use (a minute on a fresh machine); gloo carries the collectives here instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = R.build_model()
    config = check_deepspeed_config(ds_config(stage), model=model, world_size=world)
    prepare_for_deepspeed(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=R.optimizer(model), config=config)
    check_engine_codes(engine.module)
    losses = []
    for ids in R.batches():
        loss = engine(input_ids=R.local_rows(ids, rank, world), labels=R.local_rows(ids, rank, world)).loss
        engine.backward(loss)
        engine.step()
        losses.append(global_loss(loss))
    result = dict(losses=losses)
    if stage == 3:
        p = engine.module.model.layers[0].self_attn.q_proj.base_packed
        result["partition_dtype"] = str(p.ds_tensor.dtype)
        result["partition_numel"] = p.ds_tensor.numel()
        export_sharded(engine.module, out / "zero3_export")
        result.update(export=str(out / "zero3_export"), raw=full_raw_params(engine.module))
    return result


def run_zero3_job(out: Path) -> dict:
    """The main job through the Trainer's DeepSpeed path (no accelerate lift needed with use_cpu)."""
    import deepspeed.ops

    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import run

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see train_deepspeed
    config = Path(__file__).resolve().parents[2] / "scripts" / "accelerate" / "ds_zero3.json"
    argv = R.job_argv(out, "job_zero3", per_device=R.GLOBAL_BATCH // dist.get_world_size())
    return run(build_arguments(argv + ["--use_cpu", "true", "--deepspeed", str(config)]))


def bad_world(world: int) -> str:
    from qat.trainers.fsdp import default_mesh

    try:
        default_mesh((world + 1,), device_type="cpu")
    except ValueError as err:
        return str(err)
    return ""


def main() -> None:
    out = Path(sys.argv[1])
    scenarios = sys.argv[2:] or ["fsdp", "rs", "deepspeed", "badworld", "zero3_job"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    results: dict = {"world": world}
    if "badworld" in scenarios:
        results["badworld"] = bad_world(world)
    if "rs" in scenarios:
        results["rs"] = check_reduce_scatter(rank, world)
    if "fsdp" in scenarios:
        results["fsdp"] = {str(q): train_fsdp(q, out, rank, world) for q in (None, "int8", "int4")}
    if "deepspeed" in scenarios:
        results["deepspeed"] = {stage: train_deepspeed(stage, out, rank, world) for stage in (3, 2)}
    if "zero3_job" in scenarios:
        results["zero3_job"] = run_zero3_job(out)  # ends the process group, as the job does for users
    else:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main()
