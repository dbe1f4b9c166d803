"""``python -m launch.train --dry-run``: every shipped config passes with the paths its users must set,
and each seeded defect is exit code 2 with an error naming the bucket or key.

The codec's and text encoder's geometry come from their ``config.json`` alone, so the folders made
here hold nothing else (no weights). What only a GPU run can confirm: that the memory plan's numbers
are what the GPU then allocates (``parallel.plan``'s own validation)."""

import dataclasses
import json
import re
import sys

import pytest

from data.batch import Batch
from dit.config import get_preset
from dit.flops import count
from launch.config import CONFIG_DIR
from launch.train import main
from tests.launch.conftest import run

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A Wan 2.1 VAE folder and a UMT5-XXL encoder folder, each only its ``config.json``."""
    root = tmp_path_factory.mktemp("models")
    wan = root / "Wan2.1-VAE"
    wan.mkdir()
    (wan / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "AutoencoderKLWan",
                "base_dim": 96,
                "z_dim": 16,
                "dim_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "temperal_downsample": [False, True, True],
            }
        )
    )
    wan22 = root / "Wan2.2-VAE"  # 2×2 patchify before the 8× encoder, 48 channels: 4×16×16
    wan22.mkdir()
    (wan22 / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "AutoencoderKLWan",
                "base_dim": 160,
                "z_dim": 48,
                "in_channels": 12,
                "out_channels": 12,
                "patch_size": 2,
                "is_residual": True,
                "scale_factor_spatial": 16,
                "dim_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "temperal_downsample": [False, True, True],
            }
        )
    )
    umt5 = root / "umt5-xxl"
    umt5.mkdir()
    (umt5 / "config.json").write_text(json.dumps({"model_type": "umt5", "d_model": 4096}))
    return {"wan": wan, "wan22": wan22, "umt5": umt5, "root": root}


def required(path, folders) -> list[str]:
    """The overrides a config's users must give (its ``???`` keys, as README and the file's header
    say), and the ``--world-size`` / ``--gpu`` of the dry-run command in the header (default 1, h100)."""
    from omegaconf import OmegaConf

    values = {
        "data.shards": "/lus/latents",
        "data.val_shards": "/lus/latents-val",
        "data.codec": str(folders["wan22" if path.name.startswith("wan2.2") else "wan"]),
        "data.text_encoder": str(folders["umt5"]),
        "init.from": "/models/diffusers-root",  # the dry run checks the plan, not the source
    }
    missing = OmegaConf.missing_keys(OmegaConf.load(path))
    unknown = missing - values.keys()
    assert not unknown, f"{path.name}: give this test a value for {sorted(unknown)}"
    header = path.read_text(encoding="utf-8")
    world = re.search(r"--dry-run --world-size (\d+)", header)
    gpu = re.search(r"--dry-run .*--gpu (\w+)", header)
    return [
        "--world-size",
        world.group(1) if world else "1",
        "--gpu",
        gpu.group(1) if gpu else "h100",
        *(f"{k}={values[k]}" for k in sorted(missing)),
    ]


def dry(config, *args, tmp_path):
    """The real CLI in a subprocess: (exit code, the JSON report or None, stderr)."""
    cmd = [sys.executable, "-m", "launch.train", "--config", str(config), "--dry-run", *args]
    proc = run([*cmd, f"run.dir={tmp_path / 'run'}"], timeout=600)
    out = proc.stdout.strip()
    return proc.returncode, (json.loads(out) if out else None), proc.stderr


def dry_in_process(capsys, config, *args) -> tuple[int, dict | None, str]:
    """``launch.train.main`` in this process (no interpreter start-up): (exit code, report, stderr).
    Options given after the overrides replace those before (argparse takes them first)."""
    options = [a for i, a in enumerate(args) if a.startswith("--") or (i and args[i - 1].startswith("--"))]
    overrides = [a for a in args if a not in options]
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(config), "--dry-run", *options, *overrides])
    out, err = capsys.readouterr()
    return stop.value.code, (json.loads(out) if out.strip() else None), err


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_passes_its_dry_run(config, folders, tmp_path, capsys):
    # in this process (the command line itself is run by the tests below): one interpreter start-up less
    # for each of the shipped configs
    code, report, err = dry_in_process(
        capsys, config, *required(config, folders), f"run.dir={tmp_path / 'run'}"
    )
    assert code == 0, err
    assert report["ok"] and report["errors"] == [] and report["buckets"]
    assert report["params"] > 0 and report["plan"]["fits"], report["warnings"]
    layout = report["layout"]
    assert layout["dp_replicate"] * layout["dp_shard"] * layout["cp"] * layout["tp"] == report["world_size"]
    for b in report["buckets"]:  # every bucket valid for its codec, so every one has tokens and FLOPs
        assert b["tokens"] > 0 and b["flops_train_step"] > 0 and b["memory_gib"] > 0, b
    assert not (tmp_path / "run").exists()  # nothing written: no config.yaml, no LOCK


def test_video_14b_at_720p_is_75600_tokens_per_clip_over_a_node_of_cp(folders, tmp_path, capsys):
    config = CONFIG_DIR / "video-14b.yaml"
    code, report, err = dry_in_process(capsys, config, *required(config, folders), "train.grad_accum=3")
    assert code == 0, err
    (bucket,) = report["buckets"]
    # 81 frames through the causal 4x VAE: 1 + 80/4 = 21; 720/8 = 90, 1280/8 = 160; patch 1x2x2
    assert (bucket["name"], bucket["latent"]) == ("81x720x1280", {"t": 21, "h": 90, "w": 160})
    assert bucket["tokens"] == 21 * 45 * 80 == 75_600 and report["plan"]["tokens"]["per_sample"] == 75_600
    assert report["layout"] == {
        "dp_replicate": 1,
        "dp_shard": 8,
        "cp": 8,
        "cp_ring": 1,
        "cp_ulysses": 8,
        "tp": 1,
    }
    assert report["plan"]["layout"]["cp"] == 8 and report["plan"]["settings"]["ac"] == "full"
    assert report["flops_per_step"] == 3 * bucket["flops_train_step"]  # grad_accum micro-batches
    # the FLOPs the trainer logs for this batch (dit.flops.count with the caption length)
    arch = get_preset("video-14b", fps_conditioning=True)
    assert bucket["flops_train_step"] == count(arch, 21, 90, 160, batch=1, text_len=512)["flops_train_step"]


def test_480p_buckets_and_dit_flops_are_the_published_arithmetic(folders, tmp_path, capsys):
    config = CONFIG_DIR / "video-1b3.yaml"
    args = [*required(config, folders), "data.bucket_file=launch/configs/buckets/wan-480p.json"]
    code, report, err = dry_in_process(capsys, config, *args)
    assert code == 0, err
    wan480 = {b["name"]: b for b in report["buckets"]}["81x480x832"]
    assert wan480["latent"] == {"t": 21, "h": 60, "w": 104} and wan480["tokens"] == 32_760  # 21·30·52
    # without checkpointing 480p does not fit an 80 GB GPU, and the warning says what would
    assert any("activation_checkpointing=full" in w for w in report["warnings"]), report["warnings"]
    config = CONFIG_DIR / "dit-xl-2.yaml"
    code, report, err = dry_in_process(capsys, config, *required(config, folders))
    assert code == 0, err
    (b,) = report["buckets"]
    assert b["latent"] == {"t": 1, "h": 32, "w": 32} and b["tokens"] == 256
    # the DiT paper's 118.64 GFLOPs (multiply-adds) per 256² image: ×2 per MAC, ×3 for a training step
    assert b["flops_train_step"] == pytest.approx(6 * 118.64e9 * b["batch_size"], rel=1e-3)


ONE = "data.buckets.buckets=[{frames: %d, height: %d, width: %d, batch_size: 1}]"  # replaces the file's
DEFECTS = [
    ("8-frame bucket", "video-1b3", [ONE % (8, 256, 256)], ["bucket 8x256x256", "keep 5"]),
    ("width not /16", "video-1b3", [ONE % (81, 480, 840)],
     ["bucket 81x480x840", "width 840", "832 or 848"]),
    ("4-channel model", "video-1b3", ["model.arch.in_channels=4"],
     ["model.arch.in_channels=4", "16-channel"]),
    ("cp=8 on 6 GPUs", "video-14b", ["--world-size", "6"], ["--world-size 6", "cp"]),
    ("cp cuts a frame", "video-1b3", ["--world-size", "2", "parallel.cp=2", ONE % (9, 32, 32)],
     ["bucket 9x32x32", "per-frame timesteps", "parallel.cp=2"]),
    ("text width", "video-1b3", ["model.arch.text_dim=2048"], ["model.arch.text_dim=2048", "4096-wide"]),
    ("no FID net", "tiny", ["eval.sample_metrics=true", "eval.fid_features=/no/such.pt"],
     ["eval.fid_features='/no/such.pt'", "no such file"]),
    ("unscorable prompt", "tiny", ["eval.sample_metrics=true", "eval.sample_prompts=[a cat]"],
     ["eval.sample_prompts", "'a cat'", "grammar"]),
    ("FVD of one clip", "tiny", ["eval.sample_metrics=true", f"eval.fvd_features={CONFIG_DIR / 'tiny.yaml'}",
     "eval.sample_prompts=[a red circle on a blue background]"], ["eval.fvd_features", "at least 2"]),
    # two replicas hold whole blocks (the planner's own check passes), but the run refuses block swap
    ("block swap on 2 ranks", "tiny",
     ["--world-size", "2", "parallel.dp_replicate=2", "finetune.lora.rank=4", "finetune.block_swap=1"],
     ["--world-size 2", "finetune.block_swap=1", "2 ranks", "parallel.dp_replicate=2"]),
]  # fmt: skip


@pytest.mark.parametrize("name, config, extra, named", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_seeded_defect_is_exit_2_naming_it(name, config, extra, named, folders, tmp_path, capsys):
    config = CONFIG_DIR / f"{config}.yaml"
    args = [*required(config, folders), *extra, f"run.dir={tmp_path / 'run'}"]
    code, report, err = dry_in_process(capsys, config, *args)
    assert code == 2 and not report["ok"]
    assert any(all(n in e for n in named) for e in report["errors"]), report["errors"]
    assert all(n in err for n in named)  # and readable on stderr
    assert not (tmp_path / "run").exists()


def test_a_frozen_low_precision_base_without_lora_passes_as_the_run_accepts_it(folders, tmp_path, capsys):
    """init.freeze + finetune.base_dtype=bf16 is a valid run (the config's rule: something is frozen);
    the planner refused it for want of finetune.lora.rank."""
    config = CONFIG_DIR / "tiny.yaml"
    extra = ["init.freeze=[blocks.*]", "finetune.base_dtype=bf16", f"run.dir={tmp_path / 'run'}"]
    code, report, err = dry_in_process(capsys, config, *required(config, folders), *extra)
    assert code == 0 and report["ok"], (report["errors"], err)


def test_all_defects_are_reported_together(folders, tmp_path, capsys):
    config = CONFIG_DIR / "video-1b3.yaml"
    two = (ONE % (8, 256, 256))[:-1] + ", " + (ONE % (17, 480, 840)).split("=[", 1)[1]
    args = [*required(config, folders), two, "model.arch.in_channels=4"]
    code, report, _ = dry_in_process(capsys, config, *args, "--world-size", "3", "parallel.tp=2")
    assert code == 2
    text = "\n".join(report["errors"])
    for named in ("bucket 8x256x256", "bucket 17x480x840", "model.arch.in_channels=4", "--world-size 3"):
        assert named in text


@pytest.mark.slow
def test_eval_without_val_shards_and_the_48_channel_pixel_codec(tmp_path):
    # the eval check is the config's own (a real start fails the same way): one line naming both keys
    code, report, err = dry(CONFIG_DIR / "tiny.yaml", "data.val_shards=''", tmp_path=tmp_path)
    assert code == 2 and "eval.every=200" in err and "data.val_shards" in err
    # still one JSON object on stdout: scripts that parse the dry run get the error, not nothing
    assert report["ok"] is False and "eval.every=200" in report["errors"][0]
    # the DiT preset as it was shipped: the default pixel codec makes 48 channels for a 4-channel model
    code, report, err = dry(
        CONFIG_DIR / "dit-xl-2.yaml", "data.shards=/l", "data.codec=pixel", tmp_path=tmp_path
    )
    assert code == 2 and any("model.arch.in_channels=4" in e and "48-channel" in e for e in report["errors"])
    assert not (tmp_path / "run").exists()


def test_deepspeed_constraints_come_from_its_trainer(capsys):
    code, report, err = dry_in_process(
        capsys,
        CONFIG_DIR / "tiny.yaml",
        "--world-size",
        "4",
        "parallel.engine=deepspeed",
        "parallel.dp_replicate=2",
    )
    assert code == 2 and any("parallel.dp_replicate=2" in e and "deepspeed" in e for e in report["errors"])


def test_declared_latents_train_on_latent_batches_and_refuse_pixels_naming_the_spec():
    """``data.codec=latents:C,T,S``: geometry for the checks, a pass-through for latent batches (the
    trainer's real Conditioner), and a clear refusal for anything that needs a network."""
    import torch

    from data.buckets import Compression
    from data.encoders import build_codec, codec_geometry
    from launch.batches import Conditioner
    from launch.config import load_config

    assert codec_geometry("latents:4,1,8") == (Compression(1, 8, causal=False), 4)
    assert codec_geometry("latents:16,4,8,causal") == (Compression(4, 8, causal=True), 16)
    for bad in ("latents:4,1", "latents:0,1,8", "latents:4,1,8,sideways", "pixel:x"):
        with pytest.raises(ValueError, match=re.escape(f"data.codec={bad!r}")):
            build_codec(bad)
    cfg = load_config(
        None,
        [
            "data.codec=latents:4,1,8",
            "model.arch.in_channels=4",
            "logging.sample_every=0",
            "train.cfg_dropout=0",
        ],
    )
    cond = Conditioner(cfg, torch.device("cpu"))
    latent = torch.randn(2, 4, 1, 8, 8)
    batch = Batch(
        bucket="1x64x64",
        key=["a", "b"],
        text=["", ""],
        fps=torch.full((2,), 8.0),
        latent=latent,
        text_emb=torch.randn(2, 5, 384),
        text_mask=torch.ones(2, 5, dtype=torch.bool),
    )
    assert torch.equal(cond(batch, torch.Generator().manual_seed(0)).x0, latent)
    raw = dataclasses.replace(batch, latent=None, video=torch.zeros(2, 3, 1, 64, 64))
    with pytest.raises(ValueError, match=r"data\.codec='latents:4,1,8' .*cannot encode raw video"):
        cond(raw, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"cannot decode samples"):
        cond.codec.decode(latent)


def test_options_may_follow_the_overrides(folders, capsys):
    """``… key=value --world-size 6`` (the order people type) is parsed, not an argparse error: world 6
    with video-14b's cp=8 is then the layout error it should be."""
    config = CONFIG_DIR / "video-14b.yaml"
    overrides = [a for a in required(config, folders) if "=" in a]
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(config), "--dry-run", *overrides, "--world-size", "6", "--gpu", "h200"])
    report = json.loads(capsys.readouterr().out)
    assert stop.value.code == 2 and report["world_size"] == 6
    assert any("parallel.cp=8" in e or "world size 6" in e for e in report["errors"]), report["errors"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--world-size", "abc"], "--world-size"),  # argparse's own error, still one JSON object
        (["--world-size", "0"], "--world-size 0"),
        (["model.arch.num_heads=0"], "num_heads"),
        (["parallel.timeout_minutes=1e300"], "parallel.timeout_minutes"),
        (["sample.frames=0"], "sample.frames"),
        (["sample.height=-16"], "sample.height"),
    ],
)
def test_hostile_command_lines_are_one_json_error_naming_the_input(args, named, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(CONFIG_DIR / "tiny.yaml"), "--dry-run", *args])
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON object, whatever went wrong
    assert stop.value.code == 2 and report["ok"] is False
    assert any(named in e for e in report["errors"]), report["errors"]


