"""launch.fidelity: FID / FVD / CLIP score through torchmetrics with tiny networks built here.

The feature networks are real TorchScript (and torch.export) files whose features are known in closed
form (the mean colour of a frame or clip), so the Fréchet distances are checked against
||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½) computed with scipy; the CLIP model is a tiny random
transformers CLIPModel saved with ``save_pretrained`` and loaded offline.
"""

from __future__ import annotations

import json
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from launch.fidelity import FidelityConfig, VideoFidelity, clips_for_fvd, frames_for_fid

CPU = torch.device("cpu")


class FrameMeans(torch.nn.Module):
    """The reference Inception's signature; features = each frame's mean colour (exact on flat frames)."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features, "called without return_features=True"
        assert x.dtype == torch.uint8 and x.shape[2] == 299 and x.shape[3] == 299, "not 299×299 uint8"
        return x.float().mean((2, 3))


class ClipMeans(torch.nn.Module):
    """The reference I3D's signature; features = each clip's mean colour in [-1, 1]."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        assert return_features and not rescale and not resize, "wrong I3D keyword arguments"
        assert x.dtype == torch.float32 and x.shape[3] == 224 and x.shape[4] == 224, "not 224×224 float"
        assert bool(x.min() >= -1) and bool(x.max() <= 1), "not in [-1, 1]"
        return x.mean((2, 3, 4))


class PlainMeans(torch.nn.Module):
    """A network without keyword arguments (called with its input only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3))


class Flat(torch.nn.Module):
    """Wrong output: one number per batch, not B×F."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((1, 2, 3))


class Projected(torch.nn.Module):
    """Mean colour through a fixed random projection: a matmul, which autocast would run in bf16."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3)) @ self.w


class Empty(torch.nn.Module):
    """No features: B×0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3))[:, :0]


