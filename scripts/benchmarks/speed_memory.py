"""Seconds per step and peak memory of qat against float LoRA and peft + bitsandbytes QLoRA.

One Llama-shaped causal LM built from a config (default ~100M parameters: hidden 768, 12 layers,
intermediate 2048, vocab 8192), one batch of random tokens, the same seed and compute dtype for
every row. Each row runs in a fresh process:

  float_lora    peft LoRA r16 on every projection of the frozen float model
  bnb_qlora     peft LoRA r16 over a bitsandbytes NF4 base (the float model saved to a temporary
                folder, reloaded with BitsAndBytesConfig(load_in_4bit) as users do)
  qat_s4_lora   qat W4 g32, storage 4, inside LoRA r16 (steps and LoRA train)
  qat_s8_lora   the same over an 8-bit frozen base (storage_bits 8)
  qat_s4_wht    storage 4, inside Walsh-Hadamard adapter with LoRA r16's parameter budget
  qat_s4_zo     storage 4, inside LoRA r16, zeroth-order step (qat.trainers.zeroth_order, 1 perturbation)

First-order rows time forward + backward + AdamW step on the trainable tensors. In each process the
resident set size right after the imports (every row imports the same modules) is the baseline; the
model is then built, garbage-collected and trimmed back to what it holds, warmed up, and the peak RSS
(VmHWM) is reset and read over the timed steps. Every figure is reported as a ratio to float_lora
from the same run. Targets (issue 5): qat step time <= 1.3x float LoRA, qat peak memory at
storage 4 <= 0.4x float LoRA.

    python scripts/benchmarks/speed_memory.py                     # full run, writes docs/benchmarks/speed_memory.*
    python scripts/benchmarks/speed_memory.py --quick --out /tmp/sm   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when imported by path
from bench_common import machine, reset_peak_rss, vm_bytes, write_results  # noqa: E402

NAME = "speed_memory"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = {  # name -> (what it is, step kind)
    "float_lora": ("float base + peft LoRA r16", "first_order"),
    "bnb_qlora": ("bitsandbytes NF4 base + peft LoRA r16", "first_order"),
    "qat_s4_lora": ("qat W4 g32, storage 4, inside LoRA r16", "first_order"),
    "qat_s8_lora": ("qat W4 g32, storage 8, inside LoRA r16", "first_order"),
    "qat_s4_wht": ("qat W4 g32, storage 4, inside WHT (LoRA r16 budget)", "first_order"),
    "qat_s4_zo": ("qat W4 g32, storage 4, inside LoRA r16, zeroth-order", "zo"),
}
TIME_TARGET, MEMORY_TARGET = 1.3, 0.4
SHAPE_KEYS = ("hidden", "layers", "intermediate", "heads", "vocab", "batch", "seq", "warmup", "steps",
              "threads", "dtype", "rank")
QUICK = dict(hidden=64, layers=2, intermediate=128, heads=2, vocab=256, batch=2, seq=32, warmup=1, steps=1)


# ----------------------------------------------------------------- child process: one row
def import_everything() -> None:
    """Every row imports the same modules, so the post-import baseline RSS is the same runtime."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import qat  # noqa: F401
    import qat.adapters  # noqa: F401
    import qat.trainers.zeroth_order  # noqa: F401


def release_freed_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS, so RSS shows what is still held
    (glibc keeps freed mid-sized blocks, such as the float weights just quantized, in its arenas)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed blocks
        pass


def llama_config(a):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        max_position_embeddings=a.seq, tie_word_embeddings=False)


