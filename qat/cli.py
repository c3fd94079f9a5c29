"""``qat`` command line: train (the main job), quantize (post-training baseline), export, inspect.

Each command is a ``cmd_*`` function wired to a subparser in ``build_parser``; ``qat --help`` lists them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parse_bits(value: str) -> float:
    from qat.primitives import check_bits

    try:
        return check_bits(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=_parse_bits, default=4, help="2, 3, 4, 8 (or 5-7) or 1.58 (ternary); default 4")
    p.add_argument("--group-size", type=int, default=32, help="steps per group of inputs; -1 = per channel (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="learned zero points (default symmetric)")
    p.add_argument("--init", choices=["rtn", "mse"], default="mse", help="step init: absmax RTN or MSE search (default)")
    p.add_argument("--exclude", action="append", default=None, help="regex of module names kept in float (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=KEY:VAL[,KEY:VAL]",
                   help="per-layer settings, e.g. 'down_proj=bits:8' (repeatable)")


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
        group_size=None if args.group_size <= 0 else args.group_size,
        symmetric=not args.asymmetric,
        init=args.init,
        exclude=args.exclude if args.exclude is not None else list(DEFAULT_EXCLUDE),
        overrides=_parse_overrides(args.override),
    )


def load_float_model(path: str):
    """A float transformers model from a local folder (or a Hub id when online), in eval mode."""
    import transformers

    if not Path(path).exists() and (os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in path):
        raise SystemExit(f"qat: model path {path!r} does not exist: pass a local model folder or a Hub id")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, transformers.AutoModel)
    return cls.from_pretrained(path).eval()


def cmd_quantize(args) -> int:
    """Post-training quantization (RTN or MSE steps) of a model, exported packed."""
    import qat
    from qat.export import prepare_target

    try:
        prepare_target(Path(args.out), args.overwrite)  # refuse before loading anything
        config = _quant_config(args)
    except (ValueError, FileExistsError) as err:
        raise SystemExit(f"qat: {err}") from None
    model = load_float_model(args.model)
    try:
        qat.quantize_model(model, config)
    except ValueError as err:
        raise SystemExit(f"qat: {err}") from None
    print(qat.format_report(qat.quantization_report(model)))
    out = qat.export_model(model, args.out, overwrite=args.overwrite, source_dir=args.model,
                           recipe={"command": "qat quantize", **config.to_dict()}, base_model=args.model)
    print(f"exported to {out}")
    return 0


def cmd_export(args) -> int:
    """Re-export a qat / compressed-tensors checkpoint (e.g. to re-shard) and optionally push it."""
    import qat
    from qat.export import prepare_target

    src, out = Path(args.checkpoint), Path(args.out)
    try:
        prepare_target(out, args.overwrite)
        if getattr(args, "bits", None) is not None and args.bits not in range(2, 9):
            raise ValueError(f"--bits {args.bits}: an int8 checkpoint slices to 2 ... 8 bits")
        model = qat.load_quantized(src)
        if getattr(args, "bits", None) is not None:
            from qat.matryoshka import slice_model

            slice_model(model, args.bits)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"qat: {err}") from None
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
    parser = argparse.ArgumentParser(prog="qat", description="Quantization-aware fine-tuning for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="quantization-aware training from a YAML recipe (qat train --help); "
                                 "no arguments: the default all-MiniLM-L6-v2 W4 job")
    p = sub.add_parser("quantize", help="post-training quantization to a packed checkpoint (the QAT baseline)")
    p.add_argument("--model", required=True, help="local model folder or Hub id")
    p.add_argument("--out", required=True, help="export folder (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_quant_args(p)
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("export", help="re-export a packed checkpoint; --push-to-hub uploads it")
    p.add_argument("checkpoint", help="a pack-quantized folder (a qat export or another tool's)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this Hub repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--bits", type=int, default=None, metavar="R",
                   help="Matryoshka: export the R-bit slice (2-7) of an int8 checkpoint's codes")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("inspect", help="per-layer report (bits, group, bytes) of a packed checkpoint")
    p.add_argument("checkpoint")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
