"""Dated markdown reports for benchmarks: hardware, versions, config, command, results; and the
report of ``benchmarks/gpu_check.sh`` (``python -m benchmarks.report gpu-check DIR``), assembled from
the files its sections left in DIR.

torch is imported only where a device is described, so the GPU check's report can still be written
(saying what is missing) by a python without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import platform
import re
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None or 0: unchanged) inside, restored after: a benchmark's
    ``main()`` is also called in-process, by tests."""
    import torch

    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


def hardware(device: torch.device) -> str:
    """One line naming the device the benchmark ran on."""
    import torch

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
    import torch

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


# ------------------------------------------------------------------ benchmarks/gpu_check.sh's report

MFU_TARGET = 0.45  # docs/design.md §7: video-1b3 at ~32k tokens, bf16, one H100
ATTENTION_TARGET = 550.0  # docs/design.md §7: attention forward TFLOP/s at head dim 128, ≥ 8k tokens
# parity tolerance on losses and gradient norms: fp32 on CPU is exact up to reduction order; bf16
# autocast on GPUs differs by the rounding of kernels that see other shapes (cp cuts the tokens)
PARITY_RTOL = {"cpu-smoke": 1e-4, "gpu": 1e-2}
PARITY_PAIRS = (("cp2", "1gpu"), ("cp2ring", "1gpu"), ("dp_replicate2", "dp_shard2"))
_ERROR_LINE = re.compile(r"^([\w.]+(Error|Exception)\b.*|(config )?error:.*|.*out of memory.*)$", re.I)


def _esc(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md(rows: list[dict]) -> str:
    """A markdown table over every key any row has (cells escaped, missing ones "–"), or "(no case)"."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return table([{k: _esc(r.get(k, "–")) for k in keys} for r in rows]) if rows else "(no case)"


def _tsv(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if not lines:
        return []
    keys = lines[0].split("\t")
    # a short line (empty trailing fields) is padded, so every row has every key
    return [
        dict(zip(keys, [*line.split("\t"), *[""] * len(keys)], strict=False)) for line in lines[1:] if line
    ]


def _json(path: Path):
    """The JSON in ``path`` (a whole file, else its last line that parses; a .jsonl: a list), or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    if path.suffix == ".jsonl":
        return [r for r in map(_json_line, text.splitlines()) if r is not None]
    whole = _json_line(text)
    if whole is not None:
        return whole
    return next(filter(None, map(_json_line, reversed(text.splitlines()))), None)


def _json_line(text: str):
    try:
        return json.loads(text)
    except ValueError:  # a line cut by a killed process, a log line before the JSON
        return None


def _reason(out: Path, case: dict) -> str:
    """What the script recorded, plus the last error line of the case's log when it did not succeed."""
    detail = case.get("detail", "")
    if case.get("status") in ("ok", "skipped", "not run") or not case.get("log"):
        return detail
    try:
        lines = [ln.strip() for ln in (out / case["log"]).read_text(errors="replace").splitlines()]
    except OSError:
        return detail
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln) and "ChildFailedError" not in ln]
    last = (errors or lines or [""])[-1][:300]
    return f"{detail}: {last}" if last else detail


def _load(out: Path, case: dict):
    return _json(out / case["json"]) if case.get("json") else None


def _f(value, fmt: str = ".4g") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "–"


def _layout(layout) -> str:
    if isinstance(layout, dict):  # the degrees above 1 (all 1: one GPU)
        keys = ("dp_replicate", "dp_shard", "cp", "tp")
        return ",".join(f"{k}={layout[k]}" for k in keys if layout.get(k, 1) != 1) or "1 GPU"
    return str(layout)


def _plan_text(p: dict) -> str:
    """One line of a plan: memory against capacity, fit, step time, MFU."""
    text = f"{_f(p.get('memory_gib'), '.1f')} of {_f(p.get('capacity_gib'), '.0f')} GiB/GPU"
    text += f", fits: {p.get('fits')}, step {_f(p.get('step_s'), '.3g')} s, MFU {_f(p.get('mfu'), '.1%')}"
    return text + (f" ({p['settings']['ac']} checkpointing)" if "settings" in p else "")


