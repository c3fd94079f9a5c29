"""The one GPU session script: correctness, then timings, then a short bf16 training run.

    python scripts/benchmarks/gpu_check.py            # on one GPU, < 8 minutes end to end
    python scripts/benchmarks/gpu_check.py --smoke    # CPU, tiny shapes, Triton interpreter

Three stages, each through the path users get (QuantLinear under the default kernel mode,
"auto": the ``torch.library`` ops ``qat::*`` on CUDA, kernels/ops.py), stopping at the first
failure:

  1. correctness  ``pytest -m gpu tests/gpu``: the public path against the reference path on
                  this GPU, compiled (the CI suite runs the kernels only in the interpreter)
  2. timings      scripts/benchmarks/kernels_gpu.py on a short sweep (two Llama-7B-like shapes,
                  two token counts, 10 iterations): the fused step vs the reference, bf16 + LoRA
                  and bitsandbytes NF4 + LoRA
  3. training     a ~1B-shaped Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 5632,
                  vocab 32000; random init from the config, no download) in bf16, W4 g128 with an
                  inside LoRA of rank 16 on every linear layer, trained --train-steps AdamW steps
                  on the same random token batches twice: once under "auto" (the kernels), once
                  under "reference". Reports ms / step, peak GPU memory and both loss curves;
                  the curves must agree (the same model, data and seed; only the summation order
                  of the matmuls differs, so they drift apart slowly: --loss-tol, default 2%
                  relative at every step).

Writes docs/benchmarks/gpu_check.md and .json (the figures with the GPU's name). With --smoke
every stage runs on the CPU at toy sizes under TRITON_INTERPRET=1 and use_kernels("triton")
(tests/benchmarks/test_gpu_check.py does so, so a lent GPU's minutes are not spent on a script
error); its figures mean nothing and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, as the other scripts

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048)
LLAMA_TOY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, Triton interpreter")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--loss-tol", type=float, default=0.02,
                   help="largest relative gap allowed between the two loss curves")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "timings", "training"])
    return p.parse_args(argv)


def run_stage(cmd: list[str], env: dict) -> tuple[float, str]:
    """Run one stage's command; (seconds it took, its stdout), printed as well. Exits on failure."""
    start = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        print(done.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"stage failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start, done.stdout


def train_curve(mode: str, args, device: str, dtype) -> dict:
    """Losses, ms / step and peak memory of --train-steps AdamW steps under kernel ``mode``."""
    import torch
    import transformers

    from qat import QuantConfig, quantize_model
    from qat.adapters import AdapterConfig, attach
    from qat.kernels import dispatch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(LLAMA_TOY if args.smoke else LLAMA_1B))
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    quantize_model(model, QuantConfig(bits=4, group_size=32 if args.smoke else 128, init="rtn"))
    attach(model, AdapterConfig(kind="lora", rank=4 if args.smoke else 16, placement="inside"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
               for _ in range(args.train_steps)]
    losses, times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with dispatch.use_kernels(mode):
        for ids in batches:
            ids = ids.to(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    steady = sorted(times[2:] or times)  # the first steps compile / autotune
    return {"mode": mode, "losses": losses, "ms_per_step": steady[len(steady) // 2], "peak_gib": peak,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.smoke:
        args.train_steps, args.batch, args.seq = min(args.train_steps, 3), 2, 16
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device (--smoke: a CPU run of the script itself)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    started = time.perf_counter()
    seconds, outputs = {}, {}
    if "tests" not in args.skip:
        target = ["tests/gpu", "--co"] if args.smoke else ["tests/gpu"]  # no CUDA: collect only
        seconds["tests"], outputs["tests"] = run_stage([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "-m", "gpu", *target], env)
    if "timings" not in args.skip:
        sweep = (["--device", "cpu", "--shapes", "48x64", "--tokens", "16", "--iters", "1", "--warmup", "0",
                  "--group-size", "32", "--rank", "4", "--pack-shapes", "8x40", "--pack-bits", "3"]
                 if args.smoke else
                 ["--shapes", "4096x4096", "4096x11008", "--tokens", "2048", "8192", "--iters", "10",
                  "--warmup", "3", "--pack-shapes", "4096x11008", "--pack-bits", "3", "4"])
        seconds["timings"], outputs["timings"] = run_stage([sys.executable, str(ROOT / "scripts" / "benchmarks" / "kernels_gpu.py"),
                                        *sweep], env)
    curves = {}
    if "training" not in args.skip:
        start = time.perf_counter()
        kernel_mode = "triton" if args.smoke else "auto"
        for mode in (kernel_mode, "reference"):
            curves[mode] = train_curve(mode, args, device, torch.float32 if args.smoke else torch.bfloat16)
            c = curves[mode]
            print(f"training under {mode!r}: {c['params'] / 1e9:.2f}B params, {c['ms_per_step']:.1f} ms/step, "
                  f"peak {c['peak_gib']:.1f} GiB, losses {' '.join(f'{v:.3f}' for v in c['losses'])}", flush=True)
        seconds["training"] = time.perf_counter() - start
        kern, ref = curves[kernel_mode]["losses"], curves["reference"]["losses"]
        gap = max(abs(a - b) / abs(b) for a, b in zip(kern, ref))
        print(f"largest relative loss gap kernels vs reference: {gap:.2e} (allowed {args.loss_tol})")
        if gap > args.loss_tol:
            raise SystemExit("the kernel path's loss curve left the reference's")
    total = time.perf_counter() - started
    print(f"stages (s): {json.dumps({k: round(v, 1) for k, v in seconds.items()})}; total {total:.0f} s")
    if not args.smoke:
        from bench_common import machine, write_results

        lines = [f"# GPU check ({machine()})", "", f"Command: `python scripts/benchmarks/gpu_check.py`",
                 f"Total {total:.0f} s; stages (s): {json.dumps({k: round(v, 1) for k, v in seconds.items()})}", ""]
        for mode, c in curves.items():
            lines.append(f"- training under {mode!r}: {c['ms_per_step']:.1f} ms/step, peak {c['peak_gib']:.1f} GiB")
        for stage, text in outputs.items():
            lines += ["", f"## {stage}", "", "```", text.strip()[-6000:], "```"]
        write_results("gpu_check", "\n".join(lines), {"seconds": seconds, "curves": curves, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
