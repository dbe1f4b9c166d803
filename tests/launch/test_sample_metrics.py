"""Sample metrics in the loop (``eval.sample_metrics``), ``python -m launch.evaluate`` and the grid image.

The logged ``probe_*`` numbers are checked to be the probe's own: ``python -m data.probe score`` of the
samples folder the trainer wrote, and ``launch.evaluate`` regenerating the same prompts from the saved
checkpoint with the same seeds prints them again. A 2-process dp=2 run logs what one process logs with
an odd prompt count (rank 1 draws one padding sample, uncounted). The models here are untrained, so
the accuracies are mostly 0; ``probe_flicker`` (a mean over every pixel outside the object) is the
number that would differ if anything else were scored.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from launch import sample_metrics as sm
from launch.config import load_config
from launch.metrics import Metrics, Progress, scalar_tag
from tests.launch.conftest import ROOT, metrics, one_thread, run, torchrun_cmd, train_in_process

PROMPTS = [
    "a red circle moves slowly from left to right on a white background",
    "a blue square moves quickly from top to bottom on a yellow background",
    "a green triangle on a black background",
]
SAMPLE = [
    "train.steps=2",
    "eval.every=1",
    "eval.batches=1",
    "eval.timesteps=1",
    "eval.sample_metrics=true",
    f"eval.sample_prompts={json.dumps(PROMPTS)}",
    "run.progress=lines",
]


def test_shares_are_padded_and_seeds_depend_on_the_prompt_alone():
    assert sm.share(3, 0, 2) == ([0, 2], 2)
    assert sm.share(3, 1, 2) == ([1, 1], 1)  # padded with its own prompt, one counted
    assert sm.share(1, 1, 2) == ([0], 0)  # more ranks than prompts: a repeat, nothing counted
    assert sm.share(5, 0, 1) == ([0, 1, 2, 3, 4], 5)
    seeds = {sm.prompt_seed(0, i) for i in range(16)} | {sm.prompt_seed(1, i) for i in range(16)}
    assert len(seeds) == 32


def test_thumbnail_is_one_row_of_evenly_spaced_frames():
    frames = np.arange(40 * 128 * 96 * 3, dtype=np.int64).reshape(40, 128, 96, 3).astype(np.uint8)
    row = sm.thumbnail(frames)
    # 16 of 40 frames, every 2nd pixel (128 > GRID_HEIGHT = 64): 64 × (16 · 48)
    assert row.shape == (64, 16 * 48, 3)
    np.testing.assert_array_equal(row[:, :48], frames[0, ::2, ::2])
    np.testing.assert_array_equal(row[:, -48:], frames[39, ::2, ::2])


def test_config_errors_name_the_keys(shards):
    base = [f"data.shards={shards}", f"data.val_shards={shards}"]
    with pytest.raises(ValueError, match="eval.sample_metrics=true .* eval.every=0"):
        load_config(None, [*base, "eval.sample_metrics=true", "eval.every=0"])
    with pytest.raises(ValueError, match="eval.sample_metrics=true: data.codec='latents:4,1,8'"):
        load_config(
            None, [*base, "eval.sample_metrics=true", "data.codec=latents:4,1,8", "model.arch.in_channels=4"]
        )
    with pytest.raises(ValueError, match=r"eval.sample_prompts.1: an empty prompt"):
        load_config(None, [*base, "eval.sample_prompts=[a, ' ']"])
    with pytest.raises(ValueError, match="eval.sample_count"):
        load_config(None, [*base, "eval.sample_count=0"])


def test_prompts_nothing_can_score_are_an_error():
    sm.check_scorable(PROMPTS, fidelity_on=False, source="x")
    with pytest.raises(
        ValueError, match="'a cat' is not in the built-in dataset's grammar.*eval.fid_features"
    ):
        sm.check_scorable([*PROMPTS, "a cat"], fidelity_on=False, source="eval.sample_prompts")
    sm.check_scorable(["a cat"], fidelity_on=True, source="x")  # the Fréchet/CLIP metrics score it
    assert not sm.probe_applies(["a cat"]) and sm.probe_applies(PROMPTS)


def test_metrics_image_and_eval_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert scalar_tag("probe_overall") == "eval/probe_overall" and scalar_tag("fvd") == "eval/fvd"
    assert scalar_tag("val_loss") == "val/loss" and scalar_tag("loss") == "train/loss"
    m = Metrics(tmp_path, True, __import__("torch").device("cpu"), True, Progress(1, "lines"))
    grid = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    m.image("eval/samples", grid, 3)
    m.write({"step": 3, "probe_overall": 0.25})
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        m.image("eval/samples", grid[..., 0], 3)
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    (img,) = acc.Images("eval/samples")
    assert (img.step, img.width, img.height) == (3, 40, 24)
    assert [s.value for s in acc.Scalars("eval/probe_overall")] == [0.25]


def _probe_cli(folder, capsys) -> dict:
    """``python -m data.probe score FOLDER``'s JSON, through its ``main`` in this process (CI time)."""
    from data.probe import main

    capsys.readouterr()
    status = main(["score", str(folder)])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    return json.loads(out)


