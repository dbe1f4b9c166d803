"""Scaling-law fits over the results of a sweep (``benchmarks.sweep collect`` → ``results.jsonl``).

    python -m benchmarks.scaling fit RESULTS.jsonl [--out DIR] [--predict C ...] [--where key=value ...]
        [--bootstrap N] [--seed S]

A row is one run: ``params`` (non-embedding N), ``tokens`` (D), ``loss`` (final validation loss), and
optionally ``flops`` (C; else C = 6ND), ``budget``, ``lr``, ``status``, ``name``. Runs of one size and
budget that differ in learning rate are reduced to the best. Then two fits:

- the compute frontier L(C) = E + A·C^-α through the best run of each budget;
- the parametric law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3), whose minimum
  under C = 6ND is the compute-optimal N_opt = G·(C/6)^a, D_opt = (C/6)^b / G.

Both minimise a Huber loss (δ = 1e-3) on log-loss residuals from a grid of starts (the laws, their fits
and predictions: :mod:`benchmarks.scaling_laws`). Intervals are 5-95% percentiles over bootstrap
resamples of the runs.

``--target KEY`` fits another column of the rows in place of ``loss`` (the runs' last sample metrics,
``eval.sample_metrics``, carried by ``benchmarks.sweep collect``): a probe accuracy (``probe_overall``,
``probe_color`` …, in [0, 1], higher is better) is fitted as its error rate 1 − accuracy, which like a
loss falls toward an irreducible floor E as compute grows; ``fid``, ``fvd`` and ``probe_flicker``,
already lower-is-better and ≥ 0, are fitted as they are. ``probe_jerk`` and ``probe_area_cv`` are not
targets: they average over the clips where an object was found, so a weak run that finds one clip and
tracks it well scores better than one that finds them all (not monotone in compute). Nor is the CLIP
score, which has no natural floor-at-zero form. A run whose
target is missing or whose error is 0 (a perfect score: no power law through it) is skipped, named.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.scaling_laws import (
    FRONTIER_TERMS,
    PARAMETRIC_TERMS,
    allocate,
    compute_optimal,
    fit_frontier,
    fit_parametric,
    frontier_grid,
    frontier_law,
    frontier_params,
    frontier_theta,
    parametric_grid,
    parametric_law,
    parametric_params,
    parametric_theta,
    solve,
)
from benchmarks.scaling_report import (
    ACCURACY_TARGETS,  # fitted as the error rate 1 − value
    PLOTS,
)
from dit.extras import MissingExtra, require

# ---- input ----------------------------------------------------------------------------------------------
AS_IS_TARGETS = ("loss", "fid", "fvd", "probe_flicker")
"""Targets fitted as they are (lower is better, ≥ 0)."""
TARGETS = AS_IS_TARGETS[:1] + ACCURACY_TARGETS + AS_IS_TARGETS[1:]


def target_row(row: dict, target: str) -> dict:
    """``row`` with ``loss`` replaced by the value fitted for ``target`` (the validation loss kept as
    ``val_loss``): ``1 − row[target]`` for an accuracy, ``row[target]`` otherwise; None when absent."""
    if target == "loss":
        return row
    v = row.get(target)
    fitted = (1.0 - v if target in ACCURACY_TARGETS else v) if _number(v) else None
    return {**row, "val_loss": row.get("loss"), "loss": fitted}


def parse_where(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["key=value", ...]`` (or a mapping) → ``{key: value}``."""
    if items is None or isinstance(items, Mapping):
        return dict(items or {})
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {item!r}: expected key=value")
        out[key] = value
    return out


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _matches(row: dict, where: dict[str, str]) -> bool:
    for key, want in where.items():
        v = row.get(key, ...)
        # JSON's spelling too (true, null), and numbers by value so that budget=1e18 finds 1e+18
        if v is ... or (want not in (str(v), json.dumps(v)) and not (_number(v) and _as_float(want) == v)):
            return False
    return True


def _as_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _skip_reason(row: dict) -> str | None:
    status, loss = row.get("status"), row.get("loss")
    if status is not None and status != "ok":
        return f"status={status}"
    if not _number(loss) or not math.isfinite(loss):
        return "no loss (or --target value)" if loss is None else f"loss={loss!r}"
    return "loss <= 0 (a perfect --target score)" if loss <= 0 else None


