"""``qat`` command line: train (the main job), quantize (post-training baseline), export, inspect.

Each command is a ``cmd_*`` function wired to a subparser in ``build_parser``; ``qat --help`` lists them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


TERMS_EPILOG = """terms:
  step          the float scale s of a quantization grid: a weight is stored as an integer
                code q and used as s * (q - z); qat train learns the steps
  group         the inputs of one output row that share a step (--group-size of them)
  storage bits  the width of the frozen base codes under training (qat train --storage_bits)"""


def _parse_bits(value: str) -> float:
    from qat.primitives import check_bits

    try:
        return check_bits(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=_parse_bits, default=4,
                   help="The integer width of the codes: 2, 3, 4, 5-8, or 1.58 for ternary (default 4).")
    p.add_argument("--group-size", type=int, default=32,
                   help="How many inputs of a row share one step (a group); -1 gives each output row one step "
                        "(default 32).")
    p.add_argument("--asymmetric", action="store_true",
                   help="Add a zero point per group, computed from the weights (default: a symmetric grid).")
    p.add_argument("--init", choices=["rtn", "mse", "gptq"], default="mse",
                   help="How each step is chosen: 'rtn' takes absmax / qmax, 'mse' searches the step with the "
                        "least squared error (default), 'gptq' also corrects each column's rounding error in the "
                        "columns after it (GPTQ; needs calibration text).")
    p.add_argument("--exclude", action="append", default=None,
                   help="A regex of module names kept in float; repeatable (default: the output and classifier heads).")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=KEY:VAL[,KEY:VAL]",
                   help="Per-layer settings for mixed precision, e.g. 'down_proj=bits:8'; repeatable.")
    p.add_argument("--act-bits", type=int, choices=[4, 8], default=None,
                   help="Fake-quantize the activations too, int8 (or int4) per token, dynamic: W8A8 / W4A8 "
                        "(default: float activations).")
    p.add_argument("--rotate", choices=["hadamard"], default=None,
                   help="Fold Hadamard rotations into the float model first (Llama / Qwen2 / Mistral).")
    p.add_argument("--online-hadamard", type=int, default=0, metavar="B",
                   help="An online B-block Hadamard on each MLP down_proj input (weights folded; exported as "
                        "compressed-tensors transform_config, docs/ACTIVATIONS.md). Default 0: none.")


def _parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        pattern, _, spec = item.partition("=")
        if not spec:
            raise SystemExit(f"qat: bad --override {item!r}: write REGEX=bits:8,group_size:64")
        values = {}
        for kv in spec.split(","):
            key, _, val = kv.partition(":")
            values[key.strip()] = json.loads(val) if val.strip() not in ("", "None") else None
        overrides[pattern] = values
    return overrides


def _quant_config(args):
    from qat.config import DEFAULT_EXCLUDE, QuantConfig

    return QuantConfig(
        bits=args.bits,
        group_size=None if args.group_size == -1 else args.group_size,  # 0 / < -1: QuantConfig refuses
        symmetric=not args.asymmetric,
        init=args.init,
        exclude=args.exclude if args.exclude is not None else list(DEFAULT_EXCLUDE),
        overrides=_parse_overrides(args.override),
        gptq_damp=getattr(args, "damp", 0.01),
        gptq_act_order=getattr(args, "act_order", False),
        gptq_target=getattr(args, "gptq_target", "quantized"),
        act_bits=getattr(args, "act_bits", None),
    )


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration-text", metavar="FILE",
                   help="With --init gptq: a UTF-8 text file, one calibration text per line (default: sentences of "
                        "the standard library's pydoc topics, training split).")
    p.add_argument("--calibration-samples", type=int, default=256, help="The texts used for calibration (default 256).")
    p.add_argument("--calibration-max-length", type=int, default=128, help="The tokens per calibration text (default 128).")
    p.add_argument("--damp", type=float, default=0.01, help="The GPTQ dampening, a share of the mean Hessian diagonal (default 0.01).")
    p.add_argument("--gptq-target", choices=("quantized", "float"), default="quantized",
                   help="What each GPTQ layer fits: its own outputs on the quantized inputs (GPTQ, default) or the "
                        "float model's outputs (also undoes the error of the quantized layers before it).")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ in decreasing input-energy order (static groups: the export stays plain group-wise).")


def calibration_texts(path: str | None, n: int) -> list[str]:
    """The calibration texts: the file's non-empty lines, or pydoc's training-split sentences."""
    if n < 1:
        raise ValueError(f"--calibration-samples {n}: use at least 1")
    if path is None:
        from qat.evaluation import pydoc_sentences

        return pydoc_sentences(split="train", n=n)
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--calibration-text {path!r} is not a file: pass a UTF-8 text file, one text per line")
    texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--calibration-text {path!r} has no text: write one calibration text per line")
    return texts[:n]


def calibration_batches(model_path: str, texts: list[str], max_length: int, batch_size: int = 16) -> list[dict]:
    """Tokenized, padded batches (attention mask marks the real tokens) for GPTQ's statistics."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return [dict(tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def load_float_model(path: str):
    """A float transformers model from a local folder (or a Hub id when online), in eval mode.

    Never runs a model's own code (``auto_map``): only classes transformers ships are built."""
    import transformers

    from qat.safety import check_model_folder, transformers_model_class

    if not Path(path).exists() and (os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in path):
        raise SystemExit(f"qat: model path {path!r} does not exist: pass a local model folder or a Hub id")
    try:
        check_model_folder(path)
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
        cls = transformers_model_class(config, path)
        return cls.from_pretrained(path, trust_remote_code=False).eval()
    except (OSError, ValueError) as err:
        raise SystemExit(f"qat: {err}".splitlines()[0]) from None


