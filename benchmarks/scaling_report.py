"""The outputs of a scaling-law fit (``benchmarks.scaling fit --out DIR``): ``fit.json``, ``report.md``,
and the plots ``loss_vs_compute.png`` (runs, iso-parameter curves, the fitted frontier) and
``n_opt_vs_compute.png`` (the compute-optimal model size against compute, with its interval band).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.scaling_laws import PRED_KEYS, frontier_law, parametric_law
from dit.extras import require

PLOTS = "benchmarks.scaling fit --out (its PNG plots)"
"""What needs matplotlib, as the error names it."""

ACCURACY_TARGETS = tuple(
    f"probe_{k}" for k in ("overall", "color", "background", "shape", "direction", "speed")
)
"""``benchmarks.scaling``'s targets fitted as 1 − value (that module imports this one's writer)."""


# ---- outputs --------------------------------------------------------------------------------------------
def write_outputs(result: dict, rows: Sequence[dict], out_dir: str | os.PathLike) -> None:
    """Write ``fit.json``, ``report.md``, ``loss_vs_compute.png`` and ``n_opt_vs_compute.png``.

    Args:
        result: What ``fit`` returned for ``rows``.
        rows: The rows given to ``fit`` (the report shows their learning rates).
        out_dir: Created if missing.
    """
    if len(rows) != len(result["runs"]):
        raise ValueError(f"the result describes {len(result['runs'])} rows, got {len(rows)}")
    matplotlib = require("matplotlib", PLOTS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    for name, draw in (("loss_vs_compute.png", _plot_loss), ("n_opt_vs_compute.png", _plot_n_opt)):
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        try:
            draw(fig, ax, result)
            fig.savefig(out / name, dpi=120)
        finally:
            plt.close(fig)
    (out / "report.md").write_text(_report(result, rows), encoding="utf-8")


def _used(result: dict, key: str | None = None) -> list[dict]:
    return [t for t in result["runs"] if t["used"] and (key is None or t[key])]


def _plot_loss(fig, ax, result: dict) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    front, param, fr, preds = (
        result["frontier"],
        result["parametric"],
        _used(result, "frontier"),
        result["predictions"],
    )
    C, L, N = (np.array([t[k] for t in _used(result)]) for k in ("C", "loss", "N"))
    norm, cmap = LogNorm(N.min(), N.max() * (1 + 1e-9)), colormaps["viridis"]
    fig.colorbar(
        ax.scatter(C, L, c=N, norm=norm, cmap=cmap, s=22, zorder=3), ax=ax, label="N (non-embedding)"
    )
    ax.scatter([t["C"] for t in fr], [t["loss"] for t in fr], s=90, facecolors="none", edgecolors="k",
               label="frontier: best run per budget", zorder=4)  # fmt: skip
    grid = np.geomspace(C.min() / 2, max([C.max(), *(p["C"] for p in preds)]) * 2, 200)
    for n in np.unique(N):  # D = C / (6N), scaled when C is measured rather than 6ND
        D = grid / (6 * result["flops_per_6nd"] * n)
        ax.plot(grid, parametric_law(param, n, D), color=cmap(norm(n)), lw=0.8)
    ax.plot([], [], color="grey", lw=0.8, label="parametric fit at each N")
    label = f"L = {_g(front['E'])} + {_g(front['A'])}·C^-{_g(front['alpha'])}"
    ax.plot(grid, frontier_law(front, grid), "k--", label=label)
    if preds:
        ax.scatter([p["C"] for p in preds], [p["frontier_loss"] for p in preds], marker="*", s=120,
                   color="C3", label="prediction (frontier)", zorder=5)  # fmt: skip
    ax.set(xscale="log", xlabel=f"training FLOPs C ({result['flops_source']})", ylabel="validation loss")
    pad = 0.1 * np.ptp(L) + 1e-3  # the iso-N curves shoot up at small C; keep the data in view
    ax.set_ylim(L.min() - pad, L.max() + pad)
    ax.legend(fontsize=7)


def _plot_n_opt(fig, ax, result: dict) -> None:
    fr, opt = _used(result, "frontier"), result["compute_optimal"]
    curve = opt["curve"]
    ax.scatter([t["C"] for t in fr], [t["N"] for t in fr], color="k", zorder=3, label="frontier runs")
    if opt["a"] is not None:
        ax.plot(curve["C"], curve["N_opt"], "C0", label=f"N_opt ∝ C^{opt['a']:.3g} (parametric fit)")
    if None not in curve["lo"]:
        ax.fill_between(curve["C"], curve["lo"], curve["hi"], color="C0", alpha=0.2, label="5-95% bootstrap")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N (non-embedding parameters)")
    ax.legend(fontsize=8)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _estimates(*parts: tuple[str, dict, Sequence[str]]) -> str:
    lines = ["| quantity | fit | 5% | 95% |", "|---|---|---|---|"]
    for label, part, keys in parts:
        lines += [
            f"| {label}{k} | {_g(part[k])} | {_g(part['ci'][k][0])} | {_g(part['ci'][k][1])} |" for k in keys
        ]
    return "\n".join(lines)


def _report(result: dict, rows: Sequence[dict]) -> str:
    f, p, o, b = (result[k] for k in ("frontier", "parametric", "compute_optimal", "bootstrap"))
    where = f" · filter `{' '.join(result['where'])}`" if result.get("where") else ""
    source = (
        "the measured training FLOPs"
        if result["flops_source"] == "flops"
        else "6·N·D (`flops` not in every row)"
    )
    preds = "No predictions asked for (`--predict C`)."
    if result["predictions"]:
        preds = (
            "| C | frontier loss | parametric loss at N_opt, D_opt | N_opt | D_opt |\n|---|---|---|---|---|"
        )
        for q in result["predictions"]:
            cells = [f"{_g(q[k])} [{_g(q['ci'][k][0])}, {_g(q['ci'][k][1])}]" for k in PRED_KEYS]
            preds += f"\n| {_g(q['C'])} | " + " | ".join(cells) + " |"
    caveats = "\n".join(f"- {c}" for c in _caveats(result, rows))
    target = _target_line(result)
    intervals = "No intervals (`--bootstrap 0`)."
    if b["n"]:
        intervals = (
            f"Intervals: 5-95% over {b['n']} bootstrap resamples of the runs ({b['valid_frontier']} "
            f"and {b['valid_parametric']} of them fittable for the frontier and the parametric law)."
        )
    return f"""# Scaling-law fit

