"""Assemble docs/BENCHMARKS.md from what the benchmark scripts wrote to docs/benchmarks/ (no table by hand).

    python scripts/benchmarks/make_report.py

Each section is the script's own markdown (its command, machine, tables and target verdicts) followed
by its plot; a script that has not been run yet is listed with the command that produces it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS_DIR, section_markers  # noqa: E402

SECTIONS = [
    ("quality", "Quality on a real pretrained encoder (all-MiniLM-L6-v2)",
     "python scripts/benchmarks/quality.py"),
    ("speed_memory", "Step time and peak memory (~100M-parameter Llama, CPU)",
     "python scripts/benchmarks/speed_memory.py"),
    ("causal_lm", "Causal-LM perplexity (a small Llama pretrained by us on the standard library's docs)",
     "python scripts/benchmarks/causal_lm.py"),
]
INTRO = """# Benchmarks

qat against post-training quantization and the tools users pick instead (peft + bitsandbytes QLoRA,
torchao QAT), on real pretrained weights. Everything below is generated: each script writes its
section to `docs/benchmarks/<name>.md` (+ `.json` with every number, + `.png`), and
`python scripts/benchmarks/make_report.py` assembles this page. Re-run a script whenever a change could
move its numbers, then this one.

Related figures elsewhere: adapter initialisations per layer ([ADAPTERS.md](ADAPTERS.md)),
post-training quantization of MiniLM ([RESULTS.md](RESULTS.md)), the main job ([TRAINING.md](TRAINING.md)),
zeroth-order memory ([zo_memory.md](zo_memory.md)), distributed communication bytes
([distributed_comm_bytes.md](distributed_comm_bytes.md)), kernels ([KERNELS.md](KERNELS.md)).

The quality table below (stop 33) is the current default recipe (asymmetric, GPTQ fitting the float
model's outputs, step lr 3e-5), `qat_best` (the best recipe measured per width, whose export needs the
transform step), qat's and llm-compressor's GPTQ and llm-compressor's RTN, every row one setting
(`--budget 1`), followed by the issue-14 targets checked against it. Its rows come from the runs printed in
it, all of commit c03e9b8 (the widths split over the machine's two cores, side by side, and ternary's
GPTQ row after them, then merged by
`quality_report.py --merge`, which refuses runs whose protocol, splits or machine differ): the same
protocol, splits and scoring as one run; only the seconds column carries the other run's load.
Earlier tables: [benchmarks/quality_asym_default_stop30.md](benchmarks/quality_asym_default_stop30.md)
(plain-GPTQ default, step lr 1e-4, before the float target) and
[benchmarks/quality_symmetric_default_stop28.md](benchmarks/quality_symmetric_default_stop28.md).
"""


def demote(markdown: str) -> str:
    """The script's page becomes a section: its headings go one level down."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def section(name: str, title: str, command: str, results: Path) -> str:
    begin, end = section_markers(name)  # a script may rewrite its own section in place (write_section)
    return f"{begin}\n{section_text(name, title, command, results).rstrip()}\n{end}\n"


def section_text(name: str, title: str, command: str, results: Path) -> str:
    page, plot = results / f"{name}.md", results / f"{name}.png"
    if not page.exists():
        return f"## {title}\n\nNot run yet: `{command}`.\n"
    body = demote(page.read_text()).splitlines()
    body = body[1:] if body and body[0].startswith("## ") else body  # the script's own title -> ours
    text = f"## {title}\n\nFull numbers: [benchmarks/{name}.json](benchmarks/{name}.json).\n" + "\n".join(body)
    if plot.exists():
        text += f"\n\n![{name}](benchmarks/{name}.png)\n"
    return text


def main() -> int:
    parts = [INTRO] + [section(n, t, c, RESULTS_DIR) for n, t, c in SECTIONS]
    out = RESULTS_DIR.parent / "BENCHMARKS.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
