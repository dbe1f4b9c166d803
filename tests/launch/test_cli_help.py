"""``python -m launch.train --help`` lists the schema's keys; ``--print-config`` prints the resolved YAML;
an override the shell split (``train.steps 10``) or expanded (an unquoted glob or brace pattern) is an
error that says what happened and what to type."""

import dataclasses
import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

from launch.config import CONFIG_DIR, JobConfig, load_config, to_yaml
from launch.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("deepspeed", "megatron", "diffusers")


def schema_leaves(obj, prefix=""):
    """Every leaf key and its default, walked here from the dataclasses (not from the help module)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + ("from" if f.name == "from_" else f.name)
        if dataclasses.is_dataclass(value):
            yield from schema_leaves(value, key + ".")
        else:
            yield key, value


def fails(argv, capsys) -> str:
    """Run the trainer's CLI in-process; it must exit 2 with one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_help_lists_every_key_of_the_schema_with_type_default_and_docstring():
    env = {**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-X", "importtime", "-m", "launch.train", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: python -m launch.train") and "--print-config" in out
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  ([\w.]+) \(.*$", out, re.M)}
    leaves = dict(schema_leaves(JobConfig()))
    assert len(leaves) > 150
    assert sorted(set(leaves) - set(lines)) == []  # every leaf, by the name users write (init.from)
    for key in leaves:  # each with a type, the schema's default and a docstring (inherited ones too)
        assert re.match(rf"  {re.escape(key)} \(.+, default .+\): \S", lines[key]), lines[key]
    assert "  train.steps (int, default 1000): Optimizer steps to train for (the run ends here)." in out
    assert "  train.betas (tuple[float, float], default [0.9, 0.999]): AdamW betas." in out
    assert "  data.shards (str, default ''): A directory (`{prefix}-*.tar` inside it), a glob, or" in out
    assert "  finetune.lora.rank (int, default 0): The adapters' rank r (0: no LoRA" in out
    assert "  model.arch.depth (int, default 12): Number of transformer blocks." in out
    assert "\nfinetune.lora: LoRA adapters through peft on a frozen base" in out
    assert "--print-config shows the values a run would use" in out  # the defaults are the schema's
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)", proc.stderr, re.M)
    assert "launch.config_help" in imported and not [m for m in imported if m.split(".")[0] in HEAVY]


