"""Bytes all-gathered and reduce-scattered per FSDP2 training step: bf16 vs qat (packed) vs qat + int8/int4 grads.

    python -m torch.distributed.run --nproc_per_node 2 scripts/benchmarks/comm_bytes.py [--markdown OUT.md]

Counts come from wrapping ``torch.distributed``'s collectives (``qat.trainers.comm.
count_collective_bytes``) around one training step after a warm-up step: all-gather = the
gathered (unsharded) buffers, reduce-scatter = the unsharded gradient buffers each rank feeds
in (for the quantized hook: its all-to-all payload, codes + one fp32 step per bucket).
They depend on the model and the policy, not on the hardware, so CPU + gloo measures what a
GPU + NCCL run moves.

Model: a Llama with the shape of a small real one (hidden 1024, 8 blocks, vocabulary 8192).
Runs, all under MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16) as accelerate sets up
for ``mixed_precision: bf16``:
  bf16 FSDP2          the float model, every parameter trained (plain bf16 sharding)
  bf16 FSDP2 (LoRA)   the float model, frozen, LoRA rank 16 (peft) on every projection
  qat FSDP2           4-bit packed base (group 128 or 32), trainable steps + inside LoRA rank 16
  qat + int8 / int4   the same with the quantized gradient reduce-scatter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402

from qat.adapters import AdapterConfig, attach  # noqa: E402
from qat.config import QuantConfig  # noqa: E402
from qat.surgery import quantize_model  # noqa: E402
from qat.trainers.comm import count_collective_bytes  # noqa: E402
from qat.trainers.fsdp import shard_model  # noqa: E402

CONFIG = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
BATCH, SEQ, RANK = 1, 64, 16
# --tiny: the same runs on a toy model, for the smoke test (tests/benchmarks); figures meaningless.
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def float_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).train()


def qat_model(group_size: int) -> torch.nn.Module:
    model = quantize_model(float_model(), QuantConfig(bits=4, group_size=group_size, init="rtn"))
    attach(model, AdapterConfig(kind="lora", rank=RANK, placement="inside"))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("weight_scale", "lora_A", "lora_B")))
    return model


def lora_float_model() -> torch.nn.Module:
    import peft

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(float_model(), peft.LoraConfig(r=RANK, lora_alpha=32, target_modules=targets))


def root_gather_bytes(model, block: type, world: int) -> int:
    """Bytes of one all-gather of the root unit (embeddings, final norm, head: everything outside
    the blocks), as FSDP2 lays it out: dim 0 padded to a multiple of the world size, floats in bf16."""
    in_block = {id(p) for m in model.modules() if isinstance(m, block) for p in m.parameters()}
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in in_block:
            continue
        rows = -(-p.shape[0] // world) * world
        size = 2 if p.is_floating_point() else p.element_size()
        total += rows * (p.numel() // max(p.shape[0], 1)) * size
    return total


def measure(model, quantized_grads=None) -> dict:
    """Bytes moved by the second of two training steps (the first pays lazy-init collectives)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    block = type(model.get_decoder().layers[0])
    root = root_gather_bytes(model, block, dist.get_world_size())
    model = shard_model(model, quantized_grads=quantized_grads, mp_policy=mp, block_classes=(block,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(dist.get_rank()))
    for step in range(2):
        with count_collective_bytes() as counts:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    counts = dict(counts)
    # The blocks' share: every all-gather except the root unit's (identified by its exact size).
    root_calls = sum(1 for n in counts.get("all_gather_sizes", []) if n == root)
    counts["all_gather_blocks"] = counts.get("all_gather", 0) - root * root_calls
    return counts


def runs():
    yield "bf16 FSDP2, full fine-tune", float_model, None
    yield "bf16 FSDP2, LoRA r16 (peft)", lora_float_model, None
    for g in (128, 32):
        yield f"qat FSDP2, 4-bit g{g} packed base", lambda g=g: qat_model(g), None
        yield f"qat FSDP2, 4-bit g{g} + int8 grads", lambda g=g: qat_model(g), "int8"
        yield f"qat FSDP2, 4-bit g{g} + int4 grads", lambda g=g: qat_model(g), "int4"


def table(rows: list[dict], world: int) -> str:
    base = rows[0]
    lora = rows[1]
    lines = [
        f"World size {world}, model {CONFIG['num_hidden_layers']} blocks x hidden {CONFIG['hidden_size']}, "
        f"vocabulary {CONFIG['vocab_size']}; bytes per rank per training step.",
        "",
        "| run | all-gather MB | vs bf16 | blocks only MB | vs bf16 | reduce-scatter MB | vs bf16 full | vs bf16 LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rs = r["reduce_scatter"] + r["all_to_all"]
        lines.append(
            f"| {r['name']} | {r['all_gather'] / 1e6:.2f} | {r['all_gather'] / base['all_gather']:.3f}x | "
            f"{r['all_gather_blocks'] / 1e6:.2f} | {r['all_gather_blocks'] / base['all_gather_blocks']:.3f}x | "
            f"{rs / 1e6:.3f} | {rs / base['reduce_scatter']:.4f}x | {rs / lora['reduce_scatter']:.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the table (and the raw counts as JSON beside it)")
    parser.add_argument("--tiny", action="store_true", help="a toy model (smoke test; figures meaningless)")
    args = parser.parse_args()
    if args.tiny:
        CONFIG.update(TINY)
    dist.init_process_group("gloo")
    rows = []
    for name, build, quantized_grads in runs():
        counts = measure(build(), quantized_grads)
        rows.append(dict(name=name, all_gather=counts.get("all_gather", 0), all_gather_blocks=counts["all_gather_blocks"],
                         reduce_scatter=counts.get("reduce_scatter", 0), all_to_all=counts.get("all_to_all", 0)))
        if dist.get_rank() == 0:
            print(rows[-1], flush=True)
    if dist.get_rank() == 0:
        text = table(rows, dist.get_world_size())
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"
        print(text + f"\n\nMeasured on: {machine}")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + f"\n\nMeasured on: {machine}\n")
            with open(os.path.splitext(args.markdown)[0] + ".json", "w") as f:
                json.dump(dict(config=CONFIG, world=dist.get_world_size(), rows=rows), f, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """Leave without interpreter finalization. Even after destroy_process_group, a gloo worker thread
    can still hold tensors whose destruction takes the GIL while the interpreter is being torn down:
    one rank then dies with "terminate called without an active exception" (SIGABRT) after all its
    work is written (seen in 1 of 3 clean-clone CI runs; the c10d fix, pytorch PR 179291, was
    abandoned). Everything is flushed first, so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
