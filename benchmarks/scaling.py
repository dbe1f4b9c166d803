"""Scaling-law fits over the results of a sweep (``benchmarks.sweep collect`` → ``results.jsonl``).

    python -m benchmarks.scaling fit RESULTS.jsonl [--out DIR] [--predict C ...] [--where key=value ...]
        [--bootstrap N] [--seed S]

A row is one run: ``params`` (non-embedding N), ``tokens`` (D), ``loss`` (final validation loss), and
optionally ``flops`` (C; else C = 6ND), ``budget``, ``lr``, ``status``, ``name``. Runs of one size and
budget that differ in learning rate are reduced to the best. Then two fits:

- the compute frontier L(C) = E + A·C^-α through the best run of each budget;
- the parametric law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3), whose minimum
  under C = 6ND is the compute-optimal N_opt = G·(C/6)^a, D_opt = (C/6)^b / G.

Both minimise a Huber loss (δ = 1e-3) on log-loss residuals from a grid of starts with a batched
Levenberg-Marquardt (every start its own problem, all in one array). Intervals are 5-95% percentiles
over bootstrap resamples of the runs.
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

DELTA = 1e-3  # Huber δ on log L, as Hoffmann et al.
# LSE terms as (offset index, slope index): frontier θ = (e, a, α), parametric θ = (e, a, b, α, β)
FRONTIER_TERMS = ((0, None), (1, 2))
PARAMETRIC_TERMS = ((0, None), (1, 3), (2, 4))
PRED_KEYS = ("frontier_loss", "parametric_loss", "N_opt", "D_opt")


# ---- input ----------------------------------------------------------------------------------------------
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
        return "no loss" if loss is None else f"loss={loss!r}"
    return "loss <= 0" if loss <= 0 else None


def _row_problem(row: dict) -> str | None:
    for key in ("params", "tokens"):
        v = row.get(key)
        if v is None:
            return f"missing {key!r}"
        if not _number(v) or not math.isfinite(v) or v <= 0:
            return f"{key}={v!r} is not a positive number"
    return None


def load_runs(path: str | os.PathLike, where: Sequence[str] | Mapping[str, str] | None = None) -> list[dict]:
    """Read a results JSON-lines file, keeping the rows that match ``where``.

    Rows to be skipped (a status other than ``ok``, no finite loss) stay in, for the report to list.

    Args:
        path: The ``results.jsonl`` file; blank lines are ignored.
        where: ``key=value`` strings or a mapping: keep a row when each field equals the value as a
            string (or as a number, when the field is one).

    Raises:
        ValueError: A line is not a JSON object, or a usable row lacks a positive ``params`` or
            ``tokens``; the message names the file and line.
    """
    cond, rows = parse_where(where), []
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
            if not _matches(row, cond):
                continue
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


# ---- the optimiser --------------------------------------------------------------------------------------
def _lse(theta: np.ndarray, terms, feats: list, jac: bool):
    """log Σ_j exp(θ[o_j] − θ[s_j]·x_j) per problem (S×n) and its Jacobian (S×n×k)."""
    S, k = theta.shape
    n = len(next(x for x in feats if x is not None))
    cols = [
        theta[:, o, None] - (0 if s is None else theta[:, s, None] * x)
        for (o, s), x in zip(terms, feats, strict=True)
    ]
    t = np.stack([np.broadcast_to(c, (S, n)) for c in cols], axis=-1)
    top = t.max(-1, keepdims=True)
    p = np.exp(t - top)
    total = p.sum(-1, keepdims=True)
    m = (top + np.log(total))[..., 0]
    if not jac:
        return m, None
    p /= total
    J = np.zeros((S, n, k))
    for j, ((o, s), x) in enumerate(zip(terms, feats, strict=True)):
        J[:, :, o] += p[..., j]
        if s is not None:
            J[:, :, s] -= x * p[..., j]
    return m, J


def _huber(r: np.ndarray, W: np.ndarray) -> np.ndarray:
    a = np.abs(r)
    return (W * np.where(a <= DELTA, 0.5 * r * r, DELTA * (a - 0.5 * DELTA))).sum(-1)


def _lm(theta: np.ndarray, model, y: np.ndarray, W: np.ndarray, tol: float, iters: int = 400) -> tuple:
    """Levenberg-Marquardt on Σ W·Huber(model − y), every row of ``theta`` its own problem.

    Huber is majorised by a weighted square (IRLS weights min(1, δ/|r|)), so a Gauss-Newton step on
    that square, kept only when the true objective falls, descends.
    """
    theta = theta.copy()
    f = _huber(model(theta, False)[0] - y, W)
    f = np.where(np.isfinite(f), f, np.inf)
    lam, active, eye = np.full(len(theta), 1e-3), np.isfinite(f), np.eye(theta.shape[1])
    for _ in range(iters):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        th, Wi = theta[idx], W[idx]
        m, J = model(th, True)
        r = m - y
        Jw = J * (Wi * np.minimum(1.0, DELTA / np.maximum(np.abs(r), 1e-300)))[..., None]
        H, g = Jw.transpose(0, 2, 1) @ J, np.einsum("snk,sn->sk", Jw, r)
        d = np.diagonal(H, axis1=1, axis2=2)
        H = H + (lam[idx, None] * (d + 1e-9 * d.max(1, keepdims=True) + 1e-300))[..., None] * eye
        try:
            step = np.linalg.solve(H, -g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = -(np.linalg.pinv(H) @ g[..., None])[..., 0]
        new = th + step
        fn = _huber(model(new, False)[0] - y, Wi)
        ok = np.isfinite(fn) & (fn < f[idx])
        gain = np.where(ok, f[idx] - fn, 0.0)
        theta[idx[ok]], f[idx[ok]] = new[ok], fn[ok]
        lam[idx] = np.where(ok, lam[idx] * 0.3, lam[idx] * 10.0)
        active[idx[(ok & (gain <= tol * f[idx] + 1e-18)) | (lam[idx] > 1e10)]] = False
    return theta, f


def _solve(terms, feats: list, y: np.ndarray, W: np.ndarray, starts: np.ndarray) -> tuple:
    """Best of K starts (P×K×k) for each of P weighted problems (W: P×n); θ uncentred in and out."""
    P, K, k = starts.shape
    # centring log N, log D, log C decouples each offset from its slope (log N ≈ 15 otherwise)
    centres = [0.0 if x is None else float(x.mean()) for x in feats]
    cfeats = [None if x is None else x - c for x, c in zip(feats, centres, strict=True)]
    shift = np.zeros((k, k))
    for (o, s), c in zip(terms, centres, strict=True):
        if s is not None:
            shift[s, o] = c  # offset_centred = offset − slope·centre
    th = starts.reshape(P * K, k) @ (np.eye(k) - shift)

    def model(t, jac):
        return _lse(t, terms, cfeats, jac)

    # a loose tolerance finds the basin of every start; only the best start of each problem is polished
    th, f = _lm(th, model, y, np.repeat(W, K, axis=0), tol=1e-6)
    th = th.reshape(P, K, k)[np.arange(P), np.argmin(f.reshape(P, K), axis=1)]
    th, f = _lm(th, model, y, W, tol=1e-12)
    return th @ (np.eye(k) + shift), f


def _frontier_grid(C: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Starts (e, a, α): E a share of the lowest loss, the curve through the mean point."""
    x, lbar, out = np.log(C).mean(), float(np.exp(np.log(L).mean())), []
    for q in (0.05, 0.3, 0.6, 0.8, 0.9, 0.97):
        E = q * float(L.min())
        for alpha in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
            out.append((math.log(E), math.log(max(lbar - E, 1e-3 * lbar)) + alpha * x, alpha))
    return np.array(out)