def test_help_for_a_group_or_key_prints_it_whole_and_a_wrong_one_is_named(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    full = capsys.readouterr().out
    cache = next(line for line in full.splitlines() if line.startswith("  data.text_cache ("))
    assert cache.endswith("…") and "It pays only when captions repeat" not in cache  # the first sentence

    with pytest.raises(SystemExit) as exit_:
        main(["--help", "data.text_cache"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "It pays only when captions repeat" in out and "data.shards (" not in out

    with pytest.raises(SystemExit) as exit_:
        main(["train.steps=5", "--help", "train"])  # after an override, too
    out = capsys.readouterr().out
    keys = re.findall(r"^  ([\w.]+) \(", out, re.M)
    assert exit_.value.code == 0 and "train.steps" in keys and all(k.startswith("train.") for k in keys)

    err = fails(["--help", "trian"], capsys)
    assert "--help trian: no config key or group 'trian'; did you mean train?" in err


def test_print_config_prints_what_the_run_would_save_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(CONFIG_DIR / "tiny.yaml")
    overrides = ["train.steps=7", "model.arch.depth=3", "train.lr=3e-4"]
    main(["--config", config, *overrides, "--print-config"])
    out = capsys.readouterr().out
    assert out == to_yaml(load_config(config, overrides))  # the text save_config writes to config.yaml
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7 and printed["model"]["arch"]["depth"] == 3
    assert printed["train"]["lr"] == 3e-4
    assert "from" in printed["init"] and "from_" not in printed["init"]
    assert list(tmp_path.iterdir()) == []  # run.dir (runs/tiny, relative) was not created

    err = fails(["--print-config", "train.steps=0"], capsys)
    assert err == "config error: train.steps=0: must be >= 1"
    err = fails(["--print-config", "train.stepz=3"], capsys)  # OmegaConf's own suggestion, on one line
    assert "train.stepz" in err and "Did you mean: 'steps'?" in err
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exit_:
        main(["--print-config", "--dry-run"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train.steps", "10"], "did you mean train.steps=10? (no spaces around '=')"),
        (["run.device=cpu", "train.steps", "--print-config", "10"], "did you mean train.steps=10?"),
        (["trian.steps", "10"], "override 'trian.steps': expected key=value; did you mean train.steps=10?"),
        (["train.steps", "=", "10"], "did you mean train.steps=10?"),
        (["train.steps=", "10"], "did you mean train.steps=10? (no space after '=')"),
        (["init.from", "runs/a b"], "did you mean 'init.from=runs/a b'?"),
        (["train.steps"], "override 'train.steps': expected key=value, and no value follows: write "),
        (["train.steps", "train.lr=1e-3"], "no value follows: write train.steps=VALUE"),
        # a word that is no key and no file: the plain message, no hint about globs or keys
        (["frobnicate"], "override 'frobnicate': expected key=value (e.g. train.steps=100)"),
        (["tiny.yaml"], "a config file goes after --config"),
        (["data.shards=*.tar"], "quote it inside the shell's quotes: 'data.shards=\"*.tar\"'"),  # YAML
    ],
)
def test_an_override_split_by_a_space_says_what_was_meant(argv, says, capsys):
    err = fails(argv, capsys)
    assert says in err, err
    assert "glob" not in err or "*.tar" in argv[0]


def shell(words: str, cwd) -> list[str]:
    """The words bash passes to a program for this unquoted command-line text."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {words}"], capture_output=True, text=True, cwd=cwd)
    return out.stdout.splitlines()


@pytest.fixture
def shard_files(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    for i in range(4):
        (tmp_path / "shards" / f"{i:03d}.tar").write_bytes(b"")
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")
    monkeypatch.chdir(tmp_path)
    return sorted(glob.glob("shards/*.tar"))


def suggested(err: str, key: str) -> str:
    """The pattern in the hint's quoted ``'key=PATTERN'``."""
    return re.search(rf"'{re.escape(key)}=([^']+)'", err).group(1)


def test_a_brace_pattern_the_shell_expanded_into_many_overrides_is_named(shard_files, capsys):
    argv = shell("data.shards=shards/{000..003}.tar train.steps=3", ".")
    assert argv[:2] == ["data.shards=shards/000.tar", "data.shards=shards/001.tar"]  # what bash did
    err = fails(argv, capsys)
    assert "data.shards is set 4 times in a row" in err and "unquoted brace or glob pattern" in err
    assert sorted(glob.glob(suggested(err, "data.shards"))) == shard_files  # the advice works


def test_a_glob_the_shell_expanded_into_file_names_is_named(shard_files, capsys):
    argv = shell("train.steps=3 data.shards shards/*.tar", ".")  # the space: a glob of its own
    assert argv[2:] == shard_files
    err = fails(argv, capsys)
    assert "override 'data.shards' is followed by 4 file names; did you mean" in err
    assert sorted(glob.glob(suggested(err, "data.shards"))) == shard_files

    argv = ["data.shards=shards/000.tar", *shard_files[1:], "train.steps=3"]  # names after a key=
    err = fails(argv, capsys)
    assert "have no '=': they look like file names the shell expanded from an unquoted glob" in err
    assert sorted(glob.glob(suggested(err, "data.shards"))) == shard_files


def test_repeated_keys_and_unrelated_files_are_not_taken_for_an_expanded_pattern(shard_files, capsys):
    # the last of two settings wins, as OmegaConf merges them, when they are not one pattern's names
    assert load_config(None, ["train.steps=10", "train.steps=20"]).train.steps == 20
    cfg = load_config(None, ["data.shards=shards/000.tar", "data.shards=other/run.yaml"])
    assert cfg.data.shards == "other/run.yaml"
    err = fails(["run.dir=/tmp/r", "shards/notes.txt"], capsys)
    assert "expanded" not in err and "it looks like a file name" in err


def test_what_a_hint_suggests_loads_when_typed(shard_files, capsys):
    """A hint is only useful if its suggestion works: each one is typed back (found by review)."""
    # a list key: the caption goes in [...]
    err = fails(["sample.prompts", "a", "cat"], capsys)
    typed = "sample.prompts=" + suggested(err, "sample.prompts")
    assert load_config(None, [typed]).sample.prompts == ["a cat"]
    # a glob starting with * is quoted for YAML too (a bare * is an alias)
    for name in ("cat.tar", "dog.tar"):
        open(name, "wb").close()  # in the fixture's directory
    err = fails(["data.shards", "cat.tar", "dog.tar"], capsys)
    typed = "data.shards=" + suggested(err, "data.shards")
    assert load_config(None, [typed]).data.shards == "*.tar"


def test_a_key_set_twice_to_two_directories_is_not_a_pattern(shard_files):
    """`cmd run.dir=X "$@"` with run.dir=Y in "$@": the last wins (the values are not existing files)."""
    assert load_config(None, ["run.dir=runs/base", "run.dir=runs/exp2"]).run.dir == "runs/exp2"
    assert load_config(None, ["init.from=exports/a", "init.from=exports/b"]).init.from_ == "exports/b"


def test_an_item_override_that_cannot_merge_is_one_line(capsys):
    err = fails(["sample.prompts.0=a cat"], capsys)
    assert "do not merge" in err