def _as_logged(result: dict) -> dict:
    """``data.probe score``'s JSON as the flat keys the trainer logs."""
    out = {f"probe_{k}": v for k, v in result["accuracy"].items()}
    out |= {f"probe_{k}": v for k, v in result["temporal"].items()}
    return out | {"probe_overall": result["overall"], "probe_found": result["found"], "probe_n": result["n"]}


def _sample_records(run_dir) -> dict:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("probe_")} for r in metrics(run_dir)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, overrides):
    rd = tmp_path_factory.mktemp("sample-metrics") / "run"
    # bf16 on a CPU: launch.evaluate must take the run's precision, not its device's default (fp32).
    # The run in this process (CI time); launch.evaluate, which must regenerate its samples, is a process.
    train_in_process(rd, *overrides, *SAMPLE, "checkpoint.every=0", "run.precision=bf16")
    return rd


@pytest.mark.slow
def test_the_logged_numbers_are_the_probe_s_numbers(one_process, tmp_path, capsys):
    rd = one_process
    logged = _sample_records(rd)
    assert sorted(logged) == [1, 2]
    for step, values in logged.items():
        assert values["probe_n"] == 3
        for k in ("overall", "color", "background", "shape", "direction", "speed", "found", "flicker"):
            assert 0.0 <= values[f"probe_{k}"] <= 1.0, (step, k)
        folder = rd / "samples" / f"eval-{step:08d}"
        assert sorted(p.name for p in folder.iterdir()) == [
            f"{i:03d}.{e}" for i in range(3) for e in ("mp4", "txt")
        ]
        assert [(folder / f"{i:03d}.txt").read_text() for i in range(3)] == PROMPTS
        probe = _as_logged(_probe_cli(folder, capsys))
        assert values == probe  # exactly: the same arithmetic on the same files
    # the final checkpoint's EMA regenerates the same videos from the same per-prompt seeds
    out = tmp_path / "again"
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.evaluate", str(rd), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed["step"] == 2 and printed["prompts"] == 3
    assert {k: v for k, v in printed.items() if k.startswith("probe_")} == logged[2]
    for i in range(3):
        assert (out / f"{i:03d}.mp4").read_bytes() == (
            rd / "samples" / "eval-00000002" / f"{i:03d}.mp4"
        ).read_bytes()

    # so does an export of it (made in this process), from the seed and precision it records, given the
    # prompts
    from launch.export import main as export

    export([str(rd), str(tmp_path / "export")])
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    capsys.readouterr()
    argv = [str(tmp_path / "export"), "--out", str(tmp_path / "exp")]
    with one_thread():  # launch.evaluate's command line in this process, as its process computes it
        status = sm.cli([*argv, "--prompts-file", str(tmp_path / "prompts.txt")])
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    assert {k: v for k, v in json.loads(out).items() if k.startswith("probe_")} == logged[2]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(rd / "tb"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("eval/probe_overall")] == [1, 2]
    assert [s.value for s in acc.Scalars("eval/probe_flicker")] == pytest.approx(
        [logged[1]["probe_flicker"], logged[2]["probe_flicker"]]
    )
    grids = acc.Images("eval/samples")
    assert [g.step for g in grids] == [1, 2]
    assert (grids[0].height, grids[0].width) == (3 * 32, 4 * 32)  # rows: prompts, columns: frames