def _dry_run_text(data: dict) -> str:
    """What a dry run (ok, errors, layout, plan) or ``benchmarks.plan --fit`` (ranked, best) printed."""
    bits = []
    if "ok" in data:
        bits.append("ok" if data["ok"] else "NOT ok")
    for key in ("errors", "warnings"):
        if data.get(key):
            bits.append(f"{len(data[key])} {key[:-1]}(s): " + "; ".join(map(str, data[key][:3])))
    if "layout" in data:
        bits.append(f"layout {_layout(data['layout'])}")
    if "buckets" in data:
        bits.append(f"{len(data['buckets'])} bucket(s), planned at {data.get('plan_bucket')}")
    if isinstance(data.get("plan"), dict):
        bits.append("plan " + _plan_text(data["plan"]))
    if "ranked" in data:
        bits.append(f"{data.get('fitting')} of {data.get('tried')} (layout, checkpointing) fit")
        best = (data["ranked"] or [None])[0]
        if best:  # the whole plan of the best is in "best"; the ranked rows are short
            bits.append(f"best: {best['layout']} ac={best['ac']}: {_plan_text(data.get('best') or best)}")
            rest = "; ".join(f"{r['layout']} ac={r['ac']} {_f(r['mfu'], '.1%')}" for r in data["ranked"][1:4])
            bits.append(f"next: {rest}" if rest else "no other")
    return ", ".join(bits)


def _dry_run_rows(out: Path, cases: list[dict]) -> list[dict]:
    rows = []
    for c in cases:
        data = _load(out, c)
        result = ""
        if isinstance(data, dict):
            result = _dry_run_text(data)
        elif c["status"] == "ok":
            result = f"no JSON on stdout ({c.get('json')})"
        rows.append(
            {
                "case": c["case"],
                "status": c["status"],
                "s": c["seconds"],
                "result": result,
                "reason": _reason(out, c),
            }
        )
    return rows


def _step_rows(out: Path, cases: list[dict]) -> list[dict]:
    rows = []
    for c in cases:
        m = re.fullmatch(r"steps-ac=(.+)-compile=(on|off)", c["case"])
        ac, compiled = m.groups() if m else (c["case"], "?")
        data = _load(out, c) if c["status"] == "ok" else None
        row = {"checkpointing": ac, "compile": compiled, "status": c["status"], "s": c["seconds"]}
        r = (data or {}).get("rows") or [{}]
        skipped = (data or {}).get("skipped") or []
        reason = _reason(out, c)
        if data is not None and not data.get("rows"):
            why = skipped[0]["reason"] if skipped else "no row in its JSON"
            row["status"] = "OOM" if "OutOfMemory" in why or "out of memory" in why else "could not run"
            reason = why
        row |= {
            "step s": _f(r[0].get("step s (median)"), ".3f"),
            "tokens/s": _f(r[0].get("tokens/s"), ",.0f"),
            "model TFLOP/s": _f(r[0].get("model TFLOP/s")),
            "hardware TFLOP/s": _f(r[0].get("hardware TFLOP/s")),
            "MFU": _f(r[0].get("MFU"), ".1%"),
            "max memory GiB": r[0].get("max memory GiB", "–"),
            "reason": reason,
        }
        rows.append(row)
    return rows


def _attention_rows(out: Path, cases: list[dict]) -> list[dict]:
    rows = []
    for c in cases:
        data = _load(out, c) if c["status"] == "ok" else None
        backend = c["case"].removeprefix("attention-").replace("-", ":", 1)
        if data is None:
            rows.append({"backend": backend, "status": c["status"], "reason": _reason(out, c)})
            continue
        for r in data.get("attention", []):
            rows.append(
                {
                    "backend": r["backend"],
                    "status": "ok",
                    "H×Dh×N": f"{r['H']}×{r['Dh']}×{r['N']}",
                    "fwd ms": _f(r["fwd ms"], ".3f"),
                    "fwd TFLOP/s": _f(r["fwd TFLOP/s"], ".1f"),
                    "fwd+bwd TFLOP/s": _f(r["fwd+bwd TFLOP/s"], ".1f"),
                    "fwd % of peak": _f(r["fwd % of peak"], ".1%"),
                    "reason": "",
                }
            )
        for s in data.get("skipped", []):
            rows.append(
                {"backend": backend, "status": "could not run", "H×Dh×N": s["case"], "reason": s["reason"]}
            )
    keys = (
        "backend",
        "status",
        "H×Dh×N",
        "fwd ms",
        "fwd TFLOP/s",
        "fwd+bwd TFLOP/s",
        "fwd % of peak",
        "reason",
    )
    return [{k: r.get(k, "–") for k in keys} for r in rows]