def float_model(a):
    """The same float weights in every row: seed 0, built from the config, frozen."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(a)).to(getattr(torch, a.dtype))
    model.requires_grad_(False)
    return model


def peft_lora(model, a):
    import peft

    config = peft.LoraConfig(r=a.rank, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def bnb_model(a):
    """Save the float model, reload it NF4-quantized by transformers + bitsandbytes (the QLoRA path)."""
    import transformers

    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as folder:
        model = float_model(a)
        model.save_pretrained(folder)
        del model
        release_freed_memory()
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, device_map="cpu", dtype=dtype)
    own_storage(model)
    model.requires_grad_(False)
    return model


@torch.no_grad()
def own_storage(model) -> None:
    """Copy the tensors from_pretrained left as views of the memory-mapped checkpoint (the float
    embeddings, head and norms): while any view lives the whole file stays mapped, and the pages of
    the float projections read during quantization stay in RSS, charged to this row."""
    import bitsandbytes as bnb

    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not isinstance(tensor, bnb.nn.Params4bit):
                tensor.data = tensor.data.clone()


def qat_model(a, storage: int, adapter: str):
    import qat
    from qat.adapters import AdapterConfig, attach

    model = float_model(a)
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, storage_bits=storage, init="rtn"))
    attach(model, AdapterConfig(kind=adapter, rank=a.rank, placement="inside"))
    return model


def build(row: str, a):
    if row == "float_lora":
        return peft_lora(float_model(a), a)
    if row == "bnb_qlora":
        return peft_lora(bnb_model(a), a)
    storage = 8 if row == "qat_s8_lora" else 4
    return qat_model(a, storage, "wht" if row == "qat_s4_wht" else "lora")


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (a tied or shared tensor counts once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def base_linear_bytes(model) -> int:
    """Bytes of the frozen projection weights (the part quantization shrinks): float weights,
    NF4 codes + absmax, or qat's packed codes + base steps. Embeddings, the head and adapters excluded."""
    from qat.quant_linear import QuantLinear

    tensors = []
    for name, module in model.named_modules():
        if "lm_head" in name or "lora_" in name or ".adapter" in name:
            continue
        if isinstance(module, QuantLinear):
            tensors += [module.base_packed, module.base_scale, module.base_zero_point]
        elif isinstance(module, torch.nn.Linear):
            tensors.append(module.weight)
            state = getattr(module.weight, "quant_state", None)
            if state is not None:
                tensors.append(state.absmax)
                if getattr(state, "state2", None) is not None:
                    tensors.append(state.state2.absmax)
    return tensor_bytes(tensors)


def model_bytes(model) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


def make_step(model, kind: str, batch: dict):
    """A callable running one training step: first-order (AdamW) or zeroth-order (SPSA)."""
    loss = lambda: model(**batch).loss  # noqa: E731
    trainable = [p for p in model.parameters() if p.requires_grad]
    if kind == "zo":
        from qat.trainers.zeroth_order import ZOTensor, zo_step, zo_tensors

        tensors = [ZOTensor(p, 0, rel) for _, p, rel in zo_tensors(model, "both")]
        counter = iter(range(10**9))
        return lambda: zo_step(tensors, loss, seed=next(counter), eps=1e-3, num_perturbations=1,
                               groups=[{"lr": 1e-4}])
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def step():
        out = loss()
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.detach()

    return step


def timed(step, n: int) -> list[float]:
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def rebuild_seconds(model) -> dict:
    """qat only: seconds to rebuild every layer's dense weight once (a forward does it once, a
    first-order step twice) and the part of that spent unpacking the int32 words."""
    from qat.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return {}
    start = time.perf_counter()
    for layer in layers:
        layer.base_codes()
    unpack = time.perf_counter() - start
    start = time.perf_counter()
    for layer in layers:
        layer.fake_quant_weight()
    return {"unpack_seconds": unpack, "rebuild_seconds": time.perf_counter() - start}


