"""GPU benchmark of the path users get: QuantLinear under the default kernel mode ("auto",
which on CUDA runs the ``torch.library`` ops ``qat::*`` and through them the Triton kernels) vs
the torch reference path vs bf16 / bitsandbytes + LoRA.

    python scripts/benchmarks/kernels_gpu.py                       # the default sweep
    python scripts/benchmarks/kernels_gpu.py --tokens 2048 --bits 3 --shapes 4096x4096
    python scripts/benchmarks/kernels_gpu.py --peak-tflops 989 --peak-gbps 3350   # roofline columns

For each weight shape it first checks the public path against the reference path at the first
token count (export codes, y, dX, step and LoRA gradients; it stops on a mismatch: the first GPU
run is also the first compiled-kernel correctness run), then for each token count it times
(median of --iters runs, CUDA events), every row through qat's public entry points:

  forward (inside LoRA of rank --rank on the quantized layer)
    fwd          layer(x) without grad: dispatch.quant_linear -> qat::quant_linear_fwd, D formed
                 per tile in registers from the LoRA factors
    ref_fwd      the same call under use_kernels("reference"): unpack + dequant + fake-quant in
                 torch, then F.linear
    dq+linear    dispatch.fake_quant_weight (qat::dequant_fakequant), then cuBLAS F.linear (the
                 unfused alternative)
  backward (what QuantLinear's recomputed backward calls, dispatch.quant_linear_backward)
    dx           dX = grad_y @ W_hat (qat::quant_linear_dx)
    grads        step / zero-point gradients and LoRA dA, dB from G = grad_y^T x reduced tile by
                 tile (qat::quant_linear_grads; no dense G, W_hat or D)
  a whole training step of the layer (forward + backward, LoRA inside)
    step_fused   QuantLinear under the default mode
    step_ref     QuantLinear under use_kernels("reference") (autograd through the dense W_hat)
    step_bf16    bf16 F.linear over a dense frozen weight + a trainable LoRA branch (baseline c)
    step_bnb     bitsandbytes NF4 Linear4bit + the same LoRA branch (baseline b; "n/a" when
                 bitsandbytes is missing or fails)

and prints a table with the GPU's name and the path taken ("op" on CUDA), plus the ratios the
issue's targets are stated in (fused step vs bnb: target >= 2x; vs bf16: target <= 1.3x). With
--peak-tflops / --peak-gbps it adds the fraction of the matmul roofline (2MNK flops for the
forward, 4MNK for dX + G) and of memory bandwidth (the bytes the fused forward must move at
least) reached.
A second table (--no-wht skips it) covers, for the shapes whose `in` has a Walsh-Hadamard size,
the outside WHT adapter at the LoRA parameter count r * (in + out), fp32 values, 16-bit
activations:

  wht: fwht_kern   dispatch.fwht under the default mode: z = c/n x H^T through qat::fwht (the
                   one-pass Triton transform, fp32 out)
       fwht_torch  the same call under "reference" (GEMM-blocked fwht in fp32)
       fwd_kern / fwd_torch    adapter forward: transform + CSR sparse projection
       step_kern / step_torch  adapter forward + backward (d values, dx)
       step_lora   an outside LoRA branch of rank r (the same parameter count), forward + backward
       kern GB/s   bytes the transform must move (x read, z written once) per fwht_kern time

A third table (--no-pack skips it; --pack-only runs it alone) times packing the base and the
export, codes [out, in] int8 <-> int32 words (qat.packing's layout), for --pack-shapes and
--pack-bits (straddling widths included: 3):

  pack: pack_kern / pack_ref      dispatch.pack_int32 under the default mode (qat::pack_int32)
                                  vs qat.packing.pack_int32
        unpack_kern / unpack_ref  the same for unpack_int32 (what the reference path runs on
                                  every forward and backward)
        GB/s                      codes (1 byte each) + words (4 bytes each) moved once, per time
  Each case first checks that the kernel's words and codes equal the reference's.

Needs CUDA and triton; ``--help`` works without either. ``--device cpu`` runs every table under
the Triton interpreter (TRITON_INTERPRET=1 must be set before start) with wall-clock timers and
use_kernels("triton") in place of "auto" (on CPU "auto" is the reference): the figures mean
nothing, it checks that the script itself runs (tests/benchmarks does this on tiny shapes, so a
lent GPU's time is not spent on a script error).
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


def _step(layer, x, gy, mode):
    """(y, dX, {parameter: grad}) of one forward + backward of ``layer`` under ``mode``."""
    from qat.kernels import dispatch

    for p in layer.parameters():
        p.grad = None
    xg = x.clone().requires_grad_()
    with dispatch.use_kernels(mode):
        y = layer(xg)
        y.backward(gy)
    return y.detach(), xg.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def check_against_reference(layer, x, gy, mode):
    """Before timing a shape: the public path under ``mode`` against the reference path, so the
    first GPU run is also a correctness run (the CI tests only ever run the kernels in the
    interpreter). Raises on a mismatch. Tolerances, relative to each tensor's largest entry
    (tests/gpu/test_public_path.py says why): codes at most 1e-4 flipped (the in-register D
    rounds apart from torch's B @ A); y, dX 2e-2 (both round to the 16-bit activation dtype);
    grads 5e-2 (the reference forms G and the step gradient in the 16-bit dtypes). Returns a
    one-line summary."""
    from qat.kernels import dispatch

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()

    with dispatch.use_kernels(mode):
        codes = dispatch.quant_codes(layer)
    with dispatch.use_kernels("reference"):
        codes_ref = dispatch.quant_codes(layer)
    flipped = (codes != codes_ref).sum().item()
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = _step(layer, x, gy, mode), _step(layer, x, gy, "reference")
    errs = {"y": rel(y, y_ref), "dX": rel(dx, dx_ref)}
    errs.update({f"d {name}": rel(grads[name], grads_ref[name]) for name in grads_ref})
    bad = [k for k, e in errs.items() if e > (2e-2 if k in ("y", "dX") else 5e-2)]
    if flipped > 1e-4 * codes_ref.numel() or bad or grads.keys() != grads_ref.keys():
        raise SystemExit(f"kernel check failed: {flipped} of {codes_ref.numel()} codes differ; "
                         f"relative errors {errs}")
    return (f"check: {flipped} of {codes_ref.numel()} codes differ; "
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
    mode = kernel_mode(dev)
    if args.pack_only:
        pack_table(args, dev)
        return 0
    from qat.kernels import dispatch

    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU, Triton interpreter (smoke run)"
    print(f"GPU: {device_name}  torch {torch.__version__}  dtype {args.dtype}  "
          f"bits {args.bits} storage {args.storage_bits or args.bits} group {args.group_size} "
          f"{'asym' if args.asymmetric else 'sym'}  LoRA rank {args.rank}  median of {args.iters}  "
          f"mode {mode!r}")
    timed = ["fwd", "ref_fwd", "dq+linear", "dx", "grads", "step_fused", "step_ref", "step_bf16",
             "step_bnb"]
    cols = ["shape", "tokens", *timed, "vs bnb", "vs bf16"]
    if args.peak_tflops:
        cols += ["fwd %mm", "bwd %mm"]
    if args.peak_gbps:
        cols += ["fwd %bw"]
    header = " | ".join(f"{c:>11}" for c in cols)
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        layer, w_dense = _layer(out_f, in_f, args, dtype, dev)
        lora = layer.adapter
        trainables = layer.trainable_tensors()
        # bf16 / bnb baselines: a frozen dense weight plus a trainable LoRA branch
        a16 = lora.lora_A.detach().to(dtype).clone().requires_grad_()
        b16 = lora.lora_B.detach().to(dtype).clone().requires_grad_()
        bnb_step = _bnb_step(w_dense, a16, b16, lora.scaling, dtype, dev)
        for m in args.tokens:
            x = torch.randn(m, in_f, device=dev, dtype=dtype)
            gy = torch.randn(m, out_f, device=dev, dtype=dtype)
            xg = x.clone().requires_grad_()
            with dispatch.use_kernels(mode):
                path = dispatch.kernel_path(layer, x)
            if dev == "cuda" and path != "op":
                raise SystemExit(f"{shape}: the default mode took the {path!r} path, not the ops: "
                                 "is triton installed for this GPU?")
            if m == args.tokens[0]:
                print(f"{shape}: path {path!r}, " + check_against_reference(layer, x, gy, mode), flush=True)
                print(header, flush=True)

            def run(fn, run_mode=mode):
                def timed_call():
                    with dispatch.use_kernels(run_mode), torch.no_grad():
                        fn()
                return timed_call

            def step(run_mode):
                with dispatch.use_kernels(run_mode):
                    layer(xg).backward(gy)

            def step_bf16():
                y = F.linear(xg, w_dense) + (xg @ a16.t()) @ b16.t() * lora.scaling
                y.backward(gy)

            t = {
                "fwd": run(lambda: layer(x)),
                "ref_fwd": run(lambda: layer(x), "reference"),
                "dq+linear": run(lambda: F.linear(x, dispatch.fake_quant_weight(layer).to(dtype))),
                "dx": run(lambda: dispatch.quant_linear_backward(gy, x, layer, [], path)),
                "grads": run(lambda: dispatch.quant_linear_backward(gy, x, layer, trainables, path,
                                                                    need_dx=False)),
                "step_fused": lambda: step(mode),
                "step_ref": lambda: step("reference"),
                "step_bf16": step_bf16,
            }
            if bnb_step is not None:
                t["step_bnb"] = lambda: bnb_step(xg, gy)
            ms = {k: _median_ms(fn, args.iters, args.warmup) for k, fn in t.items()}
            row = [shape, str(m)] + [f"{ms[k]:.3f}ms" if k in ms else "n/a" for k in timed]
            row.append(f"{ms['step_bnb'] / ms['step_fused']:.2f}x" if "step_bnb" in ms else "n/a")
            row.append(f"{ms['step_fused'] / ms['step_bf16']:.2f}x")
            flops = 2.0 * m * out_f * in_f
            if args.peak_tflops:
                peak = args.peak_tflops * 1e12
                row.append(f"{flops / (ms['fwd'] * 1e-3) / peak:.0%}")
                row.append(f"{2 * flops / ((ms['dx'] + ms['grads']) * 1e-3) / peak:.0%}")
            if args.peak_gbps:
                # least traffic of the forward: x and y once, the packed codes, steps and LoRA
                # factors once (no D: it never leaves registers)
                act = torch.finfo(dtype).bits // 8
                nbytes = (m * (in_f + out_f) * act + layer.base_packed.numel() * 4
                          + 2 * layer.base_scale.numel() * layer.base_scale.element_size()
                          + sum(p.numel() * p.element_size() for p in lora.parameters()))
                row.append(f"{nbytes / (ms['fwd'] * 1e-3) / (args.peak_gbps * 1e9):.0%}")
            print(" | ".join(f"{c:>11}" for c in row), flush=True)
    if not args.no_wht:
        wht_outside_table(args, dtype, dev)
    if not args.no_pack:
        pack_table(args, dev)
    return 0


def kernel_mode(device: str) -> str:
    """The mode users get on CUDA ("auto": the torch.library ops); "triton" for the CPU smoke
    run, where "auto" would be the reference."""
    return "auto" if device == "cuda" else "triton"


def pack_table(args, device="cuda"):
    """Pack / unpack timings (the "pack:" block of the module docstring)."""
    import torch

    from qat import packing
    from qat.kernels import dispatch

    mode = kernel_mode(device)

    def public(fn, *args):
        with dispatch.use_kernels(mode):
            return fn(*args)

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
            if not (torch.equal(public(dispatch.pack_int32, codes, bits), words)
                    and torch.equal(public(dispatch.unpack_int32, words, bits, in_f), codes)):
                raise AssertionError(f"pack kernels differ from qat.packing at {shape}, {bits} bits")
            t = {
                "pack_kern": lambda: public(dispatch.pack_int32, codes, bits),
                "pack_ref": lambda: packing.pack_int32(codes, bits),
                "unpack_kern": lambda: public(dispatch.unpack_int32, words, bits, in_f),
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
    from qat.kernels import dispatch
    from qat.kernels.support import fwht_tile

    mode = kernel_mode(device)

    cols = ["shape", "tokens", "fwht_kern", "fwht_torch", "fwd_kern", "fwd_torch", "step_kern",
            "step_torch", "step_lora", "kern GB/s"]
    print(f"\noutside WHT adapter, rank {args.rank} budget (nnz = r * (in + out)), fp32 values")
    print(" | ".join(f"{c:>11}" for c in cols))
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        if fwht_tile(in_f) is None:
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

            def step(adapter, run_mode):
                with dispatch.use_kernels(run_mode):
                    adapter(xg).backward(gy)

            def fwd(run_mode):
                with dispatch.use_kernels(run_mode), torch.no_grad():
                    wht(x)

            def transform(run_mode):
                with dispatch.use_kernels(run_mode), torch.no_grad():
                    dispatch.fwht(x, False, wht.coef, torch.float32)

            t = {
                "fwht_kern": lambda: transform(mode),
                "fwht_torch": lambda: transform("reference"),
                "fwd_kern": lambda: fwd(mode),
                "fwd_torch": lambda: fwd("reference"),
                "step_kern": lambda: step(wht, mode),
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