def _parity_rows(out: Path, cases: list[dict], rtol: float) -> list[dict]:
    runs = {c["case"].removeprefix("train-"): c for c in cases if c["case"].startswith("train-")}
    rows = []
    for name, ref in PARITY_PAIRS:
        row = {"layout": name, "against": ref}
        missing = [r for r in (name, ref) if r not in runs or runs[r]["status"] != "ok"]
        if missing:
            why = "; ".join(
                f"{r}: {runs[r]['status']} ({_reason(out, runs[r])})" if r in runs else f"{r}: not run"
                for r in missing
            )
            rows.append(row | {"verdict": "not compared", "reason": why})
            continue
        a, b = ({m["step"]: m for m in _load(out, runs[r]) or [] if "loss" in m} for r in (name, ref))
        steps = sorted(a.keys() & b.keys())
        diffs = {}
        for key in ("loss", "grad_norm"):
            diffs[key] = max(
                (abs(a[s][key] - b[s][key]) / max(abs(b[s][key]), 1e-12) for s in steps), default=float("nan")
            )
        ok = bool(steps) and a.keys() == b.keys() and all(d <= rtol for d in diffs.values())
        rows.append(
            row
            | {
                "steps": len(steps),
                "losses": " / ".join(f"{a[s]['loss']:.5f}" for s in steps),
                "reference losses": " / ".join(f"{b[s]['loss']:.5f}" for s in steps),
                "max rel diff loss": _f(diffs["loss"], ".2e"),
                "max rel diff grad_norm": _f(diffs["grad_norm"], ".2e"),
                "verdict": "PASS" if ok else "FAIL",
                "reason": "" if ok else f"a difference above {rtol:g}, or different steps logged",
            }
        )
    return rows


def _plan_rows(out: Path, cases: list[dict], gpu: str) -> list[dict]:
    """The planner's prediction for each measured training-step case (one GPU, no EMA: what was run)."""
    from dit.config import get_preset
    from parallel.plan import Layout, plan

    rows = []
    for c in cases:
        data = _load(out, c) if c["status"] == "ok" else None
        if not data or not data.get("rows"):
            continue
        a, r = data["args"], data["rows"][0]
        row = {"checkpointing": r["checkpointing"], "compile": "on" if r["compile"] else "off"}
        try:
            arch = get_preset(a["presets"][0], **({"depth": a["depth"]} if a["depth"] else {}))
            p = plan(
                arch,
                *a["shapes"][0],
                batch=a["batch"],
                text_len=a["text_len"],
                gpu=gpu,
                layout=Layout(),
                ac=r["checkpointing"],
                ema=False,
            )
        except Exception as e:  # noqa: BLE001 - a planner refusal is this row's result
            rows.append(row | {"reason": f"{type(e).__name__}: {e}"[:300]})
            continue
        rows.append(
            row
            | {
                "memory GiB plan": _f(p["memory_gib"], ".1f"),
                "measured": r["max memory GiB"],
                "fits (plan)": p["fits"],
                "step s plan": _f(p["step_s"], ".3f"),
                "measured s": _f(r["step s (median)"], ".3f"),
                "MFU plan": _f(p["mfu"], ".1%"),
                "measured MFU": _f(r["MFU"], ".1%"),
                "reason": "",
            }
        )
    return rows


