"""Peak memory and step time of fine-tuning: full vs LoRA (rank 16, 64) vs LoRA + activation offload vs
LoRA on a bf16 base, with and without activation checkpointing.

``python -m benchmarks.finetune_memory [--preset video-small] [--shapes 4x16x16,4x32x32]
[--cases full,lora16,lora64,lora16+offload,lora16+bf16] [--ac full,none] [--steps 2] [--threads 1]``
runs every case at every latent shape under every checkpointing mode, each in a fresh subprocess
(nothing one case allocated or cached lingers in the next), all in one invocation, and writes
``benchmarks/results/{date}-finetune_memory-cpu.md``: one table per checkpointing mode, each case
against full fine-tuning under the same mode and shape.

One case: the model (seeded random weights), LoRA through :func:`launch.lora.apply_lora` on the default
targets (every block's attention q/k/v/o and FFN fc1/fc2; nothing else trains), the frozen base stored
as ``finetune.base_dtype`` says (:func:`launch.lora.store_base`), activation checkpointing as
``parallel.activation_checkpointing`` (:func:`parallel.parallelize.apply_activation_checkpointing`,
full fine-tuning included), activation offload through :func:`parallel.offload.apply_memory_options`
(after checkpointing, as ``parallelize`` orders them), AdamW over the trainable parameters, flow
matching loss on random latents and captions, fp32 compute (no autocast). One warm-up step (it creates
AdamW's states), then ``--steps`` timed steps (median), then one step under :class:`LiveBytes`.

Peak memory: :class:`LiveBytes` counts every tensor storage alive at each op (parameters, gradients,
AdamW states, inputs, activations, temporaries the ops return) through a ``TorchDispatchMode``, and
takes the maximum over the step of live bytes minus what the memory options hold in host memory
(offloaded activations): the device memory a GPU would need, less the allocator's fragmentation and
kernels' internal workspaces, which it does not see. ``resource.getrusage`` (maxrss) is not used: it
counts the interpreter, libraries and freed-but-cached pages, and never goes down. Step times come
from a shared machine: compare the ratios of one run, not absolute times; on CPU an "offloaded"
activation is a host-to-host copy, so its step time says nothing of a GPU's PCIe overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CASES = {
    "full": dict(rank=0, offload=False, base="fp32"),
    "lora16": dict(rank=16, offload=False, base="fp32"),
    "lora64": dict(rank=64, offload=False, base="fp32"),
    "lora16+offload": dict(rank=16, offload=True, base="fp32"),
    "lora16+bf16": dict(rank=16, offload=False, base="bf16"),
}
"""The cases: LoRA rank (0: full fine-tuning), activation offload, ``finetune.base_dtype``."""

AC_MODES = ("full", "none")
"""``parallel.activation_checkpointing`` modes of the default run, each applied to every case."""

TARGET_PEAK = 0.40
"""Issue 16's target: LoRA's peak memory at most this fraction of full fine-tuning's (and its step time
at most full's)."""


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes, by storage, at every op dispatched while active, and their peak.

    Every storage an op returns is counted once (views share it) until Python frees it (a finalizer on
    the storage); tensors made before the mode (parameters, optimizer states, inputs) are counted with
    :meth:`track`. ``host`` (e.g. :meth:`parallel.offload.MemoryOptions.host_bytes`) is what of the live
    bytes a GPU would hold in host memory: ``peak`` is of ``live - host()``, the device's share. Ops'
    internal workspaces (a kernel's scratch buffers) are not seen.
    """

    def __init__(self, host: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.host, self.live, self.peak = host, 0, 0
        self._ids: set[int] = set()

    def track(self, tensors: Iterable) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        self._update()

    def _add(self, storage) -> None:
        key = id(storage)
        if key in self._ids:
            return
        n = storage.nbytes()
        self._ids.add(key)
        self.live += n
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._ids.discard(key)
        self.live -= n

    def _update(self) -> None:
        self.peak = max(self.peak, self.live - self.host())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        self._update()
        return out


def _shape(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"--shapes: {text!r} is not latent TxHxW (e.g. 4x16x16)") from None
    return t, h, w


def run_case(
    preset: str, case: str, shape: str, steps: int, text_len: int, depth: int | None, ac: str = "none"
) -> dict:
    """One case in this process: trainable parameters, median step seconds, peak and static bytes.

    Args:
        preset, depth: the architecture (``depth`` None: the preset's).
        case: a key of :data:`CASES`.
        shape: latent ``TxHxW``.
        steps: timed steps after the warm-up (0: memory only).
        text_len: caption tokens.
        ac: ``parallel.activation_checkpointing`` (``none``, ``full``, ``every_K``, ``selective``).
    """
    from dit.config import get_preset
    from dit.model import build_model
    from parallel.offload import apply_memory_options
    from parallel.parallelize import apply_activation_checkpointing

    if case not in CASES:
        raise ValueError(f"--cases: unknown case {case!r}; expected some of {sorted(CASES)}")
    rank, offload, base = CASES[case]["rank"], CASES[case]["offload"], CASES[case]["base"]
    arch = get_preset(preset, **({"depth": depth} if depth else {}))
    model = build_model(arch, seed=0)
    if rank:  # peft (and the transformers it imports): only for a LoRA case
        from launch.config import LoraConfig
        from launch.lora import apply_lora, store_base

        apply_lora(model, LoraConfig(rank=rank), seed=0)
        store_base(model, base)
    apply_activation_checkpointing(model, ac)  # then the memory options, as parallelize orders them
    options = apply_memory_options(model, activation_offload=offload, block_swap=0, device="cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    t_, h, w = _shape(shape)
    x0 = torch.randn(1, arch.in_channels, t_, h, w, generator=g)
    ctx = torch.randn(1, text_len, arch.text_dim, generator=g) if arch.conditioning == "text" else None
    mask = torch.ones(1, text_len, dtype=torch.bool) if ctx is not None else None

    def step() -> None:
        noise = torch.randn(x0.shape, generator=g)
        s = torch.rand(1, generator=g)
        x_t = (1 - s) * x0 + s * noise  # flow matching: predict noise - x0
        loss = (model(x_t, s * 1000, ctx, mask) - (noise - x0)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's states exist from here
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tracker = LiveBytes(options.host_bytes)
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tracker.track(
        [*model.parameters(), *model.buffers(), *states, x0, *(t for t in (ctx, mask) if t is not None)]
    )
    static = tracker.live
    with tracker:
        step()
    return {
        "case": case,
        "ac": ac,
        "shape": shape,
        "tokens": (t_ // arch.patch_size[0]) * (h // arch.patch_size[1]) * (w // arch.patch_size[2]),
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(times) if times else float("nan"),
        "peak_bytes": tracker.peak,
        "static_bytes": static,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.finetune_memory", description=__doc__.splitlines()[0]
    )
    p.add_argument("--preset", default="video-small")
    p.add_argument("--depth", type=int, help="override the preset's depth (a fast run)")
    p.add_argument(
        "--shapes", default="4x16x16,4x32x32", help="latent TxHxW, comma-separated (two token counts)"
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    p.add_argument(
        "--ac", default=",".join(AC_MODES), help="parallel.activation_checkpointing modes, comma-separated"
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (median)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each case's process")
    p.add_argument("--out", default="finetune_memory-cpu", help="report name after the date ('' : none)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a case's subprocess
    return p.parse_args(argv)


def _subprocess(a: argparse.Namespace, case: str, shape: str, ac: str) -> dict:
    """One case in a fresh interpreter: its JSON line, plus the machine's load average when it ended."""
    cmd = [sys.executable, "-m", "benchmarks.finetune_memory", "--one", "--cases", case, "--shapes", shape]
    cmd += ["--ac", ac, "--preset", a.preset, "--steps", str(a.steps), "--text-len", str(a.text_len)]
    cmd += ["--threads", str(a.threads)] + (["--depth", str(a.depth)] if a.depth else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"case {case} at {shape} (ac {ac}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"load": os.getloadavg()[0]}


def rows_with_ratios(results: list[dict]) -> list[dict]:
    """Report rows: each case with its peak and step time relative to full fine-tuning under the same
    checkpointing mode at the same shape."""
    full = {(r.get("ac", "none"), r["shape"]): r for r in results if r["case"] == "full"}
    rows = []
    for r in results:
        ref = full.get((r.get("ac", "none"), r["shape"]))
        rows.append(
            {
                "checkpointing": r.get("ac", "none"),
                "case": r["case"],
                "latent T×H×W": r["shape"],
                "tokens": r["tokens"],
                "trainable params": f"{r['trainable']:,}",
                "trainable %": f"{100 * r['trainable'] / r['total']:.2f}",
                "peak MiB": f"{r['peak_bytes'] / 2**20:.0f}",
                "peak / full": f"{r['peak_bytes'] / ref['peak_bytes']:.3f}" if ref else "",
                "params+states MiB": f"{r['static_bytes'] / 2**20:.0f}",
                "step s": f"{r['step_s']:.2f}",
                "step / full": f"{r['step_s'] / ref['step_s']:.3f}" if ref else "",
                "load": f"{r['load']:.1f}" if "load" in r else "",
            }
        )
    return rows


def verdicts(results: list[dict]) -> list[str]:
    """One line per LoRA case, checkpointing mode and shape: issue 16's two targets (peak ≤
    :data:`TARGET_PEAK` × full's, step time ≤ full's), each said to hold or not, with the ratio."""
    full = {(r.get("ac", "none"), r["shape"]): r for r in results if r["case"] == "full"}
    lines = []
    for r in results:
        ref = full.get((r.get("ac", "none"), r["shape"]))
        if r["case"] == "full" or ref is None:
            continue
        peak, step = r["peak_bytes"] / ref["peak_bytes"], r["step_s"] / ref["step_s"]
        say = {True: "holds", False: "does NOT hold"}
        lines.append(
            f"- checkpointing {r.get('ac', 'none')}, {r['tokens']} tokens, {r['case']}: peak / full "
            f"{peak:.3f} (≤ {TARGET_PEAK:.2f}: {say[peak <= TARGET_PEAK]}); step / full {step:.3f} "
            f"(≤ 1: {say[step <= 1]})"
        )
    return lines


def _body(rows: list[dict], results: list[dict], acs: list[str]) -> str:
    """The report's results: a table per checkpointing mode, the targets, the method."""
    from benchmarks import report

    parts = []
    for ac in acs:
        mine = [{k: v for k, v in r.items() if k != "checkpointing"} for r in rows]
        mine = [m for m, r in zip(mine, rows, strict=True) if r["checkpointing"] == ac]
        if mine:
            parts.append(f"### parallel.activation_checkpointing={ac}\n\n" + report.table(mine))
    parts.append("### Targets\n\n" + "\n".join(verdicts(results)))
    return "\n\n".join(parts) + "\n\n" + METHOD


def main(argv: list[str] | None = None) -> dict:
    from parallel.config import checkpoint_every

    a = parse_args(argv)
    cases, shapes, acs = a.cases.split(","), a.shapes.split(","), a.ac.split(",")
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"--cases: unknown case {c!r}; expected some of {sorted(CASES)}")
    for sh in shapes:
        _shape(sh)
    for ac in acs:
        checkpoint_every(ac, "--ac")
    if a.one:
        torch.set_num_threads(a.threads)
        print(json.dumps(run_case(a.preset, cases[0], shapes[0], a.steps, a.text_len, a.depth, acs[0])))
        return {}
    load_start, results = os.getloadavg(), []
    for ac in acs:
        for sh in shapes:
            for c in cases:
                results.append(_subprocess(a, c, sh, ac))
                r = results[-1]
                print(
                    f"ac {ac} {c} {sh}: trainable {r['trainable']:,}, peak {r['peak_bytes'] / 2**20:.0f} "
                    f"MiB, {r['step_s']:.2f} s, load {r['load']:.1f}",
                    flush=True,
                )
    rows = rows_with_ratios(results)
    out = {"rows": rows, "results": results, "verdicts": verdicts(results)}
    if a.out:
        from benchmarks import report

        config = {"preset": a.preset, "depth": a.depth or "preset", "shapes": a.shapes, "cases": a.cases}
        config |= {"activation checkpointing": a.ac, "steps": a.steps, "text_len": a.text_len}
        config |= {"threads per case": a.threads, "CPU cores": os.cpu_count()}
        end = os.getloadavg()
        config |= {"load average (1, 5, 15 min) at start": " ".join(f"{v:.1f}" for v in load_start)}
        config |= {"load average (1, 5, 15 min) at end": " ".join(f"{v:.1f}" for v in end)}
        body = _body(rows, results, acs)
        out["path"] = str(
            report.write(a.out, "benchmarks.finetune_memory", TITLE, torch.device("cpu"), config, body)
        )
    return out


TITLE = "Fine-tuning memory and step time: full vs LoRA vs LoRA + offload / bf16 base, ± checkpointing (CPU)"
METHOD = """Method: every case runs in its own subprocess, one after another in one invocation, so the ratios
of a table are measured side by side in one run. Every case of a table runs under the same
parallel.activation_checkpointing (full fine-tuning too), applied as the trainer applies it (torch's
composable checkpoint on every block, then the memory options). Compute is fp32 throughout (no autocast):
"lora16+bf16" stores the frozen base in bf16 (finetune.base_dtype=bf16, launch.lora.store_base) and
upcasts each weight for its call, a transient fp32 copy that a linear saves for backward when its block
is not checkpointed (a GPU under bf16 autocast uses the bf16 weight itself and saves no copy).
Peak memory is the maximum over one training step (forward, backward, AdamW step, zero_grad; AdamW's
states already exist) of the bytes of every live tensor storage, tracked op by op with a
TorchDispatchMode (benchmarks.finetune_memory.LiveBytes), minus what activation offload holds in host
memory at that moment: what a GPU would hold, without the caching allocator's fragmentation and kernels'
internal workspaces. "params+states" is what is alive before the step (parameters, AdamW states,
inputs). Step time is the median of the timed steps on a CPU shared with other jobs ("load": the 1-minute
load average when the case ended): compare ratios within a table, not absolute times. On CPU activation
offload copies host to host (the same code path as a GPU's pinned device-to-host copies, without the
overlap), so its step time is not a GPU's.
Targets (issue 16): LoRA's peak <= 40% of full fine-tuning's; LoRA's step time <= full's.
"""


if __name__ == "__main__":
    main()