def _parametric_grid() -> np.ndarray:
    """Hoffmann et al.'s grid of 4500 starts (e, a, b, α, β)."""
    g = np.meshgrid([-1, -0.5, 0, 0.5, 1], range(0, 26, 5), range(0, 26, 5), *[[0, 0.5, 1, 1.5, 2]] * 2)
    return np.stack([a.ravel() for a in g], axis=1).astype(float)


# ---- fits -----------------------------------------------------------------------------------------------
def fit_frontier(C: Sequence[float], L: Sequence[float]) -> dict:
    """Fit L(C) = E + A·C^-α through frontier points (one per compute budget).

    Args:
        C: Training FLOPs of each frontier run (3 distinct values at least).
        L: Its loss.

    Returns:
        ``{"E", "A", "alpha", "huber"}`` (``huber``: the objective at the optimum).
    """
    C, L = np.asarray(C, float), np.asarray(L, float)
    if len(np.unique(C)) < 3:
        raise ValueError(f"the frontier fit needs runs at 3 or more compute budgets, got {len(np.unique(C))}")
    th, f = _solve(
        FRONTIER_TERMS, [None, np.log(C)], np.log(L), np.ones((1, len(C))), _frontier_grid(C, L)[None]
    )
    E, A = _exp(th[0, :2])
    return {"E": float(E), "A": float(A), "alpha": float(th[0, 2]), "huber": float(f[0])}