def _environment(out: Path, env: dict) -> str:
    smi = (out / "nvidia-smi.csv").read_text().strip() if (out / "nvidia-smi.csv").is_file() else ""
    torch_line = (
        f"{env['torch']} (CUDA build {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, "
        f"torch.cuda.is_available() = {env.get('cuda_available')})"
        if env.get("torch")
        else f"not importable: {env.get('torch_error', 'the probe did not run (logs/0-env.log)')}"
    )
    devices = env.get("devices") or []
    gpu = (
        f"{devices[0]} × {len(devices)}, {env.get('memory_gib')} GiB, sm {env.get('capability')}"
        if devices
        else "none"
    )
    plan_gpu = env.get("plan_gpu", "?")
    if not env.get("gpu"):
        plan_gpu += " (not in the planner's table: planned as h100)" if env.get("gpu_name") else " (no GPU)"
    lines = [
        f"- mode: {env.get('mode', '?')}; command: `{env.get('command', '?')}`; commit: {env.get('commit')}",
        f"- GPU (torch): {gpu}; planner GPU: {plan_gpu}",
        "- nvidia-smi (index, name, memory, driver, power limit): "
        + (f"`{smi}`" if smi else "not available"),
        f"- python {env.get('python', '?')}; torch {torch_line}",
        f"- flash-attn: {env.get('flash_attn') or 'not installed'}; FlashAttention-3 (flash_attn_interface): "
        f"{'installed' if env.get('flash_attn_3') else 'not installed'}; triton: {env.get('triton')}",
    ]
    errors = env.get("project_import_errors")
    lines.append("- project imports: " + ("ok" if errors == [] else "; ".join(errors or ["not checked"])))
    return "\n".join(lines)


def _verdict(what: str, measured: list, target: float, target_text: str, best_text, target_after=None) -> str:
    """One target line: the best of ``measured`` ((value, row) pairs) against ``target``."""
    if not measured:
        return f"- {what}: not measured (target ≥ {target_text})"
    best, r = max(measured, key=lambda x: x[0])
    verdict = "met" if best >= target else "NOT met"
    return f"- {what}: best {best_text(best, r)}; target ≥ {target_after or target_text}: {verdict}"


def _targets(env: dict, steps: list[dict], attn: list[dict]) -> str:
    if env.get("mode") != "gpu":
        return "Targets: not applicable in --cpu-smoke (tiny sizes on a CPU: only the script is checked)."
    mfus = [(float(r["MFU"].rstrip("%")) / 100, r) for r in steps if r["MFU"] != "–"]
    fwd = [(float(r["fwd TFLOP/s"]), r) for r in attn if r["fwd TFLOP/s"] != "–" and "×128×" in r["H×Dh×N"]]
    lines = [
        _verdict(
            "video-1b3 MFU", mfus, MFU_TARGET, f"{MFU_TARGET:.0%}",
            lambda best, r: f"{best:.1%} (checkpointing {r['checkpointing']}, compile {r['compile']})",
        ),
        _verdict(
            "attention forward at head dim 128", fwd, ATTENTION_TARGET, f"{ATTENTION_TARGET:.0f} TFLOP/s",
            lambda best, r: f"{best:.0f} TFLOP/s ({r['backend']}, {r['H×Dh×N']})",
            target_after=f"{ATTENTION_TARGET:.0f}",
        ),
    ]  # fmt: skip
    return "Targets (docs/design.md §7):\n\n" + "\n".join(lines)


NOTES = {
    1: "`launch.train --dry-run` per shipped config (placeholder folders for the `???` paths: a Wan-VAE "
    "`config.json`, empty shard folders), then `benchmarks.plan … --fit`. Result: the JSON each printed.",
    2: "`benchmarks.throughput`, one process per case: whole training steps (forward, backward, AdamW) "
    "of a model built as the trainer builds it, bf16 autocast over fp32 weights (fp32 in --cpu-smoke), "
    "SDPA, one device. MFU = "
    "model FLOPs (3 × forward, `dit.flops`) per second / dense bf16 peak; hardware TFLOP/s adds the "
    "recomputed work. A case that cannot run (OOM, a mode `parallel/` does not know) says why.",
    3: "`benchmarks.throughput --no-train`, one process per backend: `dit.attention.attention` alone, no "
    "mask, bf16 (fp32 in --cpu-smoke); forward FLOPs 4·B·H·N²·Dh, forward+backward counted as 3 × forward.",
    4: "`launch.train` on the tiny demo config (synthetic clips, one 4×32×32 bucket, 3 steps, every step "
    "logged) under `torchrun --nproc-per-node 2`, compared step by step (loss and grad_norm) with a run "
    "that reads the same batches: cp=2 with one process, dp_replicate=2 with dp_shard=2.",
    5: "`parallel.plan.plan` for each measured case (one GPU, no EMA: what section 2 ran) next to the "
    "measurement: peak memory (torch.cuda.max_memory_allocated), step time and MFU.",
}


