"""GPU benchmark: fused Triton quant-linear vs the torch reference vs bf16 / bitsandbytes + LoRA.

    python scripts/benchmarks/kernels_gpu.py                       # the default sweep
    python scripts/benchmarks/kernels_gpu.py --tokens 2048 --bits 3 --shapes 4096x4096
    python scripts/benchmarks/kernels_gpu.py --peak-tflops 989 --peak-gbps 3350   # roofline columns

For each weight shape it first checks the kernels against the torch reference at the first token
count (codes, y, dX, step and LoRA gradients; it stops on a mismatch: the first GPU run is also
the first compiled-kernel correctness run), then for each token count it times (median of
--iters runs, CUDA events):

  forward (inside LoRA of rank --rank on the quantized layer)
    fwd_inD      qat::quant_linear_fwd through Triton, D = scaling * B A formed per tile in
                 registers from the factors (what dispatch runs for a plain LoRA)
    fwd_denseD   the same kernel reading a dense fp32 D, including building D = (B @ A) * scaling
                 in torch first (what dispatch ran before the in-kernel D)
    ref_fwd      reference: unpack + dequant + fake-quant in torch, then F.linear
    dq+linear    Triton W_hat kernel (in-kernel D), then cuBLAS F.linear (the unfused alternative)
  backward
    dx_inD       dX = grad_y @ W_hat through Triton, in-kernel D
    dx_denseD    the same from a dense D built in torch (timed with the build)
    grads_inD    qat::quant_linear_grads through Triton, in-kernel D: step / zero-point
                 gradients and LoRA dA, dB from G = grad_y^T x reduced tile by tile (no dense
                 G, W_hat or D)
    grads_denseD the same reading a dense D built in torch (timed with the build)
    ref_grads    the op's torch reference: dense W0 + D, G, the LSQ formulas, dA / dB
  a whole training step of the layer (forward + backward, LoRA inside)
    step_fused   QuantLinear with use_kernels("triton")
    step_ref     QuantLinear with use_kernels("reference") (autograd through the dense W_hat)
    step_bf16    bf16 F.linear over a dense frozen weight + a trainable LoRA branch (baseline c)
    step_bnb     bitsandbytes NF4 Linear4bit + the same LoRA branch (baseline b; "n/a" when
                 bitsandbytes is missing or fails)

and prints a table with the GPU's name, plus the ratios the issue's targets are stated in
(fused step vs bnb: target >= 2x; vs bf16: target <= 1.3x), and "inD gain": the dense-D
forward + dX + grads time over the in-kernel-D one (> 1: forming D in registers pays). With
--peak-tflops / --peak-gbps it adds the fraction of the matmul roofline (2MNK flops for the
forward, 4MNK for dX + G) and of memory bandwidth (the bytes each fused kernel must move at
least) reached.
A second table (--no-wht skips it) covers, for the shapes whose `in` has a Walsh-Hadamard size,
the outside WHT adapter at the LoRA parameter count r * (in + out), fp32 values, 16-bit
activations:

  wht: fwht_kern   the one-pass Triton transform z = c/n x H^T (qat::fwht, fp32 out)
       fwht_torch  the torch reference transform (GEMM-blocked fwht in fp32)
       fwd_kern / fwd_torch    adapter forward: transform + CSR sparse projection
       step_kern / step_torch  adapter forward + backward (d values, dx)
       step_lora   an outside LoRA branch of rank r (the same parameter count), forward + backward
       kern GB/s   bytes the transform must move (x read, z written once) per fwht_kern time

A third table (--no-pack skips it; --pack-only runs it alone) times packing the base and the
export, codes [out, in] int8 <-> int32 words (qat.packing's layout), for --pack-shapes and
--pack-bits (straddling widths included: 3):

  pack: pack_kern / pack_ref      qat::pack_int32's Triton kernel vs qat.packing.pack_int32
        unpack_kern / unpack_ref  the same for unpack_int32 (what the reference path runs on
                                  every forward and backward)
        GB/s                      codes (1 byte each) + words (4 bytes each) moved once, per time
  Each case first checks that the kernel's words and codes equal the reference's.

Needs CUDA and triton; ``--help`` works without either. ``--device cpu`` runs every table under
the Triton interpreter (TRITON_INTERPRET=1 must be set before start) with wall-clock timers: the
figures mean nothing, it checks that the script itself runs (tests/benchmarks does this on tiny
shapes, so a lent GPU's time is not spent on a script error).
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (inside the quantized layer, "
                   "and the branch of the bf16 / bnb baselines)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense 16-bit matmul peak, for the roofline fraction")
    p.add_argument("--peak-gbps", type=float, default=None, help="the GPU's memory bandwidth, GB/s")
    p.add_argument("--no-wht", action="store_true", help="skip the outside WHT adapter table")
    p.add_argument("--no-pack", action="store_true", help="skip the pack / unpack table")
    p.add_argument("--pack-only", action="store_true", help="run only the pack / unpack table")
    p.add_argument("--pack-shapes", nargs="+", default=["4096x4096", "4096x11008"],
                   help="code shapes OUTxIN for the pack table (default: %(default)s)")
    p.add_argument("--pack-bits", nargs="+", type=int, default=[2, 3, 4, 8],
                   help="code widths for the pack table (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run under TRITON_INTERPRET=1 (timings meaningless)")
    return p.parse_args(argv)


def _median_ms(fn, iters, warmup):
    import time

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():  # --device cpu smoke run: wall clock
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _layer(out_f, in_f, args, dtype, dev):
    """A QuantLinear (bf16 steps) over a random base with an inside LoRA of rank --rank."""
    import torch
    from torch import nn

    from qat.adapters.lora import LoRAAdapter
    from qat.config import LayerSpec
    from qat.quant_linear import QuantLinear

    linear = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    spec = LayerSpec(bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric,
                     storage_bits=args.storage_bits, init="rtn")
    layer = QuantLinear.from_linear(linear, spec)
    lora = LoRAAdapter(in_f, out_f, rank=args.rank, alpha=2 * args.rank, device=dev)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.01)
    layer.adapter = lora
    return layer, linear.weight.detach()


def _bnb_step(w_dense, lora_a, lora_b, scaling, dtype, dev):
    """A training step of bitsandbytes NF4 + LoRA, or None when bitsandbytes is unusable."""
    try:
        import bitsandbytes as bnb
        import torch

        out_f, in_f = w_dense.shape
        base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(w_dense.cpu(), requires_grad=False, quant_type="nf4")
        base = base.to(dev)

        def step(x, gy):
            y = base(x) + (x @ lora_a.t()) @ lora_b.t() * scaling
            y.backward(gy)

        return step
    except Exception as err:  # missing package, no kernels for this GPU, API drift
        print(f"bitsandbytes baseline skipped: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def check_against_reference(x, gy, fused, weight, lora_args, lsq):
    """Before timing a shape: the compiled kernels against the torch reference, so the first GPU
    run is also a correctness run (the CI tests only ever run the kernels in the interpreter).
    Raises on a mismatch. Tolerances, relative to each tensor's largest entry:
      codes   only rounding-boundary flips: the in-register D rounds apart from torch's B @ A
              (docs/KERNELS.md, "Exactness"), at most 1e-4 of the codes
      y, dX   2e-2: both sides round to the 16-bit activation dtype (2^-8 relative) and sum in
              different orders; a wrong tile or step is off by O(1)
      grads   1e-2: the reference gets fp32 copies of grad_y and x, so both sides form
              G = grad_y^T x in fp32 from the same (exact) products and differ only in summation
              order, ~T u relative (3e-5 at 512 tokens); a wrong group sum or mask is off by O(1)
    Returns a one-line summary."""
    import torch
    import torch.nn.functional as F

    from qat.kernels import ops
    from qat.kernels import triton_kernels as TK

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()

    codes_k, codes_r = TK.quant_codes(*fused), ops.reference_codes(*fused)
    flipped = (codes_k != codes_r).sum().item()
    w_ref = ops.reference_w_hat(*fused).to(x.dtype)
    errs = {"y": rel(TK.quant_linear_fwd(x, *fused), F.linear(x, w_ref)),
            "dX": rel(TK.quant_linear_dx(gy, *fused), gy @ w_ref)}
    got = TK.quant_linear_grads(gy, x, *weight, lsq, *lora_args, False)
    want = ops.reference_grads(gy.float(), x.float(), *weight, lsq, *lora_args, False)
    for name, i in (("d step", 0), ("dA", 3), ("dB", 4)):
        errs[name] = rel(got[i], want[i])
    bad = [k for k, e in errs.items() if e > (2e-2 if k in ("y", "dX") else 1e-2)]
    if flipped > 1e-4 * codes_r.numel() or bad:
        raise SystemExit(f"kernel check failed: {flipped} of {codes_r.numel()} codes differ; "
                         f"relative errors {errs}")
    return (f"check: {flipped} of {codes_r.numel()} codes differ; "
            + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA device (--device cpu: an interpreter smoke run)", file=sys.stderr)
        return 2
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if args.pack_only:
        pack_table(args, dev)
        return 0
    from qat import primitives as P
    from qat.kernels import dispatch, ops
    from qat.kernels import triton_kernels as TK

    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU, Triton interpreter (smoke run)"
    print(f"GPU: {device_name}  torch {torch.__version__}  dtype {args.dtype}  "
          f"bits {args.bits} storage {args.storage_bits or args.bits} group {args.group_size} "
          f"{'asym' if args.asymmetric else 'sym'}  LoRA rank {args.rank}  median of {args.iters}")
    timed = ["fwd_inD", "fwd_denseD", "ref_fwd", "dq+linear", "dx_inD", "dx_denseD", "grads_inD",
             "grads_denseD", "ref_grads", "step_fused", "step_ref", "step_bf16", "step_bnb"]
    cols = ["shape", "tokens", *timed, "vs bnb", "vs bf16", "inD gain"]
    if args.peak_tflops:
        cols += ["fwd %mm", "bwd %mm"]
    if args.peak_gbps:
        cols += ["fwd %bw"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        layer, w_dense = _layer(out_f, in_f, args, dtype, dev)
        lora = layer.adapter
        fused = dispatch.kernel_args(layer)              # weight args (no D) + the LoRA factors
        weight, lora_args = fused[:12], fused[12:]
        lsq = P.lsq_grad_scale(layer.group_size, args.bits)

        def dense():
            """Weight args with a dense D built in torch now, as dispatch did before the
            in-kernel D (so the dense-D rows pay for the build, as training did)."""
            with torch.no_grad():
                return dispatch.weight_args(layer, lora.delta_weight())
        # bf16 / bnb baselines: a frozen dense weight plus a trainable LoRA branch
        a16 = lora.lora_A.detach().to(dtype).clone().requires_grad_()
        b16 = lora.lora_B.detach().to(dtype).clone().requires_grad_()
        bnb_step = _bnb_step(w_dense, a16, b16, lora.scaling, dtype, dev)
        for m in args.tokens:
            x = torch.randn(m, in_f, device=dev, dtype=dtype)
            gy = torch.randn(m, out_f, device=dev, dtype=dtype)
            xg = x.clone().requires_grad_()
            if m == args.tokens[0]:
                print(f"{shape}: " + check_against_reference(x, gy, fused, weight, lora_args, lsq), flush=True)

            def step(mode):
                with dispatch.use_kernels(mode):
                    layer(xg).backward(gy)

            def step_bf16():
                y = F.linear(xg, w_dense) + (xg @ a16.t()) @ b16.t() * lora.scaling
                y.backward(gy)

            t = {
                "fwd_inD": lambda: TK.quant_linear_fwd(x, *fused),
                "fwd_denseD": lambda: TK.quant_linear_fwd(x, *dense()),
                "ref_fwd": lambda: F.linear(x, ops.reference_w_hat(*fused).to(dtype)),
                "dq+linear": lambda: F.linear(x, TK.dequant_fakequant(*fused)),
                "dx_inD": lambda: TK.quant_linear_dx(gy, *fused),
                "dx_denseD": lambda: TK.quant_linear_dx(gy, *dense()),
                "grads_inD": lambda: TK.quant_linear_grads(gy, x, *weight, lsq, *lora_args, False),
                "grads_denseD": lambda: TK.quant_linear_grads(gy, x, *dense(), lsq, *lora_args, False),
                "ref_grads": lambda: ops.reference_grads(gy, x, *weight, lsq, *lora_args, False),
                "step_fused": lambda: step("triton"),
                "step_ref": lambda: step("reference"),
                "step_bf16": step_bf16,
            }
            if bnb_step is not None:
                t["step_bnb"] = lambda: bnb_step(xg, gy)
            ms = {k: _median_ms(fn, args.iters, args.warmup) for k, fn in t.items()}
            row = [shape, str(m)] + [f"{ms[k]:.3f}ms" if k in ms else "n/a" for k in timed]
            row.append(f"{ms['step_bnb'] / ms['step_fused']:.2f}x" if "step_bnb" in ms else "n/a")
            row.append(f"{ms['step_fused'] / ms['step_bf16']:.2f}x")
            in_d = ms["fwd_inD"] + ms["dx_inD"] + ms["grads_inD"]
            row.append(f"{(ms['fwd_denseD'] + ms['dx_denseD'] + ms['grads_denseD']) / in_d:.2f}x")
            flops = 2.0 * m * out_f * in_f
            if args.peak_tflops:
                peak = args.peak_tflops * 1e12
                row.append(f"{flops / (ms['fwd_inD'] * 1e-3) / peak:.0%}")
                bwd_ms = ms["dx_inD"] + ms["grads_inD"]
                row.append(f"{2 * flops / (bwd_ms * 1e-3) / peak:.0%}")
            if args.peak_gbps:
                # least traffic of the forward: x and y once, the packed codes, steps and LoRA
                # factors once (no D: it never leaves registers)
                act = torch.finfo(dtype).bits // 8
                nbytes = (m * (in_f + out_f) * act + weight[0].numel() * 4
                          + 2 * weight[1].numel() * weight[1].element_size()
                          + sum(t.numel() * t.element_size() for t in lora_args[:2]))
                row.append(f"{nbytes / (ms['fwd_inD'] * 1e-3) / (args.peak_gbps * 1e9):.0%}")
            print(" | ".join(f"{c:>11}" for c in row), flush=True)
    if not args.no_wht:
        wht_outside_table(args, dtype, dev)
    if not args.no_pack:
        pack_table(args, dev)
    return 0


def pack_table(args, device="cuda"):
    """Pack / unpack timings (the "pack:" block of the module docstring)."""
    import torch

    from qat import packing
    from qat.kernels import packing_kernels as PK

    cols = ["shape", "bits", "pack_kern", "pack_ref", "pack GB/s", "unpack_kern", "unpack_ref",
            "unpack GB/s", "pack gain", "unpack gain"]
    print("\npack / unpack, codes [out, in] int8 <-> int32 words along `in`")
    print(" | ".join(f"{c:>11}" for c in cols))
    for shape in args.pack_shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        for bits in args.pack_bits:
            half = 1 << (bits - 1)
            codes = torch.randint(-half, half, (out_f, in_f), dtype=torch.int8, device=device)
            words = packing.pack_int32(codes, bits)
            if not (torch.equal(PK.pack_int32(codes, bits), words)
                    and torch.equal(PK.unpack_int32(words, bits, in_f), codes)):
                raise AssertionError(f"pack kernels differ from qat.packing at {shape}, {bits} bits")
            t = {
                "pack_kern": lambda: PK.pack_int32(codes, bits),
                "pack_ref": lambda: packing.pack_int32(codes, bits),
                "unpack_kern": lambda: PK.unpack_int32(words, bits, in_f),
                "unpack_ref": lambda: packing.unpack_int32(words, bits, in_f),
            }
            ms = {k: _median_ms(fn, args.iters, args.warmup) for k, fn in t.items()}
            nbytes = codes.numel() + 4 * words.numel()   # each code and each word moved once

            def gbps(k):
                return f"{nbytes / (ms[k] * 1e-3) / 1e9:.0f}"

            row = [shape, str(bits), f"{ms['pack_kern']:.3f}ms", f"{ms['pack_ref']:.3f}ms",
                   gbps("pack_kern"), f"{ms['unpack_kern']:.3f}ms", f"{ms['unpack_ref']:.3f}ms",
                   gbps("unpack_kern"), f"{ms['pack_ref'] / ms['pack_kern']:.2f}x",
                   f"{ms['unpack_ref'] / ms['unpack_kern']:.2f}x"]
            print(" | ".join(f"{c:>11}" for c in row), flush=True)


def wht_outside_table(args, dtype, device="cuda"):
    """Outside WHT adapter timings (the "wht:" block of the module docstring)."""
    import torch

    from qat.adapters import LoRAAdapter, WHTAdapter
    from qat.kernels import dispatch, ops
    from qat.kernels import hadamard_kernels as HK

    cols = ["shape", "tokens", "fwht_kern", "fwht_torch", "fwd_kern", "fwd_torch", "step_kern",
            "step_torch", "step_lora", "kern GB/s"]
    print(f"\noutside WHT adapter, rank {args.rank} budget (nnz = r * (in + out)), fp32 values")
    print(" | ".join(f"{c:>11}" for c in cols))
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        if dispatch.fwht_tile(in_f) is None:
            print(f"{shape:>11} | in = {in_f} has no Hadamard kernel width (qat.hadamard.factor)")
            continue
        wht = WHTAdapter(in_f, out_f, rank=args.rank, placement="outside", device=device)
        lora = LoRAAdapter(in_f, out_f, rank=args.rank, placement="outside", device=device)
        with torch.no_grad():
            wht.values.normal_()
            lora.lora_B.normal_(0, 0.01)
        for m in args.tokens:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            xg = x.clone().requires_grad_()
            gy = torch.randn(m, out_f, device=device, dtype=dtype)

            def step(adapter, mode):
                with dispatch.use_kernels(mode):
                    adapter(xg).backward(gy)

            def fwd(mode):
                with dispatch.use_kernels(mode), torch.no_grad():
                    wht(x)

            t = {
                "fwht_kern": lambda: HK.fwht(x, False, wht.coef, torch.float32),
                "fwht_torch": lambda: ops.reference_fwht(x, False, wht.coef, torch.float32),
                "fwd_kern": lambda: fwd("triton"),
                "fwd_torch": lambda: fwd("reference"),
                "step_kern": lambda: step(wht, "triton"),
                "step_torch": lambda: step(wht, "reference"),
                "step_lora": lambda: step(lora, "reference"),
            }
            ms = {k: _median_ms(fn, args.iters, args.warmup) for k, fn in t.items()}
            nbytes = m * in_f * (x.element_size() + 4)  # x read once, fp32 z written once
            row = [shape, str(m)] + [f"{ms[k]:.3f}ms" for k in cols[2:9]]
            row.append(f"{nbytes / (ms['fwht_kern'] * 1e-3) / 1e9:.0f}")
            print(" | ".join(f"{c:>11}" for c in row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
