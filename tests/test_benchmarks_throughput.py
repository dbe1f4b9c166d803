"""The throughput sweep (``benchmarks.throughput``) on CPU: one row per case, its arithmetic against
``dit.flops``, MFU against the measured peak, attention FLOPs, the report, and clear CLI errors."""

from __future__ import annotations

import datetime as dt
import json
import sys

import pytest

from benchmarks import report, throughput
from dit.config import get_preset
from dit.flops import count

pytestmark = pytest.mark.slow


ARGS = [
    "--presets", "tiny", "--shapes", "4x8x8", "--depth", "2", "--backends", "sdpa,math",
    "--ac", "none,full,selective", "--compile", "off", "--iters", "2", "--warmup", "1", "--text-len", "8",
    "--attn-shapes", "2x16x64", "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--out", "test",
]  # fmt: skip
BLOCK_PARTS = ("attn_proj", "attn_scores_values", "cross_attn_proj", "cross_attn_scores_values", "mlp")


def _main(args: list[str], results) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "RESULTS", results)
        # the report records the process's command line, as it would for `python -m ...`
        mp.setattr(sys, "argv", ["benchmarks/throughput.py", *args])
        return throughput.main(args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return _main(ARGS, results), results


@pytest.fixture(scope="module")
def flops():
    return count(get_preset("tiny", depth=2), 4, 8, 8, batch=1, text_len=8)


def test_one_row_per_case(run):
    result, _ = run
    cases = [
        (r["preset"], r["latent T×H×W"], r["attention"], r["checkpointing"], r["compile"])
        for r in result["rows"]
    ]
    assert sorted(cases) == sorted(
        ("tiny", "4x8x8", backend, ac, False)
        for backend in ("sdpa", "math")
        for ac in ("none", "full", "selective")
    )
    assert result["skipped"] == []
    assert [r["backend"] for r in result["attention"]] == ["sdpa", "math"]


def test_throughput_arithmetic_matches_dit_flops(run, flops):
    for r in run[0]["rows"]:
        assert r["tokens"] == flops["tokens"] == 64
        assert r["tokens/s"] == pytest.approx(r["tokens"] / r["step s (median)"], rel=1e-12)
        achieved = r["tokens/s"] * flops["flops_train_step"] / flops["tokens"]
        assert achieved == pytest.approx(r["model TFLOP/s"] * 1e12, rel=1e-6)


def test_mfu_is_model_flops_over_the_measured_peak(run):
    result, _ = run
    peak = result["peak"]
    assert peak["flops"] > 0 and "measured" in peak["label"]
    for r in result["rows"]:
        assert r["MFU"] == pytest.approx(r["model TFLOP/s"] * 1e12 / peak["flops"], rel=1e-9)


def test_recomputation_counts_as_hardware_flops_only(run, flops):
    block_flops = 2 * sum(flops["macs_breakdown"][k] for k in BLOCK_PARTS)  # one forward of both blocks
    # selective keeps the attention kernels' outputs: it recomputes the linears, not QKᵀ and PV
    linear_flops = 2 * sum(flops["macs_breakdown"][k] for k in ("attn_proj", "cross_attn_proj", "mlp"))
    extra = {"none": 0, "full": block_flops, "selective": linear_flops}
    for r in run[0]["rows"]:
        ratio = r["hardware TFLOP/s"] / r["model TFLOP/s"]
        assert ratio == pytest.approx(1 + extra[r["checkpointing"]] / flops["flops_train_step"], rel=1e-9)
    assert 0 < linear_flops < block_flops


def test_attention_rows_count_qk_and_pv(run):
    for r in run[0]["attention"]:
        assert (r["B"], r["H"], r["Dh"], r["N"]) == (1, 2, 16, 64)
        assert r["fwd FLOPs"] == 4 * 1 * 2 * 64**2 * 16
        assert r["fwd TFLOP/s"] == pytest.approx(r["fwd FLOPs"] / (r["fwd ms"] / 1e3) / 1e12, rel=1e-9)
        assert r["fwd+bwd TFLOP/s"] == pytest.approx(
            3 * r["fwd FLOPs"] / (r["fwd+bwd ms"] / 1e3) / 1e12, rel=1e-9
        )


def test_report_has_tables_and_command(run):
    result, results = run
    path = results / f"{dt.date.today().isoformat()}-throughput-cpu-fp32-test.md"
    assert result["report"] == path and path.exists()
    text = path.read_text()
    assert "| preset | latent T×H×W | tokens | attention | checkpointing | compile |" in text
    assert "| backend | B | H | Dh | N | fwd FLOPs |" in text
    assert f"python -m benchmarks.throughput {' '.join(ARGS)}" in text
    assert "measured: fastest of 5 2048³ fp32 matmuls before the sweep and 5 after" in text


def test_json_without_a_markdown_report(tmp_path):
    """``--json`` writes the rows, the arguments and the given peak; ``--no-report`` writes no .md."""
    out = tmp_path / "case.json"
    args = [*ARGS, "--ac", "every_2", "--backends", "sdpa", "--no-attention", "--peak-tflops", "2"]
    result = _main([*args, "--json", str(out), "--no-report"], tmp_path / "results")
    assert result["report"] is None and not (tmp_path / "results").exists()
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert (row["checkpointing"], row["attention"], data["attention"]) == ("every_2", "sdpa", [])
    assert row["MFU"] == pytest.approx(row["model TFLOP/s"] / 2, rel=1e-9)
    assert data["peak"] == {"flops": 2e12, "label": "given by --peak-tflops"}
    assert data["args"] == {
        "presets": ["tiny"], "shapes": [[4, 8, 8]], "depth": 2, "text_len": 8, "batch": 1, "dtype": "fp32"
    }  # fmt: skip


def test_attention_alone(tmp_path):
    args = [*ARGS, "--no-train", "--backends", "math", "--attn-shapes", "2x16x64,1x8x32", "--no-report"]
    result = _main(args, tmp_path)
    assert result["rows"] == [] and result["skipped"] == []
    assert [(r["H"], r["Dh"], r["N"]) for r in result["attention"]] == [(2, 16, 64), (1, 8, 32)]


def test_unavailable_and_failing_cases_are_listed(tmp_path, monkeypatch):
    def refuse(*args):
        raise RuntimeError("no kernel for these inputs")

    monkeypatch.setattr(throughput, "attention_case", refuse)
    args = [*ARGS, "--backends", "sdpa,flash_attn", "--ac", "none"]
    result = _main(args, tmp_path)
    assert [r["attention"] for r in result["rows"]] == ["sdpa"] and result["attention"] == []
    reasons = {s["case"]: s["reason"] for s in result["skipped"]}
    assert "needs CUDA" in reasons["backend flash_attn (every case)"]
    assert reasons["attention sdpa H=2 Dh=16 N=64"] == "RuntimeError: no kernel for these inputs"
    assert "### Skipped" in result["report"].read_text()


@pytest.mark.parametrize(
    ("args", "flag", "detail"),
    [
        (["--presets", "tiny,nope"], "--presets", "unknown preset 'nope'"),
        (["--shapes", "4x8"], "--shapes", "'4x8' is not a T×H×W latent"),
        (["--shapes", "4x8x7"], "--shapes", "not divisible by preset tiny's patch 1x2x2"),
        (["--ac", "every_0"], "--ac", "every_K"),
        (["--backends", "sdpa,xformers"], "--backends", "unknown attention backend 'xformers'"),
        (["--peak-tflops", "0"], "--peak-tflops", "expected a positive number"),
        (["--no-train", "--no-attention"], "--no-train --no-attention", "nothing to measure"),
    ],
)
def test_bad_flags_exit_naming_the_flag(args, flag, detail, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "cpu", "--presets", "tiny", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and detail in err