def _row_problem(row: dict) -> str | None:
    for key in ("params", "tokens"):
        v = row.get(key)
        if v is None:
            return f"missing {key!r}"
        if not _number(v) or not math.isfinite(v) or v <= 0:
            return f"{key}={v!r} is not a positive number"
    return None


def load_runs(
    path: str | os.PathLike, where: Sequence[str] | Mapping[str, str] | None = None, target: str = "loss"
) -> list[dict]:
    """Read a results JSON-lines file, keeping the rows that match ``where``.

    Rows to be skipped (a status other than ``ok``, no finite loss) stay in, for the report to list.

    Args:
        path: The ``results.jsonl`` file; blank lines are ignored.
        where: ``key=value`` strings or a mapping: keep a row when each field equals the value as a
            string (or as a number, when the field is one).
        target: The column fitted as ``loss`` (one of :data:`TARGETS`; see :func:`target_row`).

    Raises:
        ValueError: A line is not a JSON object, or a usable row lacks a positive ``params`` or
            ``tokens``; the message names the file and line.
    """
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    wanted, rows = parse_where(where), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if not _matches(row, wanted):
                continue
            row = target_row(row, target)
            problem = None if _skip_reason(row) else _row_problem(row)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


@dataclass
class Runs:
    """The usable runs as arrays, with the groups the fits reduce over."""

    index: np.ndarray  # position of each run in the rows given to ``prepare``
    N: np.ndarray
    D: np.ndarray
    C: np.ndarray  # measured FLOPs, or 6ND
    L: np.ndarray
    group: np.ndarray  # compute-budget group id
    cell: np.ndarray  # (size, budget) id: learning rates compete within a cell
    group_C: np.ndarray  # nominal budget (or geometric-mean C) per group
    flops_source: str
    flops_per_6nd: float  # median C / 6ND (1 for 6ND): puts the 6ND allocation in C's units


def budget_groups(C: np.ndarray, budget: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Group runs by compute budget: the nominal ``budget`` where given, else FLOPs within ±10%.

    Args:
        C: FLOPs per run.
        budget: Nominal budget per run, None where absent.

    Returns:
        (group id per run, nominal budget or geometric-mean C per group).
    """
    ids, known = np.full(len(C), -1), {}
    for i, b in enumerate(budget):
        if b is not None:
            ids[i] = known.setdefault(b, len(known))
    reps = [float(b) for b in known]
    start = None
    for i in sorted(np.flatnonzero(ids < 0), key=lambda i: C[i]):
        # a group spans at most 1.1²: ±10% about its geometric centre
        if start is None or C[i] > C[start] * 1.1**2:
            start = i
            reps.append(0.0)
        ids[i] = len(reps) - 1
    for g in range(len(known), len(reps)):
        reps[g] = float(np.exp(np.log(C[ids == g]).mean()))
    return ids, np.asarray(reps)


def prepare(rows: Sequence[dict]) -> tuple[Runs, list[dict]]:
    """Split rows into usable runs and skipped ones (``{"index", "name", "status", "reason"}``).

    Args:
        rows: Run records as ``load_runs`` returns them.

    Returns:
        (the usable runs as ``Runs``, the skipped rows).

    Raises:
        ValueError: Fewer than 3 usable runs, or a usable run without positive params or tokens.
    """
    used, skipped = [], []
    for i, row in enumerate(rows):
        reason = _skip_reason(row)
        if reason:
            skipped.append({"index": i, "name": _name(row, i), "status": row.get("status"), "reason": reason})
        elif problem := _row_problem(row):
            raise ValueError(f"run {_name(row, i)}: {problem}")
        else:
            used.append(i)
    if len(used) < 3:
        raise ValueError(f"{len(used)} usable runs ({len(skipped)} skipped); a fit needs at least 3")
    sel = [rows[i] for i in used]
    N, D, L = (np.array([float(r[k]) for r in sel]) for k in ("params", "tokens", "loss"))
    flops = [r.get("flops") for r in sel]
    # all measured or all 6ND: mixing the two units would bend the frontier
    measured = all(_number(c) and math.isfinite(c) and c > 0 for c in flops)
    C = np.array(flops, dtype=float) if measured else 6 * N * D
    group, group_C = budget_groups(C, [r.get("budget") for r in sel])
    cell = np.unique(np.stack([N, group]), axis=1, return_inverse=True)[1].ravel()
    source, ratio = ("flops" if measured else "6ND"), float(np.median(C / (6 * N * D)))
    return Runs(np.array(used), N, D, C, L, group, cell, group_C, source, ratio), skipped


def _name(row: dict, i: int) -> str:
    return str(row.get("name") or f"row {i + 1}")


def _pick(keys: np.ndarray, L: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weights (R×n) keeping, per key and resample, the lowest-loss run present (with its count)."""
    W, rows = np.zeros_like(counts), np.arange(len(counts))
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        members = members[np.argsort(L[members], kind="stable")]
        present = counts[:, members] > 0
        has, first = present.any(1), members[present.argmax(1)]
        W[rows[has], first[has]] = counts[rows[has], first[has]]
    return W


# ---- bootstrap and the whole fit ------------------------------------------------------------------------
def bootstrap(runs: Runs, frontier: Mapping, parametric: Mapping, n: int = 200, seed: int = 0) -> dict:
    """Refit both laws on ``n`` resamples (with replacement) of the usable runs.

    A resample repeats the full fit's reductions (best learning rate per size and budget, best run per
    budget), so one that drops a budget's best run sees its next best. Each refit starts from the full
    fit's solution and a few grid points.

    Args:
        runs: The usable runs (``prepare``).
        frontier: The full ``fit_frontier`` result.
        parametric: The full ``fit_parametric`` result.
        n: Resamples.
        seed: Seed of the resampling.

    Returns:
        ``{"frontier": {"E", "A", "alpha"}, "parametric": {"E", "A", "B", "alpha", "beta"}}`` of arrays
        of length ``n``; NaN where a resample is too degenerate to fit (under 3 budgets; under 5 runs,
        2 sizes or 2 token counts).
    """
    rng = np.random.default_rng(seed)
    m = len(runs.L)
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n).astype(float)
    Wf, Wp = _pick(runs.group, runs.L, counts), _pick(runs.cell, runs.L, counts)
    start, grid = frontier_theta(frontier), frontier_grid(runs.C, runs.L)
    th = _refit(FRONTIER_TERMS, [None, np.log(runs.C)], runs.L, Wf, start, grid, rng)
    th[[_distinct(runs.group, w) < 3 for w in Wf]] = np.nan
    out = {"frontier": frontier_params(th)}
    feats = [None, np.log(runs.N), np.log(runs.D)]
    th = _refit(PARAMETRIC_TERMS, feats, runs.L, Wp, parametric_theta(parametric), parametric_grid(), rng)
    th[[(w > 0).sum() < 5 or min(_distinct(runs.N, w), _distinct(runs.D, w)) < 2 for w in Wp]] = np.nan
    out["parametric"] = parametric_params(th)
    return out