@pytest.mark.slow
def test_evaluate_cli_names_a_bad_path_and_a_bad_option(tmp_path, one_process, capsys):
    proc = run([sys.executable, "-m", "launch.evaluate", str(tmp_path / "nothing")])
    assert proc.returncode == 2 and "nothing: no such run directory" in proc.stderr
    # the bad option through the same command line in this process (CI time)
    assert sm.cli([str(one_process), "--count", "0"]) == 2 and "--count=0" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_names_a_bad_prompts_file_and_out(tmp_path, one_process, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00a red")
    (tmp_path / "file").write_text("x")
    cases = [
        (["--prompts-file", str(tmp_path / "blank.txt")], "blank.txt: no prompts"),
        (["--prompts-file", str(tmp_path / "binary.txt")], "binary.txt: not UTF-8 text"),
        (["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'}: exists and is not a folder"),
    ]
    for extra, said in cases:
        assert sm.cli([str(one_process), *extra]) == 2, extra
        assert said in capsys.readouterr().err, extra


@pytest.mark.slow
def test_dp2_logs_the_single_process_numbers(tmp_path, overrides, one_process):
    """dp=2 with 3 prompts: rank 0 draws prompts 0 and 2, rank 1 prompt 1 and a padding repeat. The model
    barely moves in its steps (``train.lr=1e-12``): dp=2 trains on another global batch than one process,
    and the comparison is about evaluation, not training; one process's run here uses the same lr."""
    extra = [*SAMPLE, "train.lr=1e-12", "train.steps=1", "parallel.dp_shard=-1"]
    train_in_process(tmp_path / "one", *overrides, *extra)  # in this process: CI time
    proc = run(torchrun_cmd(tmp_path / "dp2", *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {name: _sample_records(tmp_path / name)[1] for name in ("one", "dp2")}
    one, two = runs["one"], runs["dp2"]
    assert two["probe_n"] == one["probe_n"] == 3  # the padding sample is not counted
    assert {k: v for k, v in two.items() if k != "probe_flicker"} == {
        k: v for k, v in one.items() if k != "probe_flicker"
    }
    assert two["probe_flicker"] == pytest.approx(one["probe_flicker"], abs=1e-4)


@pytest.mark.slow
def test_evaluate_scores_fid_fvd_and_clip_against_the_held_out_clips(
    tmp_path, one_process, monkeypatch, capsys
):
    """``launch.evaluate`` (in this process) with tiny feature networks (each frame's / clip's mean colour)
    and a tiny CLIP: the printed FID, FVD and CLIP score are the closed-form Fréchet distances and the
    CLIP mean computed here from the videos it decoded (recorded on their way out of the real decoder:
    the mp4s are lossy) paired with their own prompts, against the moving held-out clips of the run's
    ``data.val_shards``."""
    import torch

    import launch.sample
    from launch.fidelity import clips_for_fvd, frames_for_fid
    from tests.launch import test_fidelity as tf

    decoded = []

    def recorded(codec, z):
        decoded.append(real_decode(codec, z))
        return decoded[-1]

    real_decode = launch.sample.decode
    monkeypatch.setattr(launch.sample, "decode", recorded)
    nets = {"fid": tf.script(tf.FrameMeans(), tmp_path / "fid.pt")}
    nets["fvd"] = tf.script(tf.ClipMeans(), tmp_path / "fvd.pt")
    clip_dir = tf.tiny_clip(tmp_path / "clip")
    argv = [
        str(one_process),
        "--out",
        str(tmp_path / "scored"),
        "--count",
        "6",
        "--fid-features",
        nets["fid"],
    ]
    argv += ["--fvd-features", nets["fvd"], "--clip-model", clip_dir]
    # building the tiny CLIP imported transformers → accelerate → DeepSpeed, whose first use printed a
    # notice on stdout: drop what was printed before the command, whose own stdout must be JSON only
    capsys.readouterr()
    assert sm.cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = load_config(one_process / "config.yaml")
    fake = np.concatenate(decoded[-len(PROMPTS) :])  # the generated clips, in prompt order
    assert len(fake) == len(PROMPTS)
    _, real = sm.held_out(cfg, 6, lambda _: True, lambda b, j: sm.pixels_of(b, j, None))
    real = [c for c in real if c.shape[0] > 1]  # stills are not clips
    assert len(real) >= 2

    def frame_means(videos) -> np.ndarray:  # every frame an image: (frames, 3)
        frames = [torch.from_numpy(v).permute(0, 3, 1, 2) for v in videos]  # T, 3, H, W each
        return np.concatenate([frames_for_fid(f).float().mean((2, 3)).numpy() for f in frames])

    def clip_means(videos) -> np.ndarray:  # (clips, 3)
        clips = [torch.from_numpy(v).permute(3, 0, 1, 2)[None] for v in videos]  # 1, 3, T, H, W each
        return np.concatenate([clips_for_fvd(c).mean((2, 3, 4)).numpy() for c in clips])

    assert printed["fid"] == pytest.approx(tf.frechet(frame_means(fake), frame_means(real)), rel=1e-3)
    assert printed["fvd"] == pytest.approx(tf.frechet(clip_means(fake), clip_means(real)), rel=1e-3)
    assert printed["clip_score"] == pytest.approx(tf.direct_clip_score(clip_dir, fake, PROMPTS), rel=1e-4)

    assert sm.cli([str(one_process), "--fid-features", str(tmp_path / "no.pt")]) == 2
    assert f"--fid-features '{tmp_path / 'no.pt'}': no such file" in capsys.readouterr().err


def test_an_empty_prompt_null_model_is_guided_by_the_encoded_empty_prompt(tmp_path):
    """``text_null=empty_prompt`` (Wan's convention): the in-loop samples' CFG null is the encoded ""
    (as the trainer's dropout null), not the prompt's own states, and ``sample.grid`` is honoured: the
    latents equal ``launch.sample.latents_for`` given an encoder that encodes what it is asked."""
    import torch

    from data.buckets import Compression
    from dit.config import get_preset
    from dit.diffusion import DiffusionConfig, make_objective
    from dit.model import build_model
    from launch.config import SampleConfig
    from launch.sample import latents_for

    arch = get_preset("tiny", text_dim=16, text_null="empty_prompt", text_mask=False)
    model = build_model(arch, seed=0)
    with torch.no_grad():  # every zero-initialised output layer non-zero: the text must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.eval()
    obj = make_objective(DiffusionConfig(shift=3.0))
    table = {}

    def encode(texts):  # a fixed random state per caption (4 tokens), as a text encoder gives
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(len(table) + 1)
            out.append(table.setdefault(t, torch.randn(4, 16, generator=g)))
        return torch.stack(out), torch.ones(len(texts), 4, dtype=torch.bool)

    settings = SampleConfig(
        frames=2, height=16, width=16, steps=3, cfg=4.0, sampler="unipc", grid="diffusers"
    )
    got = []

    def decode(z):
        got.append(z.clone())
        return np.zeros((1, 2, 16, 16, 3), np.uint8)

    comp = Compression(1, 4, causal=False)
    se = sm.SampleEval(prompts=PROMPTS[:2], settings=settings, seed=5, probe=False)
    se.run(model, obj, arch, comp, encode, decode, tmp_path / "out", "cpu", bf16=False)
    kw = dict(frames=2, height=16, width=16, fps=settings.fps, steps=3, sampler="unipc", cfg_scale=4.0)
    for i, z in enumerate(got):
        seed = sm.prompt_seed(5, i)
        want = latents_for(model, obj, arch, comp, encode, [PROMPTS[i]], seed=seed, device="cpu",
                           grid="diffusers", **kw)  # fmt: skip
        assert torch.equal(z, want), i
        own = encode([PROMPTS[i]])  # the bug this guards against: the prompt as its own null
        other = latents_for(model, obj, arch, comp, encode, [PROMPTS[i]], seed=seed, device="cpu",
                            grid="diffusers", empty_prompt=own, **kw)  # fmt: skip
        assert not torch.allclose(z, other)
        uniform = latents_for(model, obj, arch, comp, encode, [PROMPTS[i]], seed=seed, device="cpu", **kw)
        assert not torch.allclose(z, uniform)  # the grid reached the sampler
