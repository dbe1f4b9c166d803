"""Scaling-law fits (``benchmarks.scaling``): recovery of known laws, bootstrap intervals, the FLOPs
convention, input errors, and the CLI end to end on a small results file."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import scaling, scaling_laws

ROOT = Path(__file__).resolve().parents[2]
# Hoffmann et al. (2022)'s fitted law, the ground truth of the synthetic runs
TRUE = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
TRUE_A, TRUE_B = 0.28 / 0.62, 0.34 / 0.62  # β/(α+β), α/(α+β)


def _chinchilla(N, D):
    return TRUE["E"] + TRUE["A"] / np.asarray(N) ** TRUE["alpha"] + TRUE["B"] / np.asarray(D) ** TRUE["beta"]


def _isoflop_rows(sigma: float, seed: int, sizes: int = 5, budgets: int = 5) -> list[dict]:
    """An iso-FLOP sweep as ``benchmarks.sweep`` plans one: every size at every budget, D = C / 6N."""
    rng, rows = np.random.default_rng(seed), []
    for n in np.logspace(6, 8.5, sizes):
        for c in np.logspace(16, 20, budgets):
            d = c / (6 * n)
            loss = float(_chinchilla(n, d) * math.exp(rng.normal(0, sigma)))
            rows.append({"name": f"n{n:.2g}-c{c:.0e}", "params": n, "tokens": d, "budget": c, "loss": loss})
    return rows


@pytest.mark.slow
def test_parametric_fit_recovers_chinchilla():
    rng = np.random.default_rng(0)
    # wide enough in N and D that E is identified (over 1e6..1e8 × 1e8..1e10 E drifts by up to 6% with σ)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6)))
    L = _chinchilla(N, D) * np.exp(rng.normal(0, 0.005, N.size))
    fit = scaling.fit_parametric(N, D, L)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=0.05)
    assert fit["E"] == pytest.approx(TRUE["E"], rel=0.05)
    opt = scaling.compute_optimal(fit)
    assert opt["a"] == pytest.approx(TRUE_A, abs=0.05) and opt["b"] == pytest.approx(TRUE_B, abs=0.05)
    assert opt["a"] + opt["b"] == pytest.approx(1.0)
    # the allocation is the minimiser of L(N, C/6N) along the iso-FLOP line
    C = 1e21
    n_opt, d_opt = scaling.allocate(opt, C)
    assert 6 * n_opt * d_opt == pytest.approx(C)
    ns = n_opt * np.geomspace(0.5, 2, 41)
    assert np.argmin(scaling_laws.parametric_law(fit, ns, C / (6 * ns))) == 20


def test_frontier_fit_recovers_a_known_law():
    rng = np.random.default_rng(1)
    C = np.logspace(15, 21, 13)
    L = (1.5 + 30 * C**-0.1) * np.exp(rng.normal(0, 0.003, C.size))
    fit = scaling.fit_frontier(C, L)
    assert fit["E"] == pytest.approx(1.5, rel=0.05)
    assert fit["alpha"] == pytest.approx(0.1, abs=0.02)
    assert abs(math.log(fit["A"] / 30)) < 0.5


def test_fits_refuse_too_few_points():
    with pytest.raises(ValueError, match="3 or more compute budgets"):
        scaling.fit_frontier([1e18, 1e19, 1e19], [3.0, 2.9, 2.8])
    N, D = [1e6, 1e7, 1e6, 1e7], [1e9, 1e9, 1e10, 1e10]
    with pytest.raises(ValueError, match="5 or more runs"):
        scaling.fit_parametric(N, D, _chinchilla(N, D))
    with pytest.raises(ValueError, match="2 usable runs"):
        scaling.fit(_isoflop_rows(0.01, 0)[:2])


@pytest.mark.slow
def test_bootstrap_intervals_contain_the_truth_and_shrink_with_noise():
    widths = {}
    for sigma in (0.02, 0.005):
        result = scaling.fit(_isoflop_rows(sigma, seed=0), n_boot=100, seed=0)
        p, opt = result["parametric"], result["compute_optimal"]
        assert result["bootstrap"]["valid_parametric"] == 100
        for part, key, truth in ((p, "alpha", TRUE["alpha"]), (p, "beta", TRUE["beta"]), (opt, "a", TRUE_A)):
            lo, hi = part["ci"][key]
            assert lo < truth < hi, (sigma, key, lo, hi)
            assert lo <= part[key] <= hi
        lo, hi = result["frontier"]["ci"]["alpha"]
        assert lo < result["frontier"]["alpha"] < hi
        widths[sigma] = {k: np.diff(p["ci"][k])[0] for k in ("alpha", "beta", "E")}
    for k in ("alpha", "beta", "E"):
        assert 0 < widths[0.005][k] < widths[0.02][k], k


def test_best_learning_rate_and_budget_groups():
    rows = _isoflop_rows(0.005, seed=2, sizes=3, budgets=3)
    for r in rows:
        r["lr"] = 1e-3
    worse = [dict(r, lr=3e-3, loss=r["loss"] + 0.05, name=r["name"] + "-lr3e-3") for r in rows]
    runs, _ = scaling.prepare(rows + worse)
    best = scaling._pick(runs.cell, runs.L, np.ones((1, len(runs.L))))[0] > 0
    assert best.tolist() == [True] * len(rows) + [False] * len(worse)
    # without a nominal budget, FLOPs within ±10% are one budget and a factor 10 apart are not
    ids, reps = scaling.budget_groups(np.array([1e18, 1.05e18, 0.97e18, 1e19, 1.1e19]), [None] * 5)
    assert ids.tolist() == [0, 0, 0, 1, 1] and reps[0] == pytest.approx(1.0066e18, rel=1e-3)
    ids, _ = scaling.budget_groups(np.array([1e18, 1.5e18, 7e18]), [1e18, 1e18, None])
    assert ids.tolist() == [0, 0, 1]


def test_flops_column_is_used_when_present_else_6nd():
    rows = _isoflop_rows(0.005, seed=3, sizes=3, budgets=3)
    runs, _ = scaling.prepare(rows)
    assert runs.flops_source == "6ND"
    assert np.allclose(runs.C, 6 * runs.N * runs.D) and runs.flops_per_6nd == pytest.approx(1.0)
    measured = [dict(r, flops=9 * r["params"] * r["tokens"]) for r in rows]
    runs, _ = scaling.prepare(measured)
    assert runs.flops_source == "flops" and np.allclose(runs.C, 9 * runs.N * runs.D)
    assert runs.flops_per_6nd == pytest.approx(1.5)
    # one row without flops: every row falls back to 6ND rather than mixing units
    runs, _ = scaling.prepare(measured[:-1] + rows[-1:])
    assert runs.flops_source == "6ND" and np.allclose(runs.C, 6 * runs.N * runs.D)
    result = scaling.fit(measured, predict=[1e21], n_boot=0)
    assert result["flops_source"] == "flops" and result["flops_per_6nd"] == pytest.approx(1.5)
    assert [t["C"] for t in result["runs"]] == pytest.approx([r["flops"] for r in measured])
    # a prediction at C measured FLOPs allocates C / 1.5 FLOPs of 6ND
    pred = result["predictions"][0]
    assert 6 * pred["N_opt"] * pred["D_opt"] == pytest.approx(1e21 / 1.5)
    assert pred["ci"]["N_opt"] == [None, None]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_runs_filters_and_names_bad_lines(tmp_path, capsys):
    rows = _isoflop_rows(0.01, 0, sizes=2, budgets=2)
    path = _write(tmp_path / "r.jsonl", [dict(r, parametrization="mup") for r in rows[:2]] + rows[2:] + [""])
    assert len(scaling.load_runs(path)) == 4
    assert len(scaling.load_runs(path, ["parametrization=mup"])) == 2
    assert len(scaling.load_runs(path, ["budget=1e16"])) == 2  # numbers match by value: 1e16 is 1e+16
    bad = _write(tmp_path / "bad.jsonl", [*rows[:2], "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not JSON"):
        scaling.load_runs(bad)
    missing = _write(tmp_path / "missing.jsonl", [rows[0], {"tokens": 1e9, "loss": 3.0}])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: missing 'params'"):
        scaling.load_runs(missing)
    # a failed run may lack anything: it is skipped, not an error
    assert len(scaling.load_runs(_write(tmp_path / "f.jsonl", [{"status": "failed"}]))) == 1
    assert scaling.main(["fit", str(bad)]) != 0
    assert "bad.jsonl:3" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    rows = [dict(r, lr=1e-3) for r in _isoflop_rows(0.005, seed=4, sizes=4, budgets=4)]
    rows += [dict(r, lr=3e-3, loss=r["loss"] * 1.03, name=r["name"] + "-lr3e-3") for r in rows[:4]]
    rows += [
        {"name": "crashed-run", "params": 1e8, "tokens": 1e9, "status": "failed", "loss": None},
        {"name": "lossless-run", "params": 1e7, "tokens": 1e9},
    ]
    results, out = _write(tmp_path / "results.jsonl", rows), tmp_path / "fit"
    cmd = [sys.executable, "-m", "benchmarks.scaling", "fit", str(results), "--out", str(out)]
    cmd += ["--predict", "1e21", "1e22", "--bootstrap", "50", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # one JSON object and nothing else
    for key in (
        "frontier",
        "parametric",
        "compute_optimal",
        "predictions",
        "n_runs",
        "n_skipped",
        "flops_source",
    ):
        assert key in result
    assert {"E", "A", "alpha", "ci"} <= set(result["frontier"])
    assert {"E", "A", "B", "alpha", "beta", "ci"} <= set(result["parametric"])
    assert {"a", "b", "G", "ci"} <= set(result["compute_optimal"])
    assert result["n_runs"] == 20 and result["n_skipped"] == 2 and result["flops_source"] == "6ND"
    assert result["parametric"]["n_points"] == 16 and result["frontier"]["n_points"] == 4
    assert [p["C"] for p in result["predictions"]] == [1e21, 1e22]
    for p in result["predictions"]:
        assert p["ci"]["N_opt"][0] < p["N_opt"] < p["ci"]["N_opt"][1]
    assert json.loads((out / "fit.json").read_text()) == result
    for name in ("loss_vs_compute.png", "n_opt_vs_compute.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    report = (out / "report.md").read_text()
    assert "crashed-run" in report and "status=failed" in report and "lossless-run" in report
    assert "](loss_vs_compute.png)" in report and "](n_opt_vs_compute.png)" in report
    assert "Loss vs learning rate" in report and "Caveats" in report


def test_lse_jacobian_matches_finite_differences():
    # a wrong Jacobian still converges (steps are only kept when the loss falls), just slowly: test it here
    rng = np.random.default_rng(5)
    feats = [None, rng.normal(0, 2, 7), rng.normal(0, 2, 7)]
    theta = rng.normal(0, 1, (3, 5))
    m, J = scaling_laws.lse(theta, scaling_laws.PARAMETRIC_TERMS, feats, jac=True)
    for k in range(5):
        h = np.zeros(5)
        h[k] = 1e-6
        up, down = (
            scaling_laws.lse(theta + s * h, scaling_laws.PARAMETRIC_TERMS, feats, jac=False)[0]
            for s in (1, -1)
        )
        assert np.allclose(J[:, :, k], (up - down) / 2e-6, atol=1e-7), k


def test_target_fits_the_probe_error_rate(tmp_path, capsys):
    """``--target probe_overall`` fits 1 − probe_overall with the law a loss would get (here a known
    frontier), not the ``loss`` column (garbage here); a perfect score and a run without the key are
    skipped and named, and an unknown target is refused."""
    rng = np.random.default_rng(3)
    C = np.logspace(15, 21, 13)
    error = 0.05 + 30.0 * C**-0.1 * np.exp(rng.normal(0, 0.002, C.size))
    rows = [
        {"name": f"c{c:.0e}", "params": (c / 6) ** 0.5, "tokens": (c / 6) ** 0.5, "flops": c, "budget": c,
         "loss": 9.9, "probe_overall": 1.0 - e}
        for c, e in zip(C, error, strict=True)
    ]  # fmt: skip
    rows += [
        {"name": "perfect", "params": 1e6, "tokens": 1e9, "loss": 1.0, "probe_overall": 1.0},
        {"name": "no-probe", "params": 1e6, "tokens": 1e9, "loss": 1.0},
    ]
    path = _write(tmp_path / "results.jsonl", rows)
    loaded = scaling.load_runs(path, target="probe_overall")
    assert [r["loss"] for r in loaded[:13]] == pytest.approx(error) and loaded[0]["val_loss"] == 9.9
    assert scaling.load_runs(path)[0]["loss"] == 9.9  # the default target is the validation loss
    result = scaling.fit(loaded, n_boot=0)
    assert result["n_runs"] == 13 and result["n_skipped"] == 2
    assert result["frontier"]["alpha"] == pytest.approx(0.1, abs=0.02)
    assert result["frontier"]["E"] == pytest.approx(0.05, abs=0.02)
    with pytest.raises(ValueError, match="--target 'clip_score'"):
        scaling.load_runs(path, target="clip_score")
    fid_rows = scaling.load_runs(_write(tmp_path / "f.jsonl", [dict(rows[0], fid=12.5)]), target="fid")
    assert fid_rows[0]["loss"] == 12.5  # lower-is-better targets are fitted as they are
