"""llama.cpp runs qat's GGUF export with the trained numerics: greedy tokens and logits vs qat.

    bash scripts/serving/setup_llamacpp.sh                 # once: builds llama-cpp-python from its sdist
    python scripts/serving/check_llamacpp.py [--venv outputs/venvs/llamacpp] [--steps 400]

1. Builds a tiny Llama (hidden 128, 4 layers) with a byte-level BPE trained on generated sentences,
   quantizes it to W4 g32 (or --bits 8) with fp16 steps, attaches an inside LoRA and trains steps
   and LoRA with QAT on next-token loss (so codes and steps are the trained ones, not the init).
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

PROMPTS = ["the llama serves", "exact quantization of", "blocks of codes and", "a runtime and the model"]


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


def _train(model, opt, data, steps: int) -> float:
    import torch

    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (32,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss)


def build_and_export(work: Path, bits: int, steps: int):
    import random

    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import qat
    from qat.adapters import AdapterConfig, attach
    from qat.gguf_export import export_gguf, train_for_gguf

    words = ["quant", "ization", "model", "weight", "step", "block", "llama", "serve", "train", "the", "a", "of",
             "and", "runtime", "exact", "blocks", "codes", "scales", "serves"]
    rng = random.Random(0)
    # A tiny grammar, so the trained model has something to predict: "the X of Y and Z ."
    texts = [" ".join(["the", rng.choice(words), "of", rng.choice(words), "and", rng.choice(words), "."])
             for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    src = work / "src"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=416, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg)
    # A little float pre-training first, so the model is not random noise.
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids_all = [fast(t).input_ids for t in texts]
    length = min(len(x) for x in ids_all)
    data = torch.tensor([x[:length] for x in ids_all])
    print(f"float loss after {steps} steps: {_train(model, opt, data, steps):.4f}")
    model.eval().save_pretrained(src)
    fast.save_pretrained(src)
    # QAT: W<bits> g32, fp16 steps, inside LoRA; steps and LoRA train.
    model.requires_grad_(False)
    qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=32))
    train_for_gguf(model)
    attach(model, AdapterConfig(rank=8, init="zero"))
    steps_, lora = ([p for n, p in model.named_parameters() if p.requires_grad and ("weight_scale" in n) == want]
                    for want in (True, False))
    opt = torch.optim.Adam([{"params": steps_, "lr": 1e-5}, {"params": lora, "lr": 1e-3}])  # qat's recipe split
    loss = _train(model, opt, data, steps)
    model.eval()
    print(f"QAT loss after {steps} steps: {loss:.4f}")
    export_gguf(model, work / "gguf", source_dir=src, overwrite=True)
    return model, fast


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
    model, tok = build_and_export(work, args.bits, args.steps)
    ref = reference(model, tok, args.new_tokens)
    ref_path = work / "ref.json"
    ref_path.write_text(json.dumps(ref))
    gguf_path = work / "gguf" / "model.gguf"
    done = subprocess.run([str(python), os.path.abspath(__file__), "--runner", str(gguf_path), str(ref_path)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp run failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"llama-cpp-python {got['llama_cpp_version']}, GGUF {gguf_path.stat().st_size} bytes, "
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
