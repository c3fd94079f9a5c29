"""GPU benchmark: fused Triton quant-linear vs the torch reference vs bf16 F.linear + LoRA.

    python scripts/benchmarks/kernels_gpu.py                       # the default sweep
    python scripts/benchmarks/kernels_gpu.py --tokens 2048 --bits 3 --shapes 4096x4096

For each weight shape [out x in] and token count it times (median of --iters runs, CUDA events):
  fused_fwd   qat::quant_linear_fwd through Triton (W_hat tiles built inside the matmul)
  fused_dx    dX = grad_y @ W_hat through Triton
  ref_fwd     reference: unpack + dequant + fake-quant in torch, then F.linear
  dq+linear   Triton W_hat kernel, then cuBLAS F.linear (the unfused alternative)
  bf16+lora   plain bf16 F.linear over a dense weight plus a rank-r LoRA branch (the QLoRA-free
              baseline the fused kernel competes with)
and prints a table with the GPU's name. Needs CUDA and triton; ``--help`` works without either.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"],
                   help="weight shapes OUTxIN (default: %(default)s)")
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--bits", type=int, default=4, help="trained width (default 4)")
    p.add_argument("--storage-bits", type=int, default=None, help="base width (default = bits)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asymmetric", action="store_true")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the bf16 baseline")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    return p.parse_args(argv)


def _median_ms(fn, iters, warmup):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    from qat import primitives as P
    from qat.kernels import ops
    from qat.kernels import triton_kernels as TK
    from qat.packing import pack_int32

    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    storage = args.storage_bits or args.bits
    qmin, qmax = P.qrange(args.bits)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
          f"bits {args.bits} storage {storage} group {args.group_size} "
          f"{'asym' if args.asymmetric else 'sym'}  LoRA rank {args.rank}  median of {args.iters}")
    cols = ["shape", "tokens", "fused_fwd", "fused_dx", "ref_fwd", "dq+linear", "bf16+lora", "fwd vs bf16"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        g = args.group_size
        w = torch.randn(out_f, in_f, device=dev) * 0.02
        s0, z0 = P.init_absmax(w, storage, g, not args.asymmetric)
        codes = P.quantize_codes(w, s0, z0, storage, g)
        packed = pack_int32(codes, storage)
        scale = (s0 * 1.05).to(dtype)
        weight = (packed, s0, z0, scale, z0, None, storage, qmin, qmax, g, in_f, dtype)
        w_dense = w.to(dtype)
        lora_a = torch.randn(args.rank, in_f, device=dev, dtype=dtype) * 0.01
        lora_b = torch.randn(out_f, args.rank, device=dev, dtype=dtype) * 0.01
        for m in args.tokens:
            x = torch.randn(m, in_f, device=dev, dtype=dtype)
            gy = torch.randn(m, out_f, device=dev, dtype=dtype)
            t = {
                "fused_fwd": lambda: TK.quant_linear_fwd(x, *weight),
                "fused_dx": lambda: TK.quant_linear_dx(gy, *weight),
                "ref_fwd": lambda: F.linear(x, ops.reference_w_hat(*weight).to(dtype)),
                "dq+linear": lambda: F.linear(x, TK.dequant_fakequant(*weight)),
                "bf16+lora": lambda: F.linear(x, w_dense) + (x @ lora_a.t()) @ lora_b.t(),
            }
            ms = {k: _median_ms(fn, args.iters, args.warmup) for k, fn in t.items()}
            row = [shape, str(m)] + [f"{ms[k]:.3f}ms" for k in t] + [f"{ms['bf16+lora'] / ms['fused_fwd']:.2f}x"]
            print(" | ".join(f"{c:>11}" for c in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