def _distinct(x: np.ndarray, w: np.ndarray) -> int:
    return len(np.unique(x[w > 0]))


def _refit(terms, feats, L, W, start, grid, rng, extra: int = 6) -> np.ndarray:
    if not len(W):
        return np.zeros((0, len(start)))
    first = np.broadcast_to(np.asarray(start, float), (len(W), 1, len(start)))
    starts = np.concatenate([first, grid[rng.integers(0, len(grid), size=(len(W), extra))]], axis=1)
    return solve(terms, feats, np.log(L), W, starts)[0]


def _ci(samples) -> list:
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    return np.percentile(s, [5, 95]).tolist() if s.size else [None, None]


def fit(rows: Sequence[dict], predict: Sequence[float] = (), n_boot: int = 200, seed: int = 0) -> dict:
    """Both fits, the compute-optimal allocation, bootstrap intervals and predictions.

    Args:
        rows: Run records (``load_runs``); skipped ones are counted and listed.
        predict: Compute budgets C (FLOPs, in the data's units) to predict the loss and allocation at.
        n_boot: Bootstrap resamples (0: no intervals).
        seed: Seed of the bootstrap.

    Returns:
        A JSON-able dict: ``frontier``, ``parametric``, ``compute_optimal`` (each with ``ci``: 5-95%
        intervals), ``predictions``, ``n_runs``, ``n_skipped``, ``skipped``, ``flops_source``, ``runs``.
    """
    if any(not c > 0 for c in predict) or n_boot < 0:
        raise ValueError(
            f"predictions need positive FLOPs ({list(predict)}), the bootstrap n >= 0 ({n_boot})"
        )
    runs, skipped = prepare(rows)
    ones = np.ones((1, len(runs.L)))
    fsel, psel = _pick(runs.group, runs.L, ones)[0] > 0, _pick(runs.cell, runs.L, ones)[0] > 0
    front = fit_frontier(runs.C[fsel], runs.L[fsel])
    param = fit_parametric(runs.N[psel], runs.D[psel], runs.L[psel])
    opt = compute_optimal(param)
    boot = bootstrap(runs, front, param, n_boot, seed)
    bopt = compute_optimal(boot["parametric"])
    for part, samples in ((front, boot["frontier"]), (param, boot["parametric"]), (opt, bopt)):
        part["ci"] = {k: _ci(v) for k, v in samples.items()}
    front["n_points"], param["n_points"] = int(fsel.sum()), int(psel.sum())
    r = runs.flops_per_6nd  # the allocation counts 6ND; predictions take C in the data's units
    preds = []
    for c in predict:
        (n_opt, d_opt), (bn, bd) = allocate(opt, c / r), allocate(bopt, c / r)
        vals = {
            "frontier_loss": (frontier_law(front, c), frontier_law(boot["frontier"], c)),
            "parametric_loss": (
                parametric_law(param, n_opt, d_opt),
                parametric_law(boot["parametric"], bn, bd),
            ),
            "N_opt": (n_opt, bn),
            "D_opt": (d_opt, bd),
        }
        preds.append(
            {"C": float(c)}
            | {k: v for k, (v, _) in vals.items()}
            | {"ci": {k: _ci(b) for k, (_, b) in vals.items()}}
        )
    grid = np.geomspace(runs.C.min() / 3, max([runs.C.max(), *predict]) * 3, 40)
    band = np.array([_ci(allocate(bopt, c / r)[0]) for c in grid]) if n_boot else np.full((40, 2), np.nan)
    opt["curve"] = {"C": grid, "N_opt": allocate(opt, grid / r)[0], "lo": band[:, 0], "hi": band[:, 1]}
    boot_info = {"n": n_boot, "seed": seed}
    for k in ("frontier", "parametric"):
        boot_info[f"valid_{k}"] = int(np.isfinite(boot[k]["alpha"]).sum())
    return _clean(
        {"frontier": front, "parametric": param, "compute_optimal": opt, "predictions": preds}
        | {"n_rows": len(rows), "n_runs": len(runs.L), "n_skipped": len(skipped), "skipped": skipped}
        | {"flops_source": runs.flops_source, "flops_per_6nd": r, "bootstrap": boot_info}
        | {"runs": _run_table(rows, runs, fsel, psel)}
    )


