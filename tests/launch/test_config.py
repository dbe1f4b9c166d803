"""Structured config: presets, overrides, errors that name the key, round trip; LR schedules."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from dit.config import PRESETS
from launch.config import CONFIG_DIR, TrainConfig, load_config, save_config
from launch.optim import lr_factor

WAN = ["data.shards=/lat", "data.val_shards=/val", "data.codec=/vae", "data.text_encoder=/umt5"]
REQUIRED = {"video-1b3": WAN, "video-14b": WAN, "dit-xl-2": ["data.shards=/lat"]}
REQUIRED |= {
    n: [*WAN, "init.from=/models/wan"]
    for n in (
        "wan2.1-t2v-1.3b-finetune",
        "wan2.2-ti2v-5b-i2v",
        "wan2.1-t2v-1.3b-lora",
        "wan2.2-ti2v-5b-i2v-lora",
    )
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_file_loads_on_its_model_preset(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", REQUIRED.get(name, []))
    edited = OmegaConf.load(CONFIG_DIR / f"{name}.yaml").model.get("arch", {})
    base = PRESETS[cfg.model.preset]
    for f in dataclasses.fields(base):  # the preset, except for the fields the file sets
        want = (
            tuple(edited[f.name])
            if f.name == "patch_size" and f.name in edited
            else edited.get(f.name, getattr(base, f.name))
        )
        assert getattr(cfg.model.arch, f.name) == want, f.name
    if name in REQUIRED:  # paths marked ??? must be given
        with pytest.raises(ValueError, match=REQUIRED[name][-1].split("=")[0]):
            load_config(CONFIG_DIR / f"{name}.yaml", REQUIRED[name][:-1])


def test_overrides_preset_edits_and_the_saved_config_round_trips(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  preset: tiny\n")
    cfg = load_config(
        tmp_path / "base.yaml",
        [
            "model.preset=video-small",
            "model.arch.depth=3",
            "train.lr=3e-4",
            "init.from=/some/export",
            "seed=7",
        ],
    )
    assert cfg.model.arch.hidden_size == PRESETS["video-small"].hidden_size and cfg.model.arch.depth == 3
    assert cfg.train.lr == 3e-4 and cfg.init.from_ == "/some/export" and cfg.seed == 7
    save_config(cfg, tmp_path / "config.yaml")
    assert "from: /some/export" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("model.arch.deptx=3", "model.arch.deptx"),
        ("checkpoint.every=often", "checkpoint.every"),
        ("parallel.engine=megatron", "parallel.engine"),
        ("train.schedule=linear", "train.schedule"),
        ("model.preset=dit-xxl", "model.preset"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("parallel.timeout_minutes=0", "parallel.timeout_minutes"),
        ("parallel.timeout_minutes=.nan", "parallel.timeout_minutes"),
        ("parallel.activation_checkpointing=selectiv", "parallel.activation_checkpointing"),
    ],
)
def test_bad_keys_and_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_settings_that_contradict_each_other_fail_at_load_naming_both_keys():
    # a real start fails here, before any process group or GPU: not at the first evaluation
    with pytest.raises(ValueError, match=r"eval\.every=200 .*data\.val_shards is empty"):
        load_config(None, ["data.val_shards=''"])
    assert load_config(None, ["data.val_shards=''", "eval.every=0"]).eval.every == 0
    # a codec that only declares latent geometry cannot decode samples
    declared = ["model.arch.in_channels=4", "data.codec=latents:4,1,8"]
    with pytest.raises(ValueError, match=r"logging\.sample_every=300: data\.codec='latents:4,1,8'"):
        load_config(None, declared)
    assert load_config(None, [*declared, "logging.sample_every=0"]).data.codec == "latents:4,1,8"
    # both at once: one error naming each
    with pytest.raises(ValueError, match=r"eval\.every=200 .*; logging\.sample_every=300"):
        load_config(None, [*declared, "data.val_shards=''"])


def test_a_string_override_keeps_what_was_written():
    """YAML reads ``key=`` as None and ``off``/``yes`` as bools; for a string field the override means the
    empty string or those words (OmegaConf alone refused the first and made 'False' of the second)."""
    demo = CONFIG_DIR / "demo.yaml"  # it sets data.val_shards and init.from is a string field
    cleared = load_config(demo, ["data.val_shards=", "eval.every=0", "eval.sample_metrics=no", "init.from="])
    assert cleared.data.val_shards == "" and cleared.init.from_ == ""
    off = ["eval.every=0", "eval.sample_metrics=false"]
    assert load_config(demo, ["data.val_shards=null", *off]).data.val_shards == ""
    with pytest.raises(ValueError, match=r"eval\.every=400 .*data\.val_shards is empty"):
        load_config(demo, ["data.val_shards="])
    with pytest.raises(ValueError, match=r"run\.progress='off': expected one of auto, bar, lines"):
        load_config(demo, ["run.progress=off"])
    assert load_config(demo, ["run.progress=lines"]).run.progress == "lines"
    # a field that is not a string is not touched: a bool stays a bool, an empty int is refused by name
    assert load_config(demo, ["eval.sample_metrics=no"]).eval.sample_metrics is False
    assert load_config(demo, ["model.arch.qk_norm=false"]).model.arch.qk_norm == "none"  # the legacy bool
    with pytest.raises(ValueError, match=r"train\.steps"):
        load_config(demo, ["train.steps="])


def test_a_bucket_override_wins_over_the_files_bucket_file():
    cfg = load_config(CONFIG_DIR / "video-1b3.yaml", WAN)
    assert len(cfg.data.buckets.buckets) == 25 and cfg.data.buckets.fps == 16  # wan-256px.json
    one = "data.buckets.buckets=[{frames: 17, height: 256, width: 256, batch_size: 2}]"
    cfg = load_config(CONFIG_DIR / "video-1b3.yaml", [*WAN, one])
    assert [b.name for b in cfg.data.buckets.buckets] == ["17x256x256"] and cfg.data.bucket_file == ""
    # both on the command line: the file, as before
    cfg = load_config(
        CONFIG_DIR / "tiny.yaml", [one, f"data.bucket_file={CONFIG_DIR / 'buckets' / 'pixel-64px.json'}"]
    )
    assert len(cfg.data.buckets.buckets) == 20 and cfg.data.buckets.fps == 8


def test_schedules():
    cos = TrainConfig(steps=100, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cos) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, cos) == pytest.approx(1.0) and lr_factor(55, cos) == pytest.approx(0.55)
    assert lr_factor(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0
    assert lr_factor(89, wsd) == pytest.approx(0.5) and lr_factor(99, wsd) == pytest.approx(0.0)
    const = TrainConfig(steps=100, warmup=0, schedule="constant")
    assert {lr_factor(s, const) for s in range(100)} == {1.0}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.device=gpu", r"run\.device='gpu': expected one of auto, cuda, cpu"),
        ("run.max_bad_steps=0", r"run\.max_bad_steps=0: must be >= 1"),
        ("data.num_workers=-1", r"data\.num_workers=-1: must be >= 0 and <= 1024"),
        ("train.schedule=linear", r"train\.schedule='linear': expected one of cosine, constant, wsd"),
        ("train.ema_decay=1.0", r"train\.ema_decay=1\.0: must be >= 0\.0 and < 1\.0"),
        ("eval.batches=0", r"eval\.batches=0: must be >= 1"),
        ("parallel.zero_stage=4", r"parallel\.zero_stage=4: expected one of 1, 2, 3"),
        ("parallel.engine=megatron", r"parallel\.engine='megatron': expected one of fsdp, deepspeed"),
        ("parallel.tp=0", r"parallel\.tp=0: must be >= 1"),
        ("checkpoint.keep=-1", r"checkpoint\.keep=-1: must be >= 0"),
        ("logging.every=0", r"logging\.every=0: must be >= 1"),
        ("sample.sampler=ddpm", r"sample\.sampler='ddpm': expected one of euler, heun, ddim, dpm\+\+2m"),
        ("init.min_match=2", r"init\.min_match=2\.0: must be >= 0\.0 and <= 1\.0"),
    ],
)
def test_each_section_checks_its_own_fields_and_names_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_a_section_built_in_code_validates_itself_under_the_key_it_is_given():
    """The checks belong to the config classes: a ParallelConfig or TrainConfig made by a benchmark or a
    test is checked without a JobConfig around it, and its errors name the key it is given."""
    from launch.config import TrainConfig
    from parallel.config import ParallelConfig

    ParallelConfig(tp=2, cp=2).validate()
    with pytest.raises(ValueError, match=r"layout\.cp_ring=-1: must be >= 0"):
        ParallelConfig(cp_ring=-1).validate("layout")
    with pytest.raises(ValueError, match=r"parallel\.activation_checkpointing='some'"):
        ParallelConfig(activation_checkpointing="some").validate()
    with pytest.raises(ValueError, match=r"train\.betas\.1=1\.0: must be >= 0\.0 and < 1\.0"):
        TrainConfig(betas=(0.9, 1.0)).validate()


def test_resume_reads_a_legacy_boolean_qk_norm_as_its_kind():
    """A run saved before ``qk_norm`` had kinds wrote ``qk_norm: true``; resuming it with today's
    ``per_head`` (what true means) is no change, while ``false`` against ``per_head`` is one."""
    import yaml

    from launch.config import resume_differences, to_yaml

    cfg = load_config(None, ["model.arch.qk_norm=per_head"])
    saved = yaml.safe_load(to_yaml(cfg))
    for legacy, want in ((True, []), (False, ["model.arch.qk_norm: 'none' → 'per_head'"])):
        saved["model"]["arch"]["qk_norm"] = legacy
        assert resume_differences(saved, cfg) == want


def test_sample_grid_is_checked_and_defaults_to_uniform():
    assert load_config(None).sample.grid == "uniform"
    assert load_config(None, ["sample.grid=diffusers"]).sample.grid == "diffusers"
    with pytest.raises(ValueError, match=r"sample\.grid"):
        load_config(None, ["sample.grid=linear"])


def test_a_required_init_from_is_named_and_set_from_the_command_line(tmp_path):
    """A recipe's ``init.from: ???`` (the source the user must name) is reported as ``init.from`` and
    satisfied by the ``init.from=…`` override (the field is ``from_`` underneath)."""
    path = tmp_path / "ft.yaml"
    path.write_text("init:\n  from: ???\n")
    with pytest.raises(ValueError, match=r"set init\.from \(marked \?\?\? in the file\)"):
        load_config(path)
    assert load_config(path, ["init.from=/models/wan"]).init.from_ == "/models/wan"
