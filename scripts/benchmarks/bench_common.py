"""What every benchmark script shares: the machine line, peak-RSS reading and where results are written.

Scripts in this folder import it as a sibling (``python scripts/benchmarks/X.py`` puts this folder
first on sys.path). Results go to docs/benchmarks/<name>.{md,json,png}; docs/BENCHMARKS.md links them.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


def machine() -> str:
    """One line naming the machine a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}")


def vm_bytes(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset VmHWM (peak RSS) to the current RSS, so the next peak covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write_results(name: str, markdown: str, data: dict, out_dir: Path | str | None = None) -> Path:
    """docs/benchmarks/<name>.md and .json (a plot, when a script makes one, goes beside them)."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return out


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin (generated) -->", f"<!-- {name}:end -->"


def write_section(page: Path | str, name: str, markdown: str) -> Path:
    """Put a script's generated markdown into ``page`` between its markers (added at the end the first
    time); the rest of the page is kept as it is."""
    page = Path(page)
    begin, end = section_markers(name)
    text = page.read_text() if page.exists() else ""
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page


def load_export(path: Path | str, decompress: bool = True):
    """An export as a user loads it with transformers, then its online transforms applied
    (qat.online_hadamard.apply_export_transforms; none for plain exports). ``decompress``: transformers'
    own ``run_compressed=False``, which asymmetric exports need (their packed zero points do not place
    in the compressed load of compressed-tensors 0.20; docs/TRAINING_MODES.md "Asymmetric grids")."""
    from transformers import AutoModel
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qat.online_hadamard import apply_export_transforms

    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if decompress else {}
    return apply_export_transforms(AutoModel.from_pretrained(str(path), dtype=torch.float32, **kwargs), path).eval()
