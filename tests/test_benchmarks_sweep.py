"""Scaling sweeps (``benchmarks.sweep``): the planning arithmetic against ``dit.flops`` and the shards'
bucket mix, a real local sweep of tiny runs with one failing run, collect, and the SLURM array argv.
(The SLURM array itself runs in ``tests/launch/test_slurm_cluster.py``.)"""

import json
import sys
from pathlib import Path

import pytest

from benchmarks import sweep
from data.encoders import build_codec
from dit.flops import count
from launch.config import load_config
from tests.launch.conftest import run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.synthetic import generate

    d = tmp_path_factory.mktemp("synthetic")
    generate(d, num=24, seed=3, val_num=8, samples_per_shard=8, frames=(12, 24))
    return d


def _grid(tmp_path: Path, shards: Path, **fields) -> Path:
    grid = {
        "overrides": [
            f"data.shards={shards}", f"data.val_shards={shards}", "data.num_workers=1", "eval.batches=1",
            "data.buckets.fps=8",
            "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2},"
            "{frames: 1, height: 32, width: 32, batch_size: 4}]",
        ],
        "widths": [32, 64], "head_dim": 16, "budgets": [1e10, 3e10],
    } | fields  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


def test_plan_spends_each_budget_within_half_a_step(tmp_path, shards):
    result = sweep.plan(_grid(tmp_path, shards, lrs=[1e-3, 2e-3]), tmp_path / "out")
    runs = result["runs"]
    assert len(runs) == 2 * 2 * 2 and len({r["name"] for r in runs}) == len(runs)
    mix = result["bucket_mix"]
    assert set(mix) <= {"4x32x32", "1x32x32"} and sum(mix.values()) == pytest.approx(1.0)
    for r in runs:
        cfg = load_config(result["base_config"], r["overrides"])
        assert cfg.model.arch.hidden_size == r["width"] and cfg.model.arch.num_heads == r["width"] // 16
        assert cfg.train.steps == r["steps"] and cfg.eval.every == r["steps"]
        # the expected FLOPs of a step, recomputed here from dit.flops and the bucket shapes
        comp, text = build_codec(cfg.data.codec).compression, cfg.data.max_text_len
        flops = 0.0
        for b in cfg.data.buckets.buckets:
            t, h, w = comp.latent_frames(b.frames), b.height // comp.spatial, b.width // comp.spatial
            c = count(cfg.model.arch, t, h, w, batch=b.batch_size, text_len=text)
            flops += mix[b.name] * c["flops_train_step"]
        assert r["flops_per_step"] == pytest.approx(flops, rel=1e-12)
        assert abs(r["steps"] * r["flops_per_step"] - r["budget"]) <= r["flops_per_step"] / 2
        assert r["params"] < sum(p.numel() for p in _model(cfg).parameters())  # embeddings left out
    assert runs[0]["params"] < runs[-1]["params"]  # widths 32 then 64


def _model(cfg):
    from dit.model import build_model

    return build_model(cfg.model.arch)


def test_grid_errors_name_the_file_and_key(tmp_path, shards):
    bad = _grid(tmp_path, shards, widths=[40])
    with pytest.raises(ValueError, match="width 40 is not a multiple of head_dim=16"):
        sweep.load_grid(bad)
    bad.write_text(json.dumps({"widths": [32], "budgets": [1e10], "depths": [2]}))
    with pytest.raises(ValueError, match="depths"):
        sweep.load_grid(bad)