{dt.date.today()} · source `{result.get("source", "-")}`{where}

{target}{result["n_rows"]} rows: {result["n_runs"]} runs fitted, {result["n_skipped"]} skipped. C is {source}
(median C / 6ND = {result["flops_per_6nd"]:.3g}).

## Fits

Frontier L(C) = E + A·C^-α through the best run of each of {f["n_points"]} budgets; parametric
L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3) over {p["n_points"]} (size, budget) points
at their best learning rate. {intervals}

{_estimates(("frontier ", f, ("E", "A", "alpha")), ("parametric ", p, ("E", "A", "B", "alpha", "beta")))}

## Compute-optimal allocation (C = 6ND)

N_opt = G·(C/6)^a, D_opt = (C/6)^b / G with a = β/(α+β), b = α/(α+β).

{_estimates(("", o, ("a", "b", "G")))}

## Predictions

{preds}

![loss vs compute](loss_vs_compute.png)

![N_opt vs compute](n_opt_vs_compute.png)

## Caveats

{caveats}

{_tables(result, rows)}
"""


def _target_line(result: dict) -> str:
    """What "loss" means in this report, when ``--target`` chose another column than the validation loss."""
    target = result.get("target", "loss")
    if target == "loss":
        return ""
    what = f"1 − {target} (the error rate)" if target in ACCURACY_TARGETS else target
    return f"Fitted target: **{what}**, written L below in place of the validation loss.\n\n"


def _caveats(result: dict, rows: Sequence[dict]) -> list[str]:
    f, b, used = result["frontier"], result["bootstrap"], _used(result)
    out = [
        f"The frontier has {f['n_points']} points for 3 parameters: with few points E, A and α trade off "
        "against each other, so the intervals are wide, and a narrow one is luck, not precision.",
        "A budget's best run is a minimum over the runs tried at it: too few sizes or learning rates per "
        "budget put the frontier above the true one, and bootstrap resamples (which drop runs) more so.",
    ]
    if b["n"] and min(b["valid_frontier"], b["valid_parametric"]) < b["n"]:
        out.append("Some resamples had too few budgets, sizes or runs to fit; the intervals leave them out.")
    if result["flops_source"] == "flops":
        out.append(
            "The allocation counts C = 6ND; predictions convert the given C by the median measured C / 6ND "
            f"({result['flops_per_6nd']:.3g}), which varies with size where attention FLOPs matter."
        )
    if len({rows[t["index"]].get("parametrization") for t in used}) > 1:
        out.append("Runs of several parametrizations were pooled; fit each with `--where parametrization=…`.")
    far = [q["C"] for q in result["predictions"] if q["C"] > 10 * max(t["C"] for t in used)]
    if far:
        out.append(f"Predictions at C = {', '.join(map(_g, far))} extrapolate over 10× past the largest run.")
    return out


def _tables(result: dict, rows: Sequence[dict]) -> str:
    lines = [
        "## Runs",
        "",
        "| run | N | D | C | lr | loss | best lr | frontier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in _used(result):
        cells = [t["name"], *(_g(t[k]) for k in "NDC"), _g(rows[t["index"]].get("lr")), f"{t['loss']:.4f}"]
        lines.append(
            "| " + " | ".join(cells + ["✓" if t["best_lr"] else "", "✓" if t["frontier"] else ""]) + " |"
        )
    lines += ["", "## Skipped runs", ""]
    lines += ["| run | status | reason |", "|---|---|---|"] if result["skipped"] else ["None."]
    lines += [f"| {s['name']} | {s['status'] or '-'} | {s['reason']} |" for s in result["skipped"]]
    cells: dict[tuple, dict] = {}
    for t in _used(result):
        cells.setdefault((t["N"], t["budget"]), {})[rows[t["index"]].get("lr")] = t["loss"]
    lrs = sorted({lr for c in cells.values() for lr in c if _is_number(lr)})
    if len(lrs) > 1:
        lines += [
            "",
            "## Loss vs learning rate (best in bold)",
            "",
            "| N | budget | " + " | ".join(map(_g, lrs)) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(lrs))
        for (n, budget), c in sorted(cells.items()):
            best = min(c.values())
            vals = [
                f"**{c[lr]:.4f}**" if c.get(lr) == best else f"{c[lr]:.4f}" if lr in c else "" for lr in lrs
            ]
            lines.append(f"| {_g(n)} | {_g(budget)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