def cmd_quantize(args) -> int:
    """Post-training quantization (RTN, MSE steps or GPTQ) of a model, exported packed."""
    import qat
    from qat.export import prepare_target

    try:
        prepare_target(Path(args.out), args.overwrite, inputs=(args.model,))  # refuse before loading anything
        config = _quant_config(args)
        texts = calibration_texts(args.calibration_text, args.calibration_samples) if args.init == "gptq" else None
    except (ValueError, FileExistsError) as err:
        raise SystemExit(f"qat: {err}") from None
    model = load_float_model(args.model)
    batches = calibration_batches(args.model, texts, args.calibration_max_length) if texts else None
    try:
        if getattr(args, "rotate", None):
            from qat.rotation import rotate_model

            rotate_model(model)
        if getattr(args, "online_hadamard", 0):
            from qat.online_hadamard import add_online_hadamard

            add_online_hadamard(model, args.online_hadamard)
        qat.quantize_model(model, config, calibration=batches)
    except ValueError as err:
        raise SystemExit(f"qat: {err}") from None
    print(qat.format_report(qat.quantization_report(model)))
    out = qat.export_model(model, args.out, overwrite=args.overwrite, source_dir=args.model,
                           recipe={"command": "qat quantize", **config.to_dict(),
                                   **({"rotate": args.rotate} if getattr(args, "rotate", None) else {}),
                                   **({"online_hadamard": args.online_hadamard}
                                      if getattr(args, "online_hadamard", 0) else {})},
                           base_model=args.model)
    print(f"exported to {out}")
    return 0


def cmd_export(args) -> int:
    """Re-export a qat / compressed-tensors checkpoint (re-shard, or as GGUF) and optionally push it."""
    import qat
    from qat.export import prepare_target

    src, out = Path(args.checkpoint), Path(args.out)
    try:
        prepare_target(out, args.overwrite, inputs=(src,))
        if getattr(args, "bits", None) is not None and args.bits not in range(2, 9):
            raise ValueError(f"--bits {args.bits}: an int8 checkpoint slices to 2 ... 8 bits")
        model = qat.load_quantized(src)
        if getattr(args, "bits", None) is not None:
            from qat.matryoshka import slice_model

            slice_model(model, args.bits)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"qat: {err}") from None
    if args.format == "gguf":
        from qat.gguf_export import export_gguf

        try:
            export_gguf(model, out, overwrite=args.overwrite, source_dir=src, float_type=args.gguf_float)
        except ValueError as err:
            raise SystemExit(f"qat: {err}") from None
    else:
        qat.export_model(model, out, overwrite=args.overwrite, source_dir=src, max_shard_size=args.max_shard_size)
    print(f"exported to {out}")
    if args.push_to_hub:
        from qat.hub import push_folder

        push_folder(out, args.push_to_hub, private=args.private)
    return 0


def cmd_inspect(args) -> int:
    """Print the per-layer report of a pack-quantized checkpoint."""
    import qat

    try:
        model = qat.load_quantized(args.checkpoint)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"qat: {err}") from None
    print(qat.format_report(qat.quantization_report(model)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qat", description="Quantization-aware fine-tuning for Hugging Face models.",
                                     epilog=TERMS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="quantization-aware training from a YAML recipe (qat train --help); "
                                 "no arguments: the default all-MiniLM-L6-v2 W4 job")
    p = sub.add_parser("quantize", help="post-training quantization to a packed checkpoint (the QAT baseline)",
                       description="Post-training quantization: round every linear layer's weights to the grid\n"
                                   "(no training) and write the packed compressed-tensors checkpoint.",
                       epilog=TERMS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="The float model: a local folder or a Hub id.")
    p.add_argument("--out", required=True, help="The export folder; it must be new or empty.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out (the new export is written "
                                                            "beside it first).")
    _add_quant_args(p)
    _add_calibration_args(p)
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("export", help="re-export a packed checkpoint; --push-to-hub uploads it")
    p.add_argument("checkpoint", help="A pack-quantized folder (a qat export or another tool's).")
    p.add_argument("--out", required=True, help="The new export folder; it must be new or empty.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out.")
    p.add_argument("--max-shard-size", default="5GB", help="The largest weight file, e.g. 2GB (default 5GB).")
    p.add_argument("--format", choices=["compressed-tensors", "gguf"], default="compressed-tensors",
                   help="The file format; gguf is one llama.cpp file, Q4_0 / Q8_0 blocks of the same codes (symmetric, group 32, fp16 steps).")
    p.add_argument("--gguf-float", choices=["f32", "f16"], default="f32",
                   help="The GGUF type of the float tensors (embeddings, norms, head): f32 exact, f16 half the bytes.")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the export to this Hub repository.")
    p.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    p.add_argument("--bits", type=int, default=None, metavar="R",
                   help="Matryoshka: export the R-bit slice (2-7) of an int8 checkpoint's codes.")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("inspect", help="per-layer report (bits, group, bytes) of a packed checkpoint")
    p.add_argument("checkpoint", help="A pack-quantized folder (a qat export or another tool's).")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # its own parser: every QATArguments field is a --key (qat train --help)
        from qat.trainers.run import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except OSError as err:  # disk full, read-only folder: the export is written beside and swapped in whole
        raise SystemExit(f"qat: {err}; nothing was replaced (an export is written beside the target and "
                         "swapped in whole): free space or fix the permissions and run it again") from None


if __name__ == "__main__":
    sys.exit(main())
