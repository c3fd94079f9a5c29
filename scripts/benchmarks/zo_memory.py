"""Peak memory of a zeroth-order step vs a forward pass (and a first-order step) on the same batch.

Each mode runs in a fresh process on the same quantized Llama-shaped model (built from a config,
W4 g32, inside LoRA r16 on every linear); the peak resident set size (VmHWM, reset through
/proc/self/clear_refs after the model is built and warmed up) is read after one step:

  forward       loss of the batch under torch.no_grad (what inference costs)
  zo            one SPSA step (2 forwards, the seed trick, in-place update): qat.trainers.zeroth_order
  first_order   forward + backward + AdamW step on the same trainable tensors

Target (issue 4): zo peak <= 1.15x forward peak.
    python scripts/benchmarks/zo_memory.py [--hidden 512 --layers 8 --batch 8 --seq 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def build(a):
    import transformers

    import qat
    from qat.adapters import AdapterConfig, attach

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                                   num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                                   num_key_value_heads=a.hidden // 64, max_position_embeddings=a.seq)
    model = transformers.LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init="rtn"))
    attach(model, AdapterConfig(kind="lora", rank=16, placement="inside"))
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    return model, {"input_ids": ids, "labels": ids}


def measure(mode: str, a) -> dict:
    from qat.trainers.zeroth_order import ZOTensor, zo_step, zo_tensors

    torch.set_num_threads(a.threads)
    model, batch = build(a)
    loss = lambda: model(**batch).loss  # noqa: E731
    tensors = [ZOTensor(p, 0, rel) for _, p, rel in zo_tensors(model, "both")]
    trainable = [t.param for t in tensors]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if mode == "first_order" else None

    def run():
        if mode == "forward":
            with torch.no_grad():
                loss()
        elif mode == "zo":
            zo_step(tensors, loss, seed=0, eps=1e-3, num_perturbations=1, groups=[{"lr": 1e-4}])
        else:
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run()  # warm up: allocator pools, lazy inits, optimizer state
    base = _vm("VmRSS")
    _reset_peak()
    run()
    peak = _vm("VmHWM")
    return {"mode": mode, "peak_bytes": peak, "baseline_bytes": base, "working_bytes": peak - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.mode:  # child process: one measurement, printed as JSON
        print(json.dumps(measure(a.mode, a)))
        return 0
    rows = {}
    for mode in ("forward", "zo", "first_order"):
        child = [sys.executable, __file__, "--mode", mode] + [f"--{k}={getattr(a, k)}" for k in
                                                              ("hidden", "layers", "vocab", "batch", "seq", "threads")]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    fwd = rows["forward"]
    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; W4 g32 + inside LoRA r16; "
          f"batch {a.batch} x {a.seq} tokens; {platform.machine()}, torch {torch.__version__}, {a.threads} threads")
    print("| mode | peak RSS (MiB) | ratio to forward | working set above the loaded model (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        r["peak_ratio"] = r["peak_bytes"] / fwd["peak_bytes"]
        r["working_ratio"] = r["working_bytes"] / max(fwd["working_bytes"], 1)
        print(f"| {mode} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_ratio']:.3f} | "
              f"{r['working_bytes'] / 2**20:.0f} | {r['working_ratio']:.2f} |")
    verdict = "meets" if rows["zo"]["peak_ratio"] <= 1.15 else "misses"
    print(f"zeroth-order peak = {rows['zo']['peak_ratio']:.3f}x forward: {verdict} the 1.15x target")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
