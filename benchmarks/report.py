"""Dated markdown reports for benchmarks: hardware, versions, config, command, results."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def hardware(device: torch.device) -> str:
    """One line naming the device the benchmark ran on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def versions(*packages: str) -> str:
    found = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def table(rows: list[dict]) -> str:
    """Markdown table from dicts sharing keys."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write(
    name: str,
    module: str,
    title: str,
    device: torch.device,
    config: dict,
    body: str,
    packages: tuple[str, ...] = (),
) -> Path:
    """Write ``benchmarks/results/{date}-{name}.md`` and return its path.

    Args:
        name: file stem after the date.
        module: the benchmark's module, to record the command as ``python -m module args…``.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = dt.date.today().isoformat()
    path = RESULTS / f"{today}-{name}.md"
    cfg_lines = "\n".join(f"- {k}: `{v}`" for k, v in config.items())
    command = " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])])
    path.write_text(
        f"# {title}\n\n"
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}\n"
        f"- hardware: {hardware(device)}\n"
        f"- versions: {versions(*packages)}\n"
        f"- command: `{command}`\n\n"
        f"## Config\n\n{cfg_lines}\n\n## Results\n\n{body}\n"
    )
    return path