def fit_parametric(N: Sequence[float], D: Sequence[float], L: Sequence[float]) -> dict:
    """Fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3) from 4500 starts.

    Args:
        N: Non-embedding parameters of each run (5 runs, 2 sizes and 2 token counts at least).
        D: Training tokens.
        L: Loss.

    Returns:
        ``{"E", "A", "B", "alpha", "beta", "huber"}``.
    """
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if len(L) < 5 or len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError(
            f"the parametric fit needs 5 or more runs over 2 or more sizes and token counts; got {len(L)} "
            f"runs, {len(np.unique(N))} sizes, {len(np.unique(D))} token counts"
        )
    feats, W = [None, np.log(N), np.log(D)], np.ones((1, len(L)))
    th, f = _solve(PARAMETRIC_TERMS, feats, np.log(L), W, _parametric_grid()[None])
    values = (*_exp(th[0, :3]), *th[0, 3:], f[0])
    return {k: float(v) for k, v in zip(("E", "A", "B", "alpha", "beta", "huber"), values, strict=True)}


def compute_optimal(fit: Mapping) -> dict:
    """Compute-optimal allocation of the parametric law under C = 6ND.

    N_opt = G·(C/6)^a, D_opt = (C/6)^b / G with a = β/(α+β), b = α/(α+β), G = (αA/(βB))^(1/(α+β)).

    Args:
        fit: A ``fit_parametric`` result (or arrays of bootstrap samples under the same keys).

    Returns:
        ``{"a", "b", "G"}``; NaN where α or β is not positive (no interior optimum).
    """
    alpha, beta, A, B = (np.asarray(fit[k], float) for k in ("alpha", "beta", "A", "B"))
    with np.errstate(all="ignore"):
        s = np.where((alpha > 0) & (beta > 0), alpha + beta, np.nan)
        out = {"a": beta / s, "b": alpha / s, "G": (alpha * A / (beta * B)) ** (1 / s)}
    return {k: (float(v) if v.ndim == 0 else v) for k, v in out.items()}


def allocate(opt: Mapping, C6) -> tuple:
    """(N_opt, D_opt) at ``C6`` FLOPs counted as 6ND, from ``compute_optimal``'s ``a, b, G``."""
    x = np.asarray(C6, float) / 6
    return opt["G"] * x ** opt["a"], x ** opt["b"] / opt["G"]


def _exp(x):
    with np.errstate(over="ignore"):  # an absurd fit overflows to inf (null in the JSON), not an error
        return np.exp(x)


def _log(x: float) -> float:
    return math.log(max(x, 1e-300))  # a frontier that is a pure power law drives E to 0


def _law(p: Mapping, N, D):
    return p["E"] + p["A"] / np.asarray(N) ** p["alpha"] + p["B"] / np.asarray(D) ** p["beta"]


def _frontier_law(p: Mapping, C):
    return p["E"] + p["A"] * np.asarray(C, float) ** -p["alpha"]


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
    fs = [_log(frontier["E"]), _log(frontier["A"]), frontier["alpha"]]
    th = _refit(FRONTIER_TERMS, [None, np.log(runs.C)], runs.L, Wf, fs, _frontier_grid(runs.C, runs.L), rng)
    th[[_distinct(runs.group, w) < 3 for w in Wf]] = np.nan
    out = {"frontier": {"E": _exp(th[:, 0]), "A": _exp(th[:, 1]), "alpha": th[:, 2]}}
    p = parametric
    ps = [_log(p["E"]), _log(p["A"]), _log(p["B"]), p["alpha"], p["beta"]]
    feats = [None, np.log(runs.N), np.log(runs.D)]
    th = _refit(PARAMETRIC_TERMS, feats, runs.L, Wp, ps, _parametric_grid(), rng)
    th[[(w > 0).sum() < 5 or min(_distinct(runs.N, w), _distinct(runs.D, w)) < 2 for w in Wp]] = np.nan
    out["parametric"] = {
        k: _exp(th[:, i]) if i < 3 else th[:, i] for i, k in enumerate(("E", "A", "B", "alpha", "beta"))
    }
    return out


def _distinct(x: np.ndarray, w: np.ndarray) -> int:
    return len(np.unique(x[w > 0]))


def _refit(terms, feats, L, W, start, grid, rng, extra: int = 6) -> np.ndarray:
    if not len(W):
        return np.zeros((0, len(start)))
    first = np.broadcast_to(np.asarray(start, float), (len(W), 1, len(start)))
    starts = np.concatenate([first, grid[rng.integers(0, len(grid), size=(len(W), extra))]], axis=1)
    return _solve(terms, feats, np.log(L), W, starts)[0]


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
            "frontier_loss": (_frontier_law(front, c), _frontier_law(boot["frontier"], c)),
            "parametric_loss": (_law(param, n_opt, d_opt), _law(boot["parametric"], bn, bd)),
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
    a = p.parse_args(argv)
    try:
        rows = load_runs(a.results, a.where)
        try:
            result = fit(rows, predict=a.predict, n_boot=a.bootstrap, seed=a.seed)
        except ValueError as e:
            raise ValueError(f"{a.results}: {e}") from e
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result |= {"source": str(a.results), "where": a.where}
    if a.out:
        from benchmarks.scaling_report import write_outputs  # matplotlib only when plots are wanted

        write_outputs(result, rows, a.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