@pytest.mark.slow
def test_local_sweep_resumes_skips_and_collects_a_failed_run(tmp_path, shards):
    out = tmp_path / "out"
    # lr = -1 is refused by the trainer's config check: that run fails, the others go on; the final
    # evaluation also scores two samples (prompts: the first held-out captions) with the probe
    grid = _grid(tmp_path, shards, widths=[32], budgets=[1e10], lrs=[1e-3, -1.0])
    fields = json.loads(grid.read_text())
    fields["overrides"] += ["eval.sample_metrics=true", "eval.sample_count=2", "sample.steps=2"]
    grid.write_text(json.dumps(fields))
    sweep.plan(grid, out)
    proc = run([sys.executable, "-m", "benchmarks.sweep", "run", str(out), "--local"], timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]  # one run failed
    proc = run([sys.executable, "-m", "benchmarks.sweep", "collect", str(out)])
    assert proc.returncode == 0 and "1 finished, 1 not" in proc.stdout, proc.stderr[-2000:]
    rows = {r["lr"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    ok, failed = rows[1e-3], rows[-1.0]
    assert ok["status"] == "ok" and failed["status"] == "failed" and failed["loss"] is None
    plan = {r["lr"]: r for r in sweep.read_plan(out)["runs"]}
    assert ok["steps_done"] == plan[1e-3]["steps"] and ok["wall_s"] > 0
    assert ok["loss"] > 0 and ok["tokens"] > 0
    # the last evaluation's sample scores, as the run logged them (a failed run has none)
    logged = Path(sweep._value(plan[1e-3]["overrides"], "run.dir")) / "metrics.jsonl"
    final = [r for r in map(json.loads, logged.read_text().splitlines()) if r["step"] == ok["steps_done"]][-1]
    assert ok["probe_n"] == 2 and 0 <= ok["probe_overall"] <= 1
    assert {k: v for k, v in ok.items() if k.startswith("probe_")} == {
        k: v for k, v in final.items() if k.startswith("probe_")
    }
    assert not any(k.startswith("probe_") for k in failed)
    table = (out / "lr_table.md").read_text()  # two learning rates: which one won, per width
    assert "| 32 | – | **" in table and table.rstrip().endswith("| 0.001 |")
    # the logged FLOPs are the sampled batches' own: near the planned budget, not equal to it
    assert ok["flops"] == pytest.approx(plan[1e-3]["flops"], rel=0.5)

    # again: the finished run is skipped, the failed one retried (and fails again)
    attempts = Path(sweep._value(plan[1e-3]["overrides"], "run.dir")) / "attempts.jsonl"
    before = attempts.read_text()
    proc = run([sys.executable, "-m", "benchmarks.sweep", "run", str(out), "--local"], timeout=600)
    assert proc.returncode == 1 and attempts.read_text() == before


@pytest.mark.slow
def test_slurm_run_is_one_job_array_over_the_unfinished_runs(tmp_path, shards):
    out = tmp_path / "out"
    sweep.plan(_grid(tmp_path, shards), out)
    proc = run(
        [sys.executable, "-m", "benchmarks.sweep", "run", str(out), "--slurm", "--gpus-per-node", "0",
         "--time", "30", "--max-parallel", "2", "--dry-run"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split()
    assert argv[0] == "sbatch" and "--array=0,1,2,3%2" in argv
    assert argv[-3:] == ["benchmarks.sweep", "task", str(out.resolve())]
    assert any(a.endswith("%x-%A_%a.log") for a in argv)


def test_bucket_mix_reads_shards_as_the_loader_does(tmp_path, shards):
    """Planning reads the shards' sidecars through the loader's reader and schema: a bad sidecar or
    a gzip tar costs its sample (or shard), not the plan, and never changes the mix of the good ones."""
    import gzip
    import io
    import shutil
    import tarfile

    cfg = load_config(None, [
        f"data.shards={shards}", "data.buckets.fps=8",
        "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2},"
        "{frames: 1, height: 32, width: 32, batch_size: 4}]",
    ])  # fmt: skip
    clean = sweep.bucket_mix(cfg)
    dirty = tmp_path / "dirty"
    shutil.copytree(shards, dirty)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, meta in (("nested", b"[" * 100_000), ("frames", b'{"kind": "video", "frames": "abc"}')):
            for ext, data in (("json", meta), ("txt", b"x"), ("mp4", b"not a video")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (dirty / "train-999998.tar").write_bytes(buf.getvalue())
    (dirty / "train-999999.tar").write_bytes(gzip.compress((shards / "train-000000.tar").read_bytes()))
    cfg.data.shards = str(dirty)
    assert sweep.bucket_mix(cfg) == clean
