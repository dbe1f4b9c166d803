"""Per-rank step time, memory and attention traffic of SpacetimeDiT under parallel layouts (CPU, gloo).

One gloo group per world size runs every layout of that size in the same processes, in alternating
steps, so each layout sees the same machine load (every rank busy with one thread, the "single"
layout included: each rank runs the whole unparallelized step). Per rank and layout it measures:

- step time: forward + backward, median of the timed steps after warm-up;
- activation bytes: distinct storages autograd saves for backward during the model's forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded: exact, layout-independent
  of the allocator, the number context parallelism should cut to ≈ 1/cp;
- step peak RSS: the highest resident set size during one forward + backward minus the RSS just before
  it, sampled every 0.5 ms from ``/proc/self/statm``. The workers run with glibc's mmap threshold at
  64 KiB so freed tensors go back to the OS and RSS follows live allocations; it covers activations,
  gradients, temporaries, FSDP all-gather and communication buffers, but is sampled, not exact;
- parameter bytes held by the rank (local shards), the static part of its memory;
- bytes sent by Ulysses/ring attention, counted by :class:`benchmarks.comm_volume.CommCounter`
  and compared with :func:`benchmarks.comm_volume.attention_comm_bytes`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from benchmarks.comm_volume import CommCounter, attention_comm_bytes
from dit.config import DiTConfig, get_preset
from dit.model import block_axes, build_model
from parallel.config import ParallelConfig
from parallel.parallelize import build_parallel_model, make_dims


def bench_arch(depth: int = 4) -> DiTConfig:
    """A Wan-shaped video DiT small enough for seconds-long CPU steps (hidden 256, 8 heads)."""
    return get_preset("video-small", hidden_size=256, num_heads=8, ffn_dim=1024, depth=depth, text_dim=256)


@dataclass
class Layout:
    name: str
    parallel: dict | None
    """``ParallelConfig`` fields; None: the plain single-process model, run whole on every rank."""


def default_layouts(world: int) -> list[Layout]:
    """The layouts compared at a world size (a layout naming a field the config lacks is dropped)."""
    if world == 2:
        layouts = [
            Layout("single", None),
            Layout("cp=2 Ulysses", {"cp": 2, "cp_ring": 1}),
            Layout("cp=2 ring", {"cp": 2, "cp_ring": 2}),
            Layout("tp=2", {"tp": 2}),
            Layout("tp=2 no SP", {"tp": 2, "sequence_parallel": False}),
        ]
    elif world == 4:
        layouts = [
            Layout("single", None),
            Layout("cp=4 Ulysses", {"cp": 4, "cp_ring": 1}),
            Layout("cp=4 ring", {"cp": 4, "cp_ring": 4}),
            Layout("cp=2×tp=2", {"cp": 2, "tp": 2, "cp_ring": 1}),
        ]
    else:
        raise ValueError(f"no default layouts for world size {world}")
    known = {f.name for f in fields(ParallelConfig)}
    return [lay for lay in layouts if lay.parallel is None or set(lay.parallel) <= known]


@dataclass
class Spec:
    arch: DiTConfig
    latent: tuple[int, int, int] = (8, 32, 32)
    batch: int = 1
    text_len: int = 32
    warmup: int = 2
    iters: int = 5
    layouts: list[Layout] = field(default_factory=list)


def _storages(t: torch.Tensor):
    """The plain storages under ``t``: a DTensor's local shard, the result inside an
    AsyncCollectiveTensor (tensor-parallel outputs), the tensor's own storage otherwise."""
    if is_traceable_wrapper_subclass(t):
        for attr in t.__tensor_flatten__()[0]:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    else:
        yield t.untyped_storage()


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward while active, parameters excluded.

    A parameter (or a view of it, like the transposed weight a linear saves) is recognised by its
    storage while the module that owns it runs: FSDP frees unsharded parameters after each block,
    so an address seen as a parameter once may later hold an activation.
    """

    def __init__(self, model: nn.Module):
        self.storages: dict[int, int] = {}
        self._params: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        for mod in model.modules():
            if next(mod.parameters(recurse=False), None) is not None:
                # registered after FSDP's pre-hook (which unshards), so the pointers are the live ones
                mod.register_forward_pre_hook(self._enter)
                mod.register_forward_hook(self._leave)

    def _ptrs(self, mod: nn.Module) -> set[int]:
        return {s.data_ptr() for p in mod.parameters(recurse=False) for s in _storages(p)}

    def _enter(self, mod: nn.Module, args) -> None:
        self._params |= self._ptrs(mod)

    def _leave(self, mod: nn.Module, args, out) -> None:
        self._params -= self._ptrs(mod)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        for storage in _storages(t):
            ptr = storage.data_ptr()
            if ptr not in self._params:
                # a saved tensor stays alive until backward, so its address names one storage
                self.storages[ptr] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedActivations:
        self.storages = {}
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the starting one, sampled by a daemon thread."""

    def __init__(self, interval: float = 5e-4):
        self.active, self.base, self.peak = False, 0, 0
        threading.Thread(target=self._loop, args=(interval,), daemon=True).start()

    def _loop(self, interval: float) -> None:
        while True:
            if self.active:
                self.peak = max(self.peak, _rss())
            time.sleep(interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _build(lay: Layout, arch: DiTConfig, world: int) -> tuple[nn.Module, int]:
    """The model of one layout and its loss multiplier (``dims.grad_scale``)."""
    if lay.parallel is None:
        return build_model(arch, seed=0), 1
    pcfg = ParallelConfig(**lay.parallel)
    dims = make_dims(pcfg, world, arch)
    model = build_parallel_model(arch, dims, dims.build_mesh("cpu"), pcfg, lambda: build_model(arch, seed=0))
    return model, dims.grad_scale


def _inputs(spec: Spec) -> dict:
    # the same global batch on every rank: cp and tp peers process the same samples
    g = torch.Generator().manual_seed(0)
    a = spec.arch
    return {
        "x": torch.randn(spec.batch, a.in_channels, *spec.latent, generator=g),
        "t": torch.rand(spec.batch, generator=g) * 1000,
        "context": torch.randn(spec.batch, spec.text_len, a.text_dim, generator=g),
        "context_mask": torch.ones(spec.batch, spec.text_len, dtype=torch.bool),
    }


def _step(model: nn.Module, scale: int, inp: dict, acts=None, counter=None) -> float:
    """One forward + backward; returns its wall time on this rank."""
    dist.barrier()  # ranks start together, so a step's time is not another rank's lag
    if counter is not None:
        counter.phase = "fwd"
    start = time.perf_counter()
    with acts if acts is not None else contextlib.nullcontext():
        out = model(inp["x"], inp["t"], context=inp["context"], context_mask=inp["context_mask"])
    if counter is not None:
        counter.phase = "bwd"
    (out.float().pow(2).mean() * scale).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def _measure(model: nn.Module, scale: int, inp: dict, rss: PeakRSS) -> dict:
    """One extra step under the activation hooks, the RSS sampler and the byte counter."""
    acts = SavedActivations(model)
    with CommCounter() as counter, rss:
        _step(model, scale, inp, acts, counter)
    return {
        "act_bytes": acts.nbytes,
        "rss_delta": rss.delta,
        "param_bytes": sum(s.nbytes() for p in model.parameters() for s in _storages(p)),
        "comm_fwd": counter.sent["fwd"],
        "comm_bwd": counter.sent["bwd"],
    }


def worker(rank: int, world: int, port: int, spec: Spec, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # one core per rank: a rank stands for one device
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {}
    try:
        inp, models = _inputs(spec), {}
        for lay in spec.layouts:
            try:
                models[lay.name] = _build(lay, spec.arch, world)
            except Exception:  # symmetric on all ranks (config or build error): report, go on
                result[lay.name] = {"error": traceback.format_exc(limit=3)}
        times: dict[str, list[float]] = {name: [] for name in models}
        for i in range(spec.warmup + spec.iters):
            for name, (model, scale) in models.items():  # alternate: drift hits every layout alike
                t = _step(model, scale, inp)
                if i >= spec.warmup:
                    times[name].append(t)
        rss = PeakRSS()
        for name, (model, scale) in models.items():
            result[name] = {"step_s": times[name], **_measure(model, scale, inp, rss)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # the results are on disk: skip interpreter teardown, where a dying gloo object can abort a rank
    # ("terminate called without an active exception"; seen twice in the tests' spawned groups)
    models = inp = None
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(spec: Spec, world: int, out_dir: Path) -> list[dict]:
    """Run ``spec``'s layouts on ``world`` spawned gloo ranks; returns each rank's results."""
    # glibc reads this at process start: allocations ≥ 64 KiB get their own mmap and go back to the
    # OS when freed, so the workers' RSS follows live tensors (see the module docstring)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        args = (world, _free_port(), spec, str(out_dir))
        mp.start_processes(worker, args=args, nprocs=world, start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def tokens(spec: Spec) -> int:
    return math.prod(n // p for n, p in zip(spec.latent, spec.arch.patch_size, strict=True))


def expected_comm(lay: Layout, spec: Spec) -> dict[str, int] | None:
    """Formula bytes per attention layer for a pure Ulysses or pure ring layout, else None."""
    par = lay.parallel or {}
    cp, tp, ring = par.get("cp", 1), par.get("tp", 1), par.get("cp_ring", 1)
    if cp == 1 or ring not in (1, cp):
        return None
    b = attention_comm_bytes(tokens(spec), spec.arch.hidden_size // tp, cp, batch=spec.batch)  # fp32 on CPU
    kind = "ulysses" if ring == 1 else "ring"
    return {"fwd": b[f"{kind}_fwd"], "bwd": b[f"{kind}_bwd"]}


def _per_rank(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


COLUMNS = (
    "layout",
    "step s (median) per rank",
    "time / single",
    "activations MiB per rank",
    "activations / single",
    "step peak RSS MiB per rank",
    "params MiB per rank",
    "attn KiB sent per layer fwd / bwd (rank 0)",
)


def _comm_cell(lay: Layout, spec: Spec, res: list[dict]) -> tuple[str, bool | None]:
    """Measured bytes per attention layer, and whether every rank matched the formula."""
    if (lay.parallel or {}).get("cp", 1) == 1:
        return "–", None  # no cp exchange (tensor parallel's DTensor collectives are not counted)
    layers = sum(axis != "space" for axis in block_axes(spec.arch))  # blocks that exchange tokens
    got = [(r["comm_fwd"] // layers, r["comm_bwd"] // layers) for r in res]
    cell = f"{got[0][0] / 2**10:,.0f} / {got[0][1] / 2**10:,.0f}"
    exp = expected_comm(lay, spec)
    if exp is None:
        return cell, None
    ok = all(g == (exp["fwd"], exp["bwd"]) for g in got)
    formula = f"{exp['fwd'] / 2**10:,.0f} / {exp['bwd'] / 2**10:,.0f}"
    return cell + (" (= formula)" if ok else f" (formula {formula})"), ok


def summarize(spec: Spec, ranks: list[dict]) -> tuple[list[dict], dict]:
    """Table rows (per-rank values joined by " / ") and each layout's ratios to the single layout:
    time (mean over ranks of the median step), activations (the largest rank's)."""
    base = ranks[0].get("single", {})
    base_t = None
    if "step_s" in base:
        base_t = statistics.mean(statistics.median(r["single"]["step_s"]) for r in ranks)
    rows, ratios = [], {}
    for lay in spec.layouts:
        res = [r[lay.name] for r in ranks]
        if "error" in res[0]:
            why = res[0]["error"].strip().splitlines()[-1]
            rows.append(dict.fromkeys(COLUMNS, "–") | {"layout": lay.name, COLUMNS[1]: f"error: {why}"})
            ratios[lay.name] = {"error": res[0]["error"]}
            continue
        med = [statistics.median(r["step_s"]) for r in res]
        t_ratio = statistics.mean(med) / base_t if base_t else float("nan")
        a_ratio = max(r["act_bytes"] for r in res) / base["act_bytes"] if base else float("nan")
        comm, ok = _comm_cell(lay, spec, res)
        ratios[lay.name] = {"time": t_ratio, "activations": a_ratio, "comm_matches": ok}
        values = (
            lay.name,
            _per_rank(med, ".3f"),
            f"{t_ratio:.2f}",
            _per_rank([r["act_bytes"] / 2**20 for r in res], ".1f"),
            f"{a_ratio:.3f}",
            _per_rank([r["rss_delta"] / 2**20 for r in res], ".0f"),
            _per_rank([r["param_bytes"] / 2**20 for r in res], ".1f"),
            comm,
        )
        rows.append(dict(zip(COLUMNS, values, strict=True)))
    return rows, ratios


def _summary(ratios: dict[int, dict]) -> str:
    lines = []
    for world, rs in ratios.items():
        for name, r in rs.items():
            if name == "single":
                continue
            if "error" in r:
                lines.append(f"- world {world}, {name}: failed (see table)")
                continue
            check = {True: "; attention bytes = formula", False: "; attention bytes ≠ formula", None: ""}
            lines.append(
                f"- world {world}, {name}: activations per rank **{r['activations']:.3f}×** single, "
                f"step time {r['time']:.2f}× single{check[r['comm_matches']]}"
            )
    return "\n".join(lines)


METHOD = """\
Every layout of a world size runs in the same gloo processes (one thread per rank, a rank standing
for one device), in alternating steps after {warmup} warm-up rounds, {iters} timed steps each; then
one more step per layout is measured for memory and traffic. "single" is the unparallelized model,
run whole on every rank at once, so it sees the same machine load as the parallel layouts.

- **step s**: forward + backward (loss = mean square of the output), median of the timed steps.
- **activations**: bytes of the distinct storages autograd saves for backward during the model's
  forward (`saved_tensors_hooks`), parameters (and views of them) excluded. Exact, and the quantity
  context parallelism divides. It stays a little above 1/cp because some saved tensors are
  replicated on every cp rank: the input latents (cut after patch embedding), the gathered output
  before unpatchify, the text states and their cross-attention K/V, the modulation vectors.
- **step peak RSS**: peak resident set size during the measured step minus the RSS just before it,
  sampled every 0.5 ms from `/proc/self/statm`, in processes started with glibc's
  `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors return to the OS. It includes activations,
  gradients, temporaries and FSDP/communication buffers; sampled, so a lower bound on the true peak.
  (`ru_maxrss` cannot be reset and would include model building, so it is not used.)
- **params**: bytes of the parameters this rank holds (FSDP/TP shards), the static part of memory.
- **attn KiB sent per layer**: bytes this rank sent through the functional `all_to_all_single` (Ulysses) and
  `batch_isend_irecv` (ring) in one step, divided by the number of attention layers; checked
  against the formulas below. Tensor-parallel (DTensor) collectives are not counted.

Machine caveat: 2 shared CPU cores. Absolute times are noise; only ratios measured side by side in
one run mean anything, and world 4 runs 4 ranks on 2 cores (every layout equally oversubscribed)."""

COMM = """\
Bytes one rank sends per self-attention layer, for a sequence of N tokens, width D (per TP rank),
degree P, batch B, e bytes per activation element (from `parallel/context.py` and `parallel/ring.py`):

- Ulysses: all-to-all of q, k, v and the output, each rank keeping 1/P of its B·(N/P)·D chunk:
  forward 4·(P−1)/P·B·(N/P)·D·e; backward the same (the four inverse all-to-alls of the gradients).
- Ring: forward (P−1) shifts of the K and V blocks: 2·(P−1)·B·(N/P)·D·e. Backward K and V travel
  P−1 steps again and the dK/dV accumulators P steps, in fp32 whatever e:
  2·(P−1)·B·(N/P)·D·e + 2·P·B·(N/P)·D·4.

So Ulysses' per-rank traffic falls as 1/P, while ring's grows towards 2·B·N·D·e forward and
2·B·N·D·e + 8·B·N·D bytes backward (the fp32 dK/dV) as P grows: in bf16 its backward sends ~5× its
forward. Ring's advantages are that it runs at any degree and can overlap its shifts with block
compute; Ulysses' degree must divide the heads per TP rank (12 for video-1b3, so not 8)."""

TP_NOTE = """\
Tensor parallelism splits what lies between its column- and row-parallel linears (q/k/v, the
attention itself, the MLP hidden units), so activations do not fall to 1/tp: with sequence
parallelism (`parallel.sequence_parallel`, the default) the residual stream, norms and modulated
inputs are cut along the sequence over the tp ranks as well, and only the gathered sub-layer inputs
stay whole; without it those are replicated on every tp rank."""


def _code_version() -> str:
    """The commit measured, flagged when parallel/ or dit/ had uncommitted changes (read-only git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "parallel", "dit"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown (no git)"
    return head.strip() + (" + uncommitted changes in parallel/ or dit/" if dirty.stdout.strip() else "")


def main(a) -> dict:
    """``python -m benchmarks.model_step --parallel``: run the layouts, print and write the report."""
    from benchmarks import report
    from benchmarks.comm_volume import comm_table

    overrides = {"depth": a.depth} if a.depth else {}
    arch = bench_arch(a.depth or 4) if a.preset is None else get_preset(a.preset, **overrides)
    spec_args = {"latent": (a.frames, a.height, a.width), "batch": a.batch, "text_len": a.text_len}
    spec_args |= {"warmup": a.warmup, "iters": a.iters}
    sections, ratios = [], {}
    for world in map(int, a.worlds.split(",")):
        spec = Spec(arch, layouts=default_layouts(world), **spec_args)
        with tempfile.TemporaryDirectory() as tmp:
            rows, ratios[world] = summarize(spec, run_group(spec, world, Path(tmp)))
        sections.append(f"### World size {world}\n\n" + report.table(rows))
        print(sections[-1], flush=True)
    body = "\n\n".join(
        [
            METHOD.format(warmup=a.warmup, iters=a.iters),
            *sections,
            "### Summary (ratios to single, measured side by side)\n\n" + _summary(ratios),
            TP_NOTE,
            "## Ulysses against ring: bytes per attention layer\n\n" + COMM,
            comm_table(),
            "## GPU\n\n" + GPU_NOTE,
        ]
    )
    config = {
        "architecture": arch,
        "latent (T,H,W)": spec_args["latent"],
        "tokens/sample": tokens(spec),
        "batch": a.batch,
        "text_len": a.text_len,
        "dtype": "fp32",
        "process group": "gloo, torch.multiprocessing spawn, 1 thread per rank",
        "warmup/iters": f"{a.warmup}/{a.iters}",
        "code": _code_version(),
    }
    title = "Model step under parallel layouts (CPU, gloo)"
    path = report.write(
        "model_step-parallel-cpu", "benchmarks.model_step", title, torch.device("cpu"), config, body
    )
    print(body)
    print(f"report: {path}")
    return {"ratios": ratios}


GPU_NOTE = """\
Not run: the single-GPU MFU sweep of video-1b3 (activation checkpointing none / full / every_2 ×
torch.compile off / on, bf16, 21×60×104 latents = 32,760 tokens, 512 text tokens) needs a GPU, and
none was lent to this session. The script supports it; on a GPU node:

    python -m benchmarks.model_step --mfu                 # writes {date}-model_step-mfu-video-1b3-cuda.md

It reports step time, tokens/s, model and hardware TFLOP/s (hardware adds the recomputed forwards),
MFU against the device's dense bf16 peak (`dit.flops.peak_flops`) and peak memory per setting; a
setting that runs out of memory is reported as OOM. On CPU `--mfu` exits with a message."""