def _run_table(rows, runs: Runs, fsel, psel) -> list[dict]:
    table = [{"index": i, "name": _name(r, i), "used": False} for i, r in enumerate(rows)]
    for j, i in enumerate(runs.index):
        table[i] |= {"used": True, "N": runs.N[j], "D": runs.D[j], "C": runs.C[j], "loss": runs.L[j]}
        table[i] |= {"budget": runs.group_C[runs.group[j]], "best_lr": psel[j], "frontier": fsel[j]}
    return table


def _clean(obj):
    """Plain JSON: arrays to lists, numpy scalars to Python, non-finite floats to null."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the scaling laws to a results.jsonl; prints one JSON object")
    f.add_argument("results", help="JSON lines: params, tokens, loss[, flops, budget, lr, status, name, ...]")
    f.add_argument("--out", help="also write fit.json, report.md and two PNG plots here")
    f.add_argument("--predict", type=float, nargs="+", action="extend", default=[], metavar="C",
                   help="compute budgets (FLOPs) to predict the loss and N_opt, D_opt at")  # fmt: skip
    f.add_argument(
        "--where", action="append", default=[], metavar="KEY=VALUE", help="keep matching rows only"
    )
    f.add_argument("--bootstrap", type=int, default=200, metavar="N", help="resamples for the intervals")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    f.add_argument("--target", default="loss", choices=TARGETS,
                   help="the column fitted: loss (validation loss), a probe accuracy (as 1 - accuracy), fid, "
                   "fvd or a probe temporal number")  # fmt: skip
    a = p.parse_args(argv)
    try:
        if a.out:  # before the fit, not after it
            require("matplotlib", PLOTS)
        rows = load_runs(a.results, a.where, a.target)
        try:
            result = fit(rows, predict=a.predict, n_boot=a.bootstrap, seed=a.seed)
        except ValueError as e:
            raise ValueError(f"{a.results}: {e}") from e
    except (ValueError, OSError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result |= {"source": str(a.results), "where": a.where, "target": a.target}
    if a.out:
        from benchmarks.scaling_report import write_outputs  # matplotlib only when plots are wanted

        write_outputs(result, rows, a.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
