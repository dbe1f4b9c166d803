"""``benchmarks.scaling_laws``: the laws as a public module of their own. The report imports it and not
the fitter (no import cycle through private names), and the optimiser's coordinates θ map to the laws'
parameters and back."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import scaling_laws as laws

ROOT = Path(__file__).resolve().parents[2]
CHINCHILLA = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}


@pytest.mark.slow  # a fresh interpreter, to see what importing the report imports
def test_the_report_needs_the_laws_not_the_fitter():
    code = (
        "import sys, benchmarks.scaling_report; "
        "print('benchmarks.scaling' in sys.modules, 'benchmarks.scaling_laws' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_theta_and_parameters_map_to_each_other():
    back = laws.parametric_params(laws.parametric_theta(CHINCHILLA))
    assert back == pytest.approx(CHINCHILLA, rel=1e-12) and all(type(v) is float for v in back.values())
    front = {"E": 1.5, "A": 30.0, "alpha": 0.1}
    assert laws.frontier_params(laws.frontier_theta(front)) == pytest.approx(front, rel=1e-12)
    # a stack of θ (a bootstrap's refits) gives one array per parameter, row by row
    thetas = np.array([laws.frontier_theta(front), laws.frontier_theta({"E": 2.0, "A": 5.0, "alpha": 0.3})])
    stacked = laws.frontier_params(thetas)
    assert stacked["E"].tolist() == pytest.approx([1.5, 2.0]) and stacked["alpha"].tolist() == [0.1, 0.3]
    # the log-sum-exp form in θ is the law itself: log L(N, D) at the mapped θ
    N, D = np.array([1e7, 3e8]), np.array([2e9, 5e10])
    theta = np.array([laws.parametric_theta(CHINCHILLA)])
    m, _ = laws.lse(theta, laws.PARAMETRIC_TERMS, [None, np.log(N), np.log(D)], jac=False)
    assert np.exp(m[0]) == pytest.approx(laws.parametric_law(CHINCHILLA, N, D), rel=1e-12)
    want = 1.7 + 400 / N**0.34 + 410 / D**0.28
    assert laws.parametric_law(CHINCHILLA, N, D) == pytest.approx(want, rel=1e-12)