class NotFinite(torch.nn.Module):
    """NaN features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3)) * float("nan")


class Needs16(torch.nn.Module):
    """A video network with temporal pooling that needs 16 frames (like the reference I3D's minimum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(x, (16, 224, 224)).flatten(1)


def script(module: torch.nn.Module, path: Path) -> str:
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the reference I3D's format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("nets")
    return {"fid": script(FrameMeans(), d / "inception.pt"), "fvd": script(ClipMeans(), d / "i3d.pt")}


def flat_videos(rng: np.random.Generator, n: int, t: int, mean, cov, size=(6, 10)) -> np.ndarray:
    """n×t×H×W×3 uint8 videos whose every frame is one colour drawn from N(mean, cov)."""
    colours = rng.multivariate_normal(mean, cov, size=(n, t)).round().clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours[:, :, None, None, :], (n, t, *size, 3)))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Closed form between the Gaussians fitted to two feature sets (rows are samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


COV = np.array([[300.0, 120.0, 0.0], [120.0, 200.0, -50.0], [0.0, -50.0, 150.0]])


def two_sets(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fake = flat_videos(rng, 24, 3, [110, 130, 90], COV)
    real = flat_videos(rng, 30, 3, [140, 120, 100], 0.5 * COV)
    return fake, real


def test_fid_and_fvd_equal_the_closed_form(nets):
    """Every frame is an image for FID (features per frame), every clip a sample for FVD."""
    fake, real = two_sets()
    m = VideoFidelity(FidelityConfig(fid_features=nets["fid"], fvd_features=nets["fvd"]), CPU)
    m.update(fake[:10], real=real[:7])
    m.update(fake[10:], real=real[7:])
    got = m.compute()
    frames = lambda v: v[:, :, 0, 0].reshape(-1, 3).astype(np.float64)  # noqa: E731 (B*T, 3)
    clips = lambda v: (v[:, :, 0, 0].astype(np.float64) / 255 * 2 - 1).mean(1)  # noqa: E731 (B, 3)
    want_fid, want_fvd = frechet(frames(fake), frames(real)), frechet(clips(fake), clips(real))
    assert want_fid > 100 and want_fvd > 0.01  # the sets differ: the comparison has signal
    assert got["fid"] == pytest.approx(want_fid, rel=1e-5)
    assert got["fvd"] == pytest.approx(want_fvd, rel=1e-4)
    assert set(got) == {"fid", "fvd"}


def test_identical_sets_give_zero_and_reset_forgets(nets):
    fake, real = two_sets(1)
    m = VideoFidelity(FidelityConfig(fid_features=nets["fid"], fvd_features=nets["fvd"]), CPU)
    m.update(fake, real=fake)
    got = m.compute()
    assert abs(got["fid"]) < 1e-3 and abs(got["fvd"]) < 1e-6
    m.reset()
    m.update(fake, real=real)
    assert m.compute()["fid"] > 100


class _Trap:
    """Unpickling it leaves a file behind: the sign that a loader ran pickle on it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_torch_export_file_is_refused_unopened(tmp_path):
    """``torch.export.load`` falls back to full pickle for a .pt2's sample inputs: a .pt2 whose sample
    inputs are a pickle that touches a file is refused without running it, also renamed to .pt (then
    it is no TorchScript archive, and TorchScript's loader does not run Python pickles)."""
    import zipfile

    example = torch.zeros(2, 3, 299, 299, dtype=torch.uint8)
    torch.export.save(torch.export.export(PlainMeans(), (example,)), str(tmp_path / "good.pt2"))
    trap = tmp_path / "trap.pt"
    torch.save(_Trap(str(tmp_path / "PWNED")), trap)
    with zipfile.ZipFile(tmp_path / "good.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("sample_inputs/model.pt"):
                data = trap.read_bytes()
            dst.writestr(item, data)
    for name in ("good.pt2", "evil.pt2"):
        with pytest.raises(ValueError, match=r"fid_features='.*\.pt2': a torch.export \.pt2 is not accepted"):
            VideoFidelity(FidelityConfig(fid_features=str(tmp_path / name)), CPU)
    (tmp_path / "evil.pt2").rename(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"not a TorchScript file"):
        VideoFidelity(FidelityConfig(fid_features=str(tmp_path / "evil.pt")), CPU)
    assert not (tmp_path / "PWNED").exists()


def test_features_run_in_fp32_under_the_callers_autocast(tmp_path):
    """The eval loop may call update() inside bf16 autocast; the networks still run in fp32. CPU autocast
    stands in for CUDA's here (update disables autocast for its device's type); only a GPU run
    confirms the CUDA case."""
    cfg = FidelityConfig(fid_features=script(Projected(), tmp_path / "projected.pt"))
    fake, real = two_sets(3)
    values = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            m = VideoFidelity(cfg, CPU)
            m.update(fake, real=real)
        values.append(m.compute()["fid"])
    assert values[1] == values[0]


def test_building_leaves_the_global_rng_alone(nets):
    """The start-up probe draws from a private generator: the training run's random stream is unchanged."""
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    VideoFidelity(FidelityConfig(fid_features=nets["fid"], fvd_features=nets["fvd"]), CPU)
    assert torch.equal(torch.rand(3), want)


def test_input_conventions():
    """FID frames: 299×299 uint8, a flat frame keeps its value; FVD clips: shorter side to 224 then a
    centre crop, [0, 255] → [-1, 1] (a left/right split survives the crop at the centre)."""
    frames = torch.full((2, 3, 7, 5), 200, dtype=torch.uint8)
    x = frames_for_fid(frames)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.uint8 and bool((x == 200).all())
    clip = torch.zeros(1, 3, 2, 8, 16, dtype=torch.uint8)
    clip[..., 8:] = 255  # right half white
    y = clips_for_fvd(clip)
    assert y.shape == (1, 3, 2, 224, 224) and y.dtype == torch.float32
    assert float(y[..., :50].max()) == -1.0 and float(y[..., -50:].min()) == 1.0


# ---- CLIP --------------------------------------------------------------------------------------------


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, each symbol alone and word-final, plus its two special tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = keep + [256 + i for i in range(256 - len(keep))]
    chars = [chr(c) for c in symbols]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def tiny_clip(d: Path) -> str:
    """A tiny random CLIPModel + CLIPProcessor saved with save_pretrained (safetensors) into ``d``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d.mkdir(parents=True, exist_ok=True)
    vocab = byte_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    start, end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(tiny, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=start, eos_token_id=end)
    text["pad_token_id"] = end
    config = CLIPConfig(
        text_config=text, vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=16
    )
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(d)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(d)
    return str(d)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def direct_clip_score(folder: str, videos: np.ndarray, prompts: list[str]) -> float:
    """100 · max(mean over every frame of cos(image embedding, its prompt's text embedding), 0), from the
    model's own embeddings (torchmetrics' CLIPScore definition, clamped after the mean)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    frames = [torch.from_numpy(f).permute(2, 0, 1) for clip in videos for f in clip]
    texts = [p for p, clip in zip(prompts, videos, strict=True) for _ in clip]
    with torch.no_grad():
        pixels = processor(images=frames, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tok = processor(text=texts, return_tensors="pt", padding=True)
        text = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        text = text.pooler_output
    cos = torch.nn.functional.cosine_similarity(image, text, dim=-1).double()
    return float(max(100 * cos.mean(), 0.0))


def clip_videos(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    videos = rng.integers(0, 256, (3, 2, 20, 28, 3), dtype=np.uint8)
    return videos, ["a red circle moves left", "a blue square on white", "green triangle"]


def test_clip_score_is_the_frame_prompt_mean(clip_dir, offline):
    videos, prompts = clip_videos()
    m = VideoFidelity(FidelityConfig(clip_model=clip_dir), CPU)
    m.update(videos[:1], prompts[:1])
    m.update(videos[1:], prompts[1:])
    got = m.compute()["clip_score"]
    want = direct_clip_score(clip_dir, videos, prompts)
    assert want > 0  # the clamp is not what the comparison sees
    assert got == pytest.approx(want, rel=1e-4)
    # prompts matter: pairing each clip with another clip's prompt changes the score
    m.reset()
    m.update(videos, prompts[1:] + prompts[:1])
    assert m.compute()["clip_score"] != pytest.approx(got, rel=1e-4)


# ---- distributed -------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    shares: tuple[tuple[int, int], tuple[int, int]]
    """(start, stop) of the clips each of the two ranks updates with."""
    cfg: FidelityConfig


def fidelity_inputs() -> tuple[np.ndarray, np.ndarray, list[str]]:
    fake, real = two_sets(4)
    prompts = [f"clip {i} moves {'left' if i % 2 else 'right'}" for i in range(len(fake))]
    return fake, real, prompts


def score(cfg: FidelityConfig, start: int, stop: int) -> dict[str, float]:
    fake, real, prompts = fidelity_inputs()
    m = VideoFidelity(cfg, CPU)
    if stop > start:
        n = len(fake)
        m.update(
            fake[start:stop], prompts[start:stop], real=real[start * len(real) // n : stop * len(real) // n]
        )
    return m.compute()


def run_case(case: Case) -> dict:
    import torch.distributed as dist

    start, stop = case.shares[dist.get_rank()]
    return score(case.cfg, start, stop)


def worker(rank, world, port, cases, out_dir):
    from tests.parallel.group import serve

    serve(rank, world, port, cases, out_dir, run_case)


@pytest.mark.slow
def test_two_ranks_equal_one_process(nets, clip_dir, tmp_path):
    """compute() sums the states over ranks: half the clips each, or all on one rank and none on the
    other, gives the one-process value."""
    from tests.parallel.group import run_group

    cfg = FidelityConfig(fid_features=nets["fid"], fvd_features=nets["fvd"], clip_model=clip_dir)
    n = len(fidelity_inputs()[0])
    cases = [Case("halves", ((0, n // 2), (n // 2, n)), cfg), Case("one_rank_idle", ((0, 0), (0, n)), cfg)]
    results = run_group(2, worker, cases, tmp_path)
    want = score(cfg, 0, n)
    for case in cases:
        got = results[case.name]
        assert "error" not in got, got.get("error")
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-6), case.name
        assert got["fvd"] == pytest.approx(want["fvd"], rel=1e-6), case.name
        assert got["clip_score"] == pytest.approx(want["clip_score"], rel=1e-5), case.name


# ---- errors ------------------------------------------------------------------------------------------


def test_bad_feature_files_name_the_key_and_path(tmp_path):
    missing = str(tmp_path / "none.pt")
    with pytest.raises(ValueError, match=rf"eval\.fid_features='{missing}': no such file"):
        VideoFidelity(FidelityConfig(fid_features=missing), CPU)
    state = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, state)
    with pytest.raises(ValueError, match=rf"eval\.fvd_features='{state}': not a TorchScript file"):
        VideoFidelity(FidelityConfig(fvd_features=str(state)), CPU)
    weights = tmp_path / "i3d.safetensors"
    weights.write_bytes(b"{}")
    with pytest.raises(
        ValueError, match=rf"eval\.fvd_features='{weights}': a \.safetensors file holds weights"
    ):
        VideoFidelity(FidelityConfig(fvd_features=str(weights)), CPU)


def test_wrong_output_and_failing_network_are_reported(nets, tmp_path):
    flat = script(Flat(), tmp_path / "flat.pt")
    with pytest.raises(
        ValueError, match=r"eval\.fid_features='.*flat\.pt': .*returned a 2 tensor; expected a 2×F"
    ):
        VideoFidelity(FidelityConfig(fid_features=flat), CPU)
    # the I3D-like net asserts 224×224 clips; given as the FID net it sees 299×299 frames and fails
    with pytest.raises(
        ValueError, match=r"eval\.fid_features='.*i3d\.pt': the network failed on a 2×3×299×299"
    ):
        VideoFidelity(FidelityConfig(fid_features=nets["fvd"]), CPU)
    # no features at all, or NaN: refused at start-up, not scored as a perfect 0
    for bad, said in ((Empty(), "returned a 2×0 tensor"), (NotFinite(), "non-finite features")):
        path = script(bad, tmp_path / f"{type(bad).__name__}.pt")
        with pytest.raises(ValueError, match=rf"eval\.fid_features='.*{type(bad).__name__}\.pt': .*{said}"):
            VideoFidelity(FidelityConfig(fid_features=path), CPU)
    # tried on clips of the length the run scores: a net that needs 16 frames fails at start-up for 8
    with pytest.raises(ValueError, match=r"needs16\.pt': the network failed on a 2×3×8×224×224 .*too short"):
        VideoFidelity(
            FidelityConfig(fvd_features=script(Needs16(), tmp_path / "needs16.pt")), CPU, clip=(8, 4, 4)
        )
    # a video net that needs 16 frames fails on 8-frame clips at update, and the error says why
    m = VideoFidelity(FidelityConfig(fvd_features=script(Needs16(), tmp_path / "needs16.pt")), CPU)
    with pytest.raises(ValueError, match=r"needs16\.pt': the network failed on a 1×3×8×224×224 .*too short"):
        m.update(np.zeros((1, 8, 4, 4, 3), np.uint8))


def test_bad_clip_folders(tmp_path, clip_dir):
    with pytest.raises(ValueError, match=r"eval\.clip_model='.*nowhere': no such folder"):
        VideoFidelity(FidelityConfig(clip_model=str(tmp_path / "nowhere")), CPU)
    with pytest.raises(ValueError, match=r"not a transformers CLIP folder \(no config\.json\)"):
        VideoFidelity(FidelityConfig(clip_model=str(tmp_path)), CPU)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ValueError,
        match=r"eval\.clip_model='.*bert': not a transformers CLIP folder "
        r"\(config\.json model_type 'bert', expected 'clip'\)",
    ):
        VideoFidelity(FidelityConfig(clip_model=str(bert)), CPU)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text(Path(clip_dir, "config.json").read_text())
    with pytest.raises(ValueError, match=r"eval\.clip_model='.*config_only': cannot load the CLIP model"):
        VideoFidelity(FidelityConfig(clip_model=str(config_only)), CPU)


def test_bad_updates_and_too_few_samples(nets, clip_dir):
    m = VideoFidelity(FidelityConfig(fid_features=nets["fid"], clip_model=clip_dir), CPU)
    videos, prompts = clip_videos()
    with pytest.raises(ValueError, match="B×T×H×W×3 uint8"):
        m.update(videos.astype(np.float32), prompts)
    with pytest.raises(ValueError, match="one prompt per clip"):
        m.update(videos, prompts[:2])
    m.update(videos, prompts)  # no real clips: FID cannot be computed
    with pytest.raises(ValueError, match="fid real 0"):
        m.compute()


def test_config_validate_and_enabled(tmp_path, nets):
    assert not FidelityConfig().enabled() and FidelityConfig(fid_features=nets["fid"]).enabled()
    FidelityConfig(fid_features=nets["fid"], clip_model=str(tmp_path)).validate()
    with pytest.raises(ValueError, match=r"eval\.fvd_features='/nope\.pt': no such file"):
        FidelityConfig(fvd_features="/nope.pt").validate()
    with pytest.raises(ValueError, match=r"eval\.clip_model='/nope': no such folder"):
        FidelityConfig(clip_model="/nope").validate()