def measure(row: str, a) -> dict:
    torch.set_num_threads(a.threads)
    import_everything()
    release_freed_memory()
    baseline = vm_bytes("VmRSS")
    model = build(row, a)
    release_freed_memory()
    resident_model = vm_bytes("VmRSS") - baseline  # ~ model_bytes when the float weights were freed
    torch.manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    step = make_step(model, ROWS[row][1], {"input_ids": ids, "labels": ids})
    warm = timed(step, a.warmup)  # allocator pools, lazy inits, AdamW state
    release_freed_memory()
    reset_peak_rss()
    seconds = timed(step, a.steps)
    peak = vm_bytes("VmHWM")
    return {
        "row": row, "what": ROWS[row][0], "kind": ROWS[row][1],
        "seconds_per_step": statistics.median(seconds), "step_seconds": seconds, "warmup_seconds": warm,
        "peak_bytes": peak, "baseline_bytes": baseline, "above_baseline_bytes": peak - baseline,
        "resident_model_bytes": resident_model, "model_bytes": model_bytes(model),
        "base_linear_bytes": base_linear_bytes(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **rebuild_seconds(model),  # after the peak was read: it allocates dense weights
    }


# ----------------------------------------------------------------- parent: all rows, report
def run_row(row: str, a) -> dict:
    """One row in a fresh interpreter (its own baseline and peak); its JSON is the last stdout line."""
    args = [f"--{k}={getattr(a, k)}" for k in SHAPE_KEYS]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", row, *args],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"row {row} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(a) -> dict:
    """Every row, --repeats times round-robin; per row the run with the fastest median step is kept.

    On a shared machine other processes only ever slow a step down, so the fastest of several runs
    spread over time is the least disturbed one; round-robin spreads each row's runs the same way.
    """
    rows = {}
    for rep in range(a.repeats):
        for row in a.rows:
            r = run_row(row, a)
            print(f"[{rep + 1}/{a.repeats}] {row}: {r['seconds_per_step']:.3f} s/step, peak {mib(r['peak_bytes'])} "
                  f"MiB ({mib(r['above_baseline_bytes'])} above baseline)", flush=True)
            r["repeat_seconds"] = rows.get(row, {}).get("repeat_seconds", []) + [r["seconds_per_step"]]
            if row not in rows or r["seconds_per_step"] < rows[row]["seconds_per_step"]:
                rows[row] = r
            rows[row]["repeat_seconds"] = r["repeat_seconds"]
    return rows


def add_ratios(rows: dict) -> None:
    ref = rows["float_lora"]
    for r in rows.values():
        r["time_ratio"] = r["seconds_per_step"] / ref["seconds_per_step"]
        r["peak_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
        r["memory_ratio"] = r["above_baseline_bytes"] / ref["above_baseline_bytes"]
        r["base_linear_ratio"] = r["base_linear_bytes"] / ref["base_linear_bytes"]


def working_set(r: dict) -> int:
    """Peak above baseline minus the model itself: activations, gradients, optimizer state, temporaries."""
    return r["above_baseline_bytes"] - r["model_bytes"]


def verdicts(rows: dict) -> list[str]:
    """Met / not met for each target, row by row (qat rows only), and where the float peak goes."""
    ref = rows["float_lora"]
    lines = [f"- float_lora's peak above baseline, {mib(ref['above_baseline_bytes'])} MiB, is "
             f"{mib(ref['model_bytes'])} MiB of model and {mib(working_set(ref))} MiB of activations, gradients, "
             "optimizer state and temporaries, which quantizing the frozen base does not shrink; a memory ratio "
             f"of {MEMORY_TARGET}x needs the working set to be a small part of the float peak (smaller batches "
             "or activation checkpointing)."]
    for name, r in rows.items():
        if not name.startswith("qat"):
            continue
        t = "met" if r["time_ratio"] <= TIME_TARGET else "not met"
        lines.append(f"- {name}: step time {r['time_ratio']:.2f}x float LoRA, target <= {TIME_TARGET}x: **{t}**")
        if "_s4_" in name:
            m = "met" if r["memory_ratio"] <= MEMORY_TARGET else "not met"
            lines.append(f"- {name}: peak memory {r['memory_ratio']:.2f}x float LoRA (above the runtime "
                         f"baseline; {r['peak_ratio']:.2f}x total RSS), target <= {MEMORY_TARGET}x: **{m}**")
    lines += ["- Where qat's extra time goes: every forward rebuilds each layer's dense weight from the packed "
              "codes (unpack, dequantize, add the inside adapter's delta, fake-quantize) and a first-order step "
              "rebuilds it again in backward. One rebuild of all layers, measured after the timed steps: "
              + rebuild_line(rows) + ". The backward also forms each layer's full weight gradient dY^T X "
              "(qat.quant_linear._RecomputedLinear), which the learned steps and the inside adapter need and float "
              "LoRA, whose base is frozen and whose adapter sits outside, never computes: a third matmul as large "
              "as the forward's. An estimate, not a measurement: counting matmuls of the forward's size, a "
              "first-order qat step does three where float LoRA does two (about 1.5x) before any rebuild."]
    return lines


def rebuild_line(rows: dict) -> str:
    parts = [f"{n} {r['rebuild_seconds']:.2f} s (unpacking {r['unpack_seconds']:.2f} s)"
             for n, r in rows.items() if "rebuild_seconds" in r]
    return "; ".join(parts) + f"; float_lora's whole step: {rows['float_lora']['seconds_per_step']:.2f} s"


def command(a) -> str:
    flags = " ".join(f"--{k} {getattr(a, k)}" for k in SHAPE_KEYS)
    return f"python scripts/benchmarks/speed_memory.py {flags} --repeats {a.repeats} --rows {','.join(a.rows)}"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: dict) -> list[str]:
    lines = ["| row | s/step | time ratio | peak above baseline (MiB) | memory ratio | peak RSS (MiB) | "
             "RSS ratio | model held (MiB) | RSS after build (MiB) | working set (MiB) | projection base (MiB) | "
             "trainable |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['seconds_per_step']:.3f} | {r['time_ratio']:.2f} | {mib(r['above_baseline_bytes'])} | "
            f"{r['memory_ratio']:.2f} | {mib(r['peak_bytes'])} | {r['peak_ratio']:.2f} | {mib(r['model_bytes'])} | "
            f"{mib(r['resident_model_bytes'])} | {mib(working_set(r))} | {mib(r['base_linear_bytes'])} | "
            f"{r['trainable']:,} |")
    return lines


def report(rows: dict, a, where: str) -> str:
    ref = rows["float_lora"]
    lines = [
        "# Speed and memory per training step (generated by scripts/benchmarks/speed_memory.py)", "",
        f"Command: `{command(a)}`", "",
        f"Machine: {where}.", "",
        f"Model: Llama-shaped, built from a config (seed 0): hidden {a.hidden}, {a.layers} layers, intermediate "
        f"{a.intermediate}, {a.heads} heads, vocab {a.vocab}, untied head; {ref['parameters'] - ref['trainable']:,} "
        f"float parameters. Batch {a.batch} x {a.seq} random tokens (seed 0), compute dtype {a.dtype} in every row. "
        f"{a.warmup} warm-up steps, then the median of {a.steps} timed steps; every row ran {a.repeats} time(s), "
        "round-robin, and its fastest run is shown. First-order rows: forward + "
        "backward + AdamW (lr 1e-4) on the trainable tensors; qat rows also train their quantization steps "
        "(LSQ), so their trainable count adds one step per group of 32 weights. The zeroth-order row: one "
        "SPSA step (two forwards, 1 perturbation).", "",
        "Memory: each row is a fresh process. *Baseline* = RSS right after importing torch, transformers, "
        "peft, bitsandbytes and qat (the same in every row). After the model is built it is garbage-collected "
        "and malloc-trimmed (*RSS after build* ~ *model held* shows the float weights were freed), warmed up, "
        "then VmHWM is reset and read over the timed steps. The memory target is judged on the *peak above "
        "baseline*: the runtime's fixed RSS (libraries, allocator) is the same constant in every row and no "
        "training method can remove it, so it would only dilute the ratio; the total-RSS ratio is shown too. "
        "*Working set* = peak above baseline minus the model held. "
        "*Projection base* = bytes of the frozen q/k/v/o/gate/up/down weights (float, NF4 codes + absmax, or "
        "qat's packed codes + base steps); embeddings and the head stay float in every row.", "",
        *table(rows), "",
        "Targets (issue 5): qat step time <= 1.3x float LoRA; qat peak memory at storage 4 <= 0.4x float LoRA.", "",
        *verdicts(rows), "",
        f"Plot: ![time and memory ratios]({NAME}.png)",
    ]
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [rows[n]["time_ratio"] for n in names], 0.4, label="s/step ratio")
    ax.bar([i + 0.2 for i in x], [rows[n]["memory_ratio"] for n in names], 0.4,
           label="peak memory ratio (above baseline)")
    ax.axhline(TIME_TARGET, color="tab:blue", ls="--", lw=1, label=f"time target {TIME_TARGET}x")
    ax.axhline(MEMORY_TARGET, color="tab:orange", ls="--", lw=1, label=f"memory target {MEMORY_TARGET}x (storage 4)")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("ratio to float LoRA")
    ax.set_title("Training step vs float LoRA (same run, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (lazy inits, AdamW state)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every row")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (and the WHT budget)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every row this many times, round-robin, keeping each row's fastest run")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--quick", action="store_true", help="tiny model, one timed step (for tests)")
    p.add_argument("--out", help="results folder (default docs/benchmarks)")
    p.add_argument("--render", metavar="JSON",
                   help="only rewrite the table, text and plot from a results JSON of an earlier run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    a.rows = [r for r in a.rows.split(",") if r] if isinstance(a.rows, str) else a.rows
    unknown = set(a.rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}: use {list(ROWS)}")
    if "float_lora" not in a.rows:
        a.rows.insert(0, "float_lora")  # every ratio is to it
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        print(json.dumps(measure(a.child, a)))
        return 0
    if a.render:
        data = json.loads(Path(a.render).read_text())
        rows, where = data["rows"], data["machine"]
        a = argparse.Namespace(**{**data["args"], "out": a.out or Path(a.render).parent})
    else:
        torch.set_num_threads(a.threads)  # so machine() names the rows' thread count
        rows = run_all(a)
        where = machine()
    add_ratios(rows)
    publish(rows, a, where)
    return 0


def publish(rows: dict, a, where: str) -> None:
    text = report(rows, a, where)
    data = {"machine": where, "command": command(a), "args": vars(a), "rows": rows}
    out = write_results(NAME, text, data, a.out)
    plot(rows, out / f"{NAME}.png")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
