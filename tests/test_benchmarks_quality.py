"""``benchmarks.quality`` on a tiny random-weight export of the demo's architecture (one block): the
tables have one row per configuration, scores in [0, 1], network calls counted per sampler, and the
markdown says what the JSON says. (A random model draws no shapes, so its probe scores are low; the
real numbers come from the trained demo, run by hand.)"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import quality
from data.probe import ATTRIBUTES, parse_caption
from dit.model import build_model
from launch.config import load_config
from launch.export import export_config


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = load_config(None, ["model.arch.depth=1", "sample.steps=2", "sample.cfg=2.0"])
    (out / "config.json").write_text(json.dumps(export_config(cfg, 7, out)))
    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in build_model(cfg.model.arch).state_dict().items()}
    save_file(weights, out / "model.safetensors")
    save_file(weights, out / "ema.safetensors")
    return out, cfg


def _md_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_held_out_prompts_are_moving_captions_of_the_grammar_and_reproducible():
    prompts = quality.held_out_prompts(20)
    assert prompts == quality.held_out_prompts(20) and prompts != quality.held_out_prompts(20, seed=1)
    assert all(parse_caption(p) is not None and parse_caption(p)["direction"] for p in prompts)
    assert len(set(prompts)) > 15  # drawn, not one caption repeated


@pytest.mark.slow  # samples 20 small batches through MiniLM and a DiT: ~half a minute
def test_quality_report_tables_and_json(export, tmp_path):
    src, cfg = export
    out = tmp_path / "quality-test.md"
    args = [str(src), "--samplers", "euler,heun", "--steps", "1,3", "--cfg", "1,3"]
    quality.main([*args, "--prompts", "3", "--batch-size", "2", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    text = out.read_text()

    steps = result["steps_table"]
    assert [(r["sampler"], r["steps"]) for r in steps] == [
        ("euler", 1),
        ("euler", 3),
        ("heun", 1),
        ("heun", 3),
    ]
    assert all(r["cfg"] == cfg.sample.cfg for r in steps)  # the run's own CFG scale
    cfgs = result["cfg_table"]
    assert [r["cfg"] for r in cfgs] == [1.0, 3.0]
    assert all(r["sampler"] == cfg.sample.sampler and r["steps"] == cfg.sample.steps for r in cfgs)
    # network calls per sample: one per Euler step, Heun two per step but one into t = 0; CFG batched
    assert [r["nfe"] for r in steps] == [1, 3, 1, 5]
    assert [r["nfe"] for r in cfgs] == [cfg.sample.steps] * 2
    for r in steps + cfgs:
        for key in (*ATTRIBUTES, "overall", "found"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["s_per_sample"] > 0
    assert result["config"]["step"] == 7 and result["config"]["prompts"] == 3

    # the markdown tables carry the JSON's rows, in order, to 3 decimals
    md_steps = _md_rows(text, "## Quality per step")
    md_cfg = _md_rows(text, "## CFG scale")
    assert len(md_steps) == len(steps) and len(md_cfg) == len(cfgs)
    pairs = [
        (("sampler", "steps", *quality.COLUMNS), md, row) for md, row in zip(md_steps, steps, strict=True)
    ]
    pairs += [(("cfg", *quality.COLUMNS), md, row) for md, row in zip(md_cfg, cfgs, strict=True)]
    for keys, md, row in pairs:
        for key, cell in zip(keys, md, strict=True):
            value = row[key]
            if value is None:
                assert cell == "–"
            elif isinstance(value, float):
                assert float(cell) == pytest.approx(value, abs=5e-4), key
            else:
                assert cell == str(value), key
    assert "samplers of `dit.sampling`: euler, heun" in text and re.search(
        r"command: `python -m benchmarks.quality .*--samplers euler,heun", text
    )


@pytest.mark.parametrize(
    "flag, value, why",
    [
        ("--samplers", "lms", "'lms' is not one of"),
        ("--steps", "four", "--steps 'four': expected a comma-separated list of numbers"),
        ("--steps", "4,x", "--steps '4,x': expected a comma-separated list of numbers"),
        ("--steps", ",,", "--steps ',,': no values"),
        ("--cfg", "nan", "--cfg 'nan': every value must be a finite number"),
        ("--cfg", "1,inf", "--cfg '1,inf': every value must be a finite number"),
        ("--cfg", "-1", "--cfg ≥ 0"),
    ],
)
def test_quality_refuses_bad_flags_as_usage_errors(tmp_path, capsys, flag, value, why):
    """Refused before any model is loaded (the source is an empty folder), exit status 2, nothing written."""
    out = tmp_path / "q.md"
    with pytest.raises(SystemExit) as e:
        quality.main([str(tmp_path), flag, value, "--out", str(out)])
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert not out.exists()


def test_quality_names_a_bad_source_by_its_own_argument(tmp_path, capsys):
    for src, what in [(tmp_path / "nope", "no such file or directory"), (tmp_path, "an empty directory")]:
        with pytest.raises(SystemExit) as e:
            quality.main([str(src), "--out", str(tmp_path / "q.md")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"RUN_OR_EXPORT {src}: {what}" in err, err
        assert "init.from" not in err  # a training config key this command does not have