def _section_body(n: int, out: Path, cases: list[dict], env: dict, steps: list[dict]) -> tuple[str, list]:
    if n == 1:
        rows = _dry_run_rows(out, cases)
    elif n == 2:
        rows = steps
    elif n == 3:
        rows = _attention_rows(out, cases)
    elif n == 4:
        rows = _parity_rows(out, cases, PARITY_RTOL.get(env.get("mode", "gpu"), 1e-2))
        steps_run = [
            {"run": c["case"], "status": c["status"], "s": c["seconds"], "reason": _reason(out, c)}
            for c in cases
        ]
        return _md(rows) + "\n\nRuns:\n\n" + _md(steps_run), rows
    else:
        try:
            rows = _plan_rows(out, cases, env.get("plan_gpu") or "h100")
        except Exception as e:  # noqa: BLE001 - the planner missing or broken is this section's result
            return f"The planner could not run: {type(e).__name__}: {e}", []
        if not rows:
            return "(no measured case to compare: see section 2)", []
    return _md(rows), rows


def gpu_check_report(out: Path, seconds: int | None = None) -> Path:
    """Write ``out/report.md`` from what ``benchmarks/gpu_check.sh`` left in ``out``.

    Args:
        out: the check's folder (``env.json``, ``sections.tsv``, ``cases.tsv``, ``json/``, ``logs/``).
        seconds: the check's wall time, for the header.
    """
    env = _json(out / "env.json") or {}
    sections = _tsv(out / "sections.tsv")
    cases = _tsv(out / "cases.tsv")
    by_section = {s["section"]: [c for c in cases if c["section"] == s["section"]] for s in sections}
    steps = _step_rows(out, by_section.get("2", []))
    attn = _attention_rows(out, by_section.get("3", []))
    parts, summary = [], []
    for s in sections:
        n, own = int(s["section"]), by_section[s["section"]]
        if s["status"] != "ran":
            body = f"Not run: {s['reason']}"
            summary.append(
                {"section": n, "title": s["title"], "status": "not run", "cases": "–", "reason": s["reason"]}
            )
        else:
            body, _ = _section_body(n, out, own if n != 5 else by_section.get("2", []), env, steps)
            counts = Counter(c["status"] for c in own)
            counted = ", ".join(f"{k} {v}" for k, v in counts.items()) if n != 5 else "–"
            summary.append(
                {"section": n, "title": s["title"], "status": "ran", "cases": counted, "reason": ""}
            )
            budget = f"Time budget: {s['budget_s']} s." if s["budget_s"].isdigit() else ""
            body = f"{NOTES[n]} {budget}\n\n{body}"
        parts.append(f"## {n}. {s['title']}\n\n{body}")
    head = [
        f"# GPU check, {dt.date.today().isoformat()}"
        + (" (--cpu-smoke)" if env.get("mode") == "cpu-smoke" else ""),
        f"Wall time {seconds} s (budget {env.get('budget', '?')} s). Written by `benchmarks/gpu_check.sh`; "
        "raw outputs in `json/`, `logs/` and `cases.tsv` next to this file.",
        "## Environment\n\n" + _environment(out, env),
        "## Summary\n\n" + _md(summary) + "\n\n" + _targets(env, steps, attn),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(head + parts) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gpu-check", help="assemble report.md in a benchmarks/gpu_check.sh folder")
    g.add_argument("dir", type=Path)
    g.add_argument("--seconds", type=int, help="the check's wall time")
    a = p.parse_args(argv)
    if not (a.dir / "cases.tsv").is_file():
        p.error(f"{a.dir}: no cases.tsv (not a folder written by benchmarks/gpu_check.sh)")
    print(gpu_check_report(a.dir, a.seconds))


if __name__ == "__main__":
    main()
