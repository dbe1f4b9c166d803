"""``launch.sample``'s command line: the sampler names come from ``dit.sampling``'s one list, every option
reaches the :class:`SampleRequest` that ``generate`` takes, and prompts come from flags and a file."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from dit.config import get_preset
from dit.diffusion import DiffusionConfig, make_objective
from dit.sampling import SAMPLER_NAMES, SAMPLERS, sample
from launch.sample import SampleRequest, build_parser, read_prompts
from tests.dit.helpers import random_model


def test_sampler_names_are_one_list(capsys):
    assert tuple(SAMPLERS) == SAMPLER_NAMES and len(set(SAMPLER_NAMES)) == len(SAMPLER_NAMES) >= 4
    for name in SAMPLER_NAMES:
        a = build_parser().parse_args(["ckpt", "--out", "o.mp4", "--sampler", name])
        assert SampleRequest.from_args(a).sampler == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ckpt", "--out", "o.mp4", "--sampler", "plms"])
    err = capsys.readouterr().err
    assert "plms" in err and all(repr(n) in err for n in SAMPLER_NAMES)
    arch = get_preset("tiny").replace(conditioning="class", num_classes=10, in_channels=4)
    labels = {"labels": torch.tensor([3])}
    with pytest.raises(
        ValueError, match="sampler 'plms': expected one of " + re.escape(", ".join(SAMPLER_NAMES))
    ):
        sample(random_model(arch), make_objective(DiffusionConfig()), (1, 4, 1, 8, 8), labels, sampler="plms")


def test_every_option_reaches_the_request():
    argv = ["run/", "--out", "x.mp4", "--frames", "9", "--height", "32", "--width", "48", "--fps", "12.5"]
    argv += ["--steps", "7", "--sampler", "ddim", "--cfg", "3.5", "--seed", "11", "--batch-size", "2"]
    argv += [
        "--device",
        "cpu",
        "--precision",
        "bf16",
        "--image",
        "f.png",
        "--video",
        "v.mp4",
        "--strength",
        "0.3",
    ]
    req = SampleRequest.from_args(build_parser().parse_args(argv))
    want = dict(out="x.mp4", frames=9, height=32, width=48, fps=12.5, steps=7, sampler="ddim", cfg=3.5)
    want |= dict(seed=11, batch_size=2, device="cpu", precision="bf16", image="f.png", video="v.mp4")
    want |= dict(strength=0.3)
    assert dataclasses.asdict(req) == want
    # unset options stay None, so generate() takes the run's sample.* defaults for them
    req = SampleRequest.from_args(build_parser().parse_args(["run/", "--out", "x.mp4"]))
    assert (req.frames, req.height, req.width, req.fps, req.steps, req.sampler, req.cfg) == (None,) * 7
    assert (req.seed, req.batch_size, req.precision, req.strength) == (0, 4, "auto", 0.6)


def test_prompts_from_flags_then_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  a red ball \n\n\tblue sky\n   \n", encoding="utf-8")
    assert read_prompts(["first", "second"], str(f)) == ["first", "second", "a red ball", "blue sky"]
    assert read_prompts(None, str(f)) == ["a red ball", "blue sky"]
    assert read_prompts(["only"], None) == ["only"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n", encoding="utf-8")
    with pytest.raises(SystemExit, match="--prompt TEXT"):
        read_prompts([], str(blank))


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--steps", "0", "--steps=0: must be >= 1"),
        ("--frames", "0", "--frames=0: must be >= 1"),
        ("--batch-size", "0", "--batch-size=0: must be >= 1"),
        ("--fps", "0", "--fps=0.0: must be > 0.0"),
        ("--cfg", "nan", "--cfg=nan: must be >= 0.0"),
        ("--strength", "2", "--strength=2.0: must be >= 0.0 and <= 1.0"),
    ],
)
def test_sample_options_out_of_range_stop_before_any_weight_is_read(option, value, said, tmp_path):
    """The source does not exist: the option's error comes first, so nothing was loaded."""
    from launch.sample import main

    with pytest.raises(SystemExit, match=re.escape(f"error: {said}")):
        main([str(tmp_path / "no-run"), "--out", str(tmp_path / "s.mp4"), "--prompt", "a", option, value])


def test_a_request_built_in_code_checks_its_precision_too(tmp_path):
    """argparse's choices guard the CLI; a SampleRequest made by other code is checked by itself."""
    with pytest.raises(ValueError, match=r"--precision='fp16': expected one of auto, bf16, fp32"):
        SampleRequest(out=str(tmp_path / "s.mp4"), precision="fp16")