@pytest.mark.parametrize(
    "vae, named",
    [
        ({"_class_name": "AutoencoderKLWan", "dim_mult": [], "z_dim": 4}, "spatial compression 0.5"),
        (
            {"_class_name": "AutoencoderKLCogVideoX", "temporal_compression_ratio": 0},
            "temporal compression 0",
        ),
        ({"_class_name": "AutoencoderKLHunyuanVideo", "spatial_compression_ratio": 8.5}, "8.5"),
        ({"_class_name": "AutoencoderKLHunyuanVideo", "spatial_compression_ratio": -8}, "-8"),
    ],
)
def test_impossible_codec_compression_is_an_error_naming_data_codec(vae, named, tmp_path, capsys):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(vae))
    code, report, _ = dry_in_process(capsys, CONFIG_DIR / "tiny.yaml", f"data.codec={folder}")
    assert code == 2 and report["ok"] is False
    assert any("data.codec" in e and named in e for e in report["errors"]), report["errors"]


@pytest.mark.parametrize(
    "spec, named",
    [
        ({"fps": None, "buckets": [[1, 64, 64, 4]]}, "fps=None"),
        ({"image_ratio": "abc", "buckets": [[1, 64, 64, 4]]}, "image_ratio='abc'"),
        ({"buckets": [[1.5, 64, 64, 4]]}, "1.5 is not a whole number"),
        ({"buckets": [[True, 64, 64, 4]]}, "True is not a whole number"),
        ({"buckets": [[1, -64, 64, 4]]}, "sizes must be >= 1"),
    ],
)
def test_a_bad_bucket_file_is_one_error_naming_the_file(spec, named, tmp_path, capsys):
    path = tmp_path / "buckets.json"
    path.write_text(json.dumps(spec))
    code, report, _ = dry_in_process(capsys, CONFIG_DIR / "tiny.yaml", f"data.bucket_file={path}")
    assert code == 2 and report["ok"] is False
    assert any(f"data.bucket_file={path}" in e and named in e for e in report["errors"]), report["errors"]


def test_per_frame_timesteps_with_one_modulation_vector_need_no_frame_cut():
    """pt=2 and 2 latent frames make one frame of patches, one modulation vector: the model cuts that
    exactly (tests/parallel/test_context_cut.py), so the dry run must not refuse it; 4 frames of
    patches over cp=8 it must."""
    from launch.config import load_config
    from launch.dryrun import _split_errors
    from parallel.parallelize import make_dims

    cfg = load_config(None, ["model.arch.patch_size=[2,2,2]", "train.task_i2v=1", "parallel.cp=2"])
    dims = make_dims(cfg.parallel, 2, cfg.model.arch)
    assert _split_errors(cfg, 2, 64, dims, "bucket 5x32x32", sample=False) == []
    wide = load_config(None, ["model.arch.patch_size=[2,2,2]", "train.task_i2v=1", "parallel.cp=8"])
    errors = _split_errors(wide, 8, 64, make_dims(wide.parallel, 8, wide.model.arch), "b", sample=False)
    assert len(errors) == 1 and "4 are not divisible by parallel.cp=8" in errors[0]
