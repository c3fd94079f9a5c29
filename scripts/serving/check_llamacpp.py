"""llama.cpp runs qat's GGUF export with the trained numerics: greedy tokens and logits vs qat.

    bash scripts/serving/setup_llamacpp.sh                 # once: builds llama-cpp-python from its sdist
    python scripts/serving/check_llamacpp.py [--venv outputs/venvs/llamacpp] [--steps 400]

1. Builds a tiny Llama (hidden 128, 4 layers; scripts/serving/tiny_lm.py) with a byte-level BPE
   trained on generated sentences, pre-trains it in float, quantizes it to W4 g32 (or --bits 8)
   with fp16 steps, attaches an inside LoRA and trains steps and LoRA with QAT on next-token loss
   (so codes and steps are the trained ones, not the init).
2. Exports it with ``qat.gguf_export.export_gguf`` (Q4_0 / Q8_0 blocks of the trained codes).
3. Runs the file in llama.cpp (llama-cpp-python, in its own venv, through ``--runner``): the same
   prompt token ids, greedy decoding by argmax of llama.cpp's own logits, and all logits.
4. Compares with qat's model in fp32: greedy tokens, max |logit difference|, tokenization.

llama.cpp's CPU matmul for Q4_0 / Q8_0 weights quantizes the activations to Q8_0 blocks (int8, one
fp16 scale per 32) and accumulates in fp32, so its logits differ from qat's fp32 forward by that
activation rounding; the weights themselves are identical (tests/test_gguf_export.py).
Exit status 1 if any greedy sequence differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_lm  # noqa: E402  (beside this script)

PROMPTS = tiny_lm.PROMPTS


def run_llamacpp(gguf_path: str, ref_path: str) -> None:
    """--runner mode, in the llama-cpp-python venv (numpy + llama_cpp only)."""
    import numpy as np
    from llama_cpp import Llama

    ref = json.loads(Path(ref_path).read_text())
    llm = Llama(model_path=gguf_path, n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    out = {"llama_cpp_version": __import__("llama_cpp").__version__, "runs": []}
    for case in ref["cases"]:
        llm.reset()
        ids = list(case["prompt_ids"])
        llm.eval(ids)
        generated = []
        for _ in range(ref["new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(nxt)
            llm.eval([nxt])
        logits = np.asarray(llm.scores[: llm.n_tokens - 1], dtype=np.float32)  # positions of prompt + generated[:-1]
        tokenized = llm.tokenize(case["text"].encode(), add_bos=False, special=False)
        out["runs"].append({"generated": generated, "logits": logits.tolist(), "tokenized": tokenized})
    print(json.dumps(out))


def build_and_export(work: Path, bits: int, steps: int, arch: str = "llama"):
    from qat.gguf_export import export_gguf

    model, tok, data = tiny_lm.float_model(work / "src", steps, arch=arch)
    model = tiny_lm.qat_train(model, data, steps, bits=bits, serving="llama.cpp")
    export_gguf(model, work / "gguf", source_dir=work / "src", overwrite=True)
    return model, tok


def llamacpp_rounding(model):
    """Forward hooks that apply llama.cpp's CPU activation rounding to qat's model: inputs of the
    quantized matmuls to Q8_0 blocks (d = fp16(amax / 127) per 32, q = round(x / d)) and the
    K / V cache to F16. Returns the hook handles (remove them to get qat's plain forward back)."""
    import torch

    import qat

    def q8_0(module, args):
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
        return (q * d.half().float()).reshape(x.shape),

    def to_f16(module, args, out):
        return out.half().float()

    handles = [layer.register_forward_pre_hook(q8_0) for _, layer in qat.quant_layers(model)]
    for name, layer in qat.quant_layers(model):
        if name.endswith(("k_proj", "v_proj")):
            handles.append(layer.register_forward_hook(to_f16))
    return handles


def reference(model, tok, new_tokens: int) -> dict:
    import torch

    cases = []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False).input_ids
        seq = list(ids)
        with torch.no_grad():
            for _ in range(new_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            logits = model(torch.tensor([seq[:-1]])).logits[0].float()
        handles = llamacpp_rounding(model)
        with torch.no_grad():
            rounded = model(torch.tensor([seq[:-1]])).logits[0].float()
        for h in handles:
            h.remove()
        cases.append({"text": text, "prompt_ids": ids, "generated": seq[len(ids):], "logits": logits.tolist(),
                      "rounded_logits": rounded.tolist()})
    return {"new_tokens": new_tokens, "cases": cases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default="outputs/venvs/llamacpp", help="llama-cpp-python venv (setup_llamacpp.sh)")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--steps", type=int, default=400, help="float and QAT training steps each")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--arch", default="llama", choices=tiny_lm.ARCHS, help="the tiny model's architecture")
    parser.add_argument("--runner", nargs=2, metavar=("GGUF", "REF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        run_llamacpp(*args.runner)
        return 0
    python = Path(args.venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no llama-cpp-python venv at {args.venv}: run bash scripts/serving/setup_llamacpp.sh first")
    import numpy as np

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="qat-llamacpp-"))
    model, tok = build_and_export(work, args.bits, args.steps, args.arch)
    ref = reference(model, tok, args.new_tokens)
    ref_path = work / "ref.json"
    ref_path.write_text(json.dumps(ref))
    gguf_path = work / "gguf" / "model.gguf"
    done = subprocess.run([str(python), os.path.abspath(__file__), "--runner", str(gguf_path), str(ref_path)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.arch}: llama-cpp-python {got['llama_cpp_version']}, GGUF {gguf_path.stat().st_size} bytes, "
          f"{'Q4_0' if args.bits == 4 else 'Q8_0'} linears, F32 embeddings / norms / head")
    same, worst, worst_rounded = 0, 0.0, 0.0
    print("| prompt | qat greedy | llama.cpp greedy | same | max abs logit diff | same, qat with llama.cpp's "
          "activation rounding | max abs logit |")
    print("|---|---|---|---|---|---|---|")
    for case, run in zip(ref["cases"], got["runs"]):
        a, b = np.asarray(case["logits"]), np.asarray(run["logits"])
        diff = float(np.abs(a - b).max())
        diff_rounded = float(np.abs(np.asarray(case["rounded_logits"]) - b).max())
        worst_rounded = max(worst_rounded, diff_rounded)
        worst = max(worst, diff)
        ok = case["generated"] == run["generated"]
        same += ok
        tok_ok = run["tokenized"] == case["prompt_ids"]
        print(f"| {case['text']!r} (tokenized {'same' if tok_ok else 'DIFFERENT'}) | {tok.decode(case['generated'])!r} | "
              f"{tok.decode(run['generated'])!r} | {ok} | {diff:.3e} | {diff_rounded:.3e} | {float(np.abs(a).max()):.2f} |")
    print(f"greedy sequences identical: {same}/{len(PROMPTS)}; worst max |logit diff| {worst:.3e} "
          f"({worst_rounded:.3e} against qat with llama.cpp's Q8_0 activations and F16 KV cache); "
          f"{time.time() - t0:.0f} s")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())
