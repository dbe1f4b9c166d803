"""The scaling laws that ``benchmarks.scaling`` fits and its report draws: forms, fits and predictions.

- The compute frontier L(C) = E + A·C^-α, with θ = (log E, log A, α).
- The parametric law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3), with
  θ = (log E, log A, log B, α, β), and its compute-optimal allocation under C = 6ND.

In log space both are a log-sum-exp of terms linear in θ (:func:`lse`). A fit minimises a Huber loss
(δ = 1e-3) on log-loss residuals from a grid of starts with a batched Levenberg-Marquardt: every start
is its own problem, all in one array. ``scipy.optimize.least_squares(loss="huber", f_scale=δ)`` minimises
the same objective and reaches the same optimum from the same starts, but one start at a time: on the
tests' data over 100× slower (4500 starts per parametric fit, and a bootstrap refits hundreds of times).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

DELTA = 1e-3  # Huber δ on log L, as Hoffmann et al.
# LSE terms as (offset index, slope index): frontier θ = (e, a, α), parametric θ = (e, a, b, α, β)
FRONTIER_TERMS = ((0, None), (1, 2))
PARAMETRIC_TERMS = ((0, None), (1, 3), (2, 4))
FRONTIER_KEYS = ("E", "A", "alpha")
PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta")
# what a prediction at one compute budget holds (``benchmarks.scaling.fit``'s ``predictions``)
PRED_KEYS = ("frontier_loss", "parametric_loss", "N_opt", "D_opt")


# ---- the optimiser --------------------------------------------------------------------------------------
def lse(theta: np.ndarray, terms, feats: list, jac: bool):
    """A law in log space: log Σ_j exp(θ[o_j] − θ[s_j]·x_j) per problem (S×n), and its Jacobian (S×n×k).

    Args:
        theta: S×k parameters, one row per problem.
        terms: (offset index, slope index or None) per term: ``FRONTIER_TERMS``, ``PARAMETRIC_TERMS``.
        feats: Per term, the log feature x_j (n values) its slope multiplies, or None.
        jac: Also return the Jacobian (else None).
    """
    S, k = theta.shape
    n = len(next(x for x in feats if x is not None))
    cols = [
        theta[:, o, None] - (0 if s is None else theta[:, s, None] * x)
        for (o, s), x in zip(terms, feats, strict=True)
    ]
    z = np.stack([np.broadcast_to(c, (S, n)) for c in cols], axis=-1)  # S, n, terms: log of each term
    top = z.max(-1, keepdims=True)
    p = np.exp(z - top)
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


def solve(terms, feats: list, y: np.ndarray, W: np.ndarray, starts: np.ndarray) -> tuple:
    """Minimise Σ W·Huber(lse(θ) − y) from the best of K starts, for each of P weighted problems.

    Args:
        terms, feats: The law, as :func:`lse` takes it.
        y: Log loss per run (n).
        W: P×n weights per problem (a run's multiplicity in a bootstrap resample; 0 leaves it out).
        starts: P×K×k starting parameters.

    Returns:
        (P×k parameters, P objectives at them).
    """
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
        return lse(t, terms, cfeats, jac)

    # a loose tolerance finds the basin of every start; only the best start of each problem is polished
    th, f = _lm(th, model, y, np.repeat(W, K, axis=0), tol=1e-6)
    th = th.reshape(P, K, k)[np.arange(P), np.argmin(f.reshape(P, K), axis=1)]
    th, f = _lm(th, model, y, W, tol=1e-12)
    return th @ (np.eye(k) + shift), f


def frontier_grid(C: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Starts (e, a, α): E a share of the lowest loss, the curve through the mean point."""
    x, lbar, out = np.log(C).mean(), float(np.exp(np.log(L).mean())), []
    for q in (0.05, 0.3, 0.6, 0.8, 0.9, 0.97):
        E = q * float(L.min())
        for alpha in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
            out.append((math.log(E), math.log(max(lbar - E, 1e-3 * lbar)) + alpha * x, alpha))
    return np.array(out)


def parametric_grid() -> np.ndarray:
    """Hoffmann et al.'s grid of 4500 starts (e, a, b, α, β)."""
    g = np.meshgrid([-1, -0.5, 0, 0.5, 1], range(0, 26, 5), range(0, 26, 5), *[[0, 0.5, 1, 1.5, 2]] * 2)
    return np.stack([a.ravel() for a in g], axis=1).astype(float)


# ---- the laws -------------------------------------------------------------------------------------------
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
    th, f = solve(
        FRONTIER_TERMS, [None, np.log(C)], np.log(L), np.ones((1, len(C))), frontier_grid(C, L)[None]
    )
    return frontier_params(th[0]) | {"huber": float(f[0])}


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
    th, f = solve(PARAMETRIC_TERMS, feats, np.log(L), W, parametric_grid()[None])
    return parametric_params(th[0]) | {"huber": float(f[0])}


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


def parametric_law(p: Mapping, N, D):
    """L(N, D) = E + A/N^α + B/D^β for a ``fit_parametric`` result ``p`` (or arrays of samples)."""
    return p["E"] + p["A"] / np.asarray(N) ** p["alpha"] + p["B"] / np.asarray(D) ** p["beta"]


def frontier_law(p: Mapping, C):
    """L(C) = E + A·C^-α for a ``fit_frontier`` result ``p`` (or arrays of samples)."""
    return p["E"] + p["A"] * np.asarray(C, float) ** -p["alpha"]


def frontier_theta(p: Mapping) -> list[float]:
    """A frontier fit's θ = (log E, log A, α), the coordinates the optimiser works in."""
    return [_log(p["E"]), _log(p["A"]), p["alpha"]]


def parametric_theta(p: Mapping) -> list[float]:
    """A parametric fit's θ = (log E, log A, log B, α, β)."""
    return [_log(p["E"]), _log(p["A"]), _log(p["B"]), p["alpha"], p["beta"]]


def frontier_params(theta) -> dict:
    """θ (k, or a stack …×k) → ``{"E", "A", "alpha"}``: floats for one θ, arrays for a stack."""
    return _params(theta, FRONTIER_KEYS, logs=2)


def parametric_params(theta) -> dict:
    """θ → ``{"E", "A", "B", "alpha", "beta"}``, as :func:`frontier_params`."""
    return _params(theta, PARAMETRIC_KEYS, logs=3)


def _params(theta, keys: tuple[str, ...], logs: int) -> dict:
    th = np.asarray(theta, float)
    values = [_exp(th[..., i]) if i < logs else th[..., i] for i in range(len(keys))]
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in zip(keys, values, strict=True)}
