"""The Wan fine-tune recipes (``launch/configs/wan2.1-t2v-1.3b-finetune.yaml``,
``wan2.2-ti2v-5b-i2v.yaml``): they load with the published shapes and Wan's settings, their dry run
passes on tiny local stand-ins of a diffusers pipeline root (transformer, VAE, UMT5 encoder and its
tokenizer, all random weights saved here), and the TI2V recipe trains Wan2.2's image-to-video input.

The published values the recipes are checked against: WanPipeline's scheduler for Wan2.1-T2V-1.3B is
UniPC with ``flow_shift`` 3.0 (480p); Wan2.2-TI2V-5B's ``sample_shift`` is 5.0, at 24 fps; both guide at
5.0; the Wan2.1 VAE compresses 4×8×8 into 16 channels, the Wan2.2 VAE 4×16×16 (2×2 patchify before
three downsamplings) into 48, both causally (1 + 4k frames). What only a GPU run can confirm: the
memory plans the dry run prints for the published shapes.
"""

import json

import pytest
import torch

from data.batch import Batch
from data.buckets import Bucket, Compression, check_bucket
from dit.config import PRESETS
from dit.diffusion import make_objective
from dit.model import SpacetimeDiT, num_params
from launch import interop
from launch.batches import Conditioner
from launch.config import CONFIG_DIR, load_config
from launch.export import load_model
from launch.train import main
from tests.launch.diffusers_models import build_wan, perturb_, write_wan_index

RECIPES = {
    "wan2.1-t2v-1.3b-finetune": dict(preset="wan2.1-t2v-1.3b", vae=Compression(4, 8), shift=3.0, fps=16),
    "wan2.2-ti2v-5b-i2v": dict(preset="wan2.2-ti2v-5b", vae=Compression(4, 16), shift=5.0, fps=24),
}
# the keys marked ??? in the recipes, with the values a user gives
PATHS = ("init.from", "data.shards", "data.val_shards", "data.codec", "data.text_encoder")
TEXT_DIM = 24  # the tiny Wan's text_dim (tests/launch/diffusers_models.py)


def _path(name: str):
    return CONFIG_DIR / f"{name}.yaml"


def _placeholders() -> list[str]:
    return [f"{k}=/placeholder/{k.split('.')[1]}" for k in PATHS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _vae(recipe: str):
    """A tiny random ``AutoencoderKLWan`` with the published VAE's compression and channels."""
    from diffusers import AutoencoderKLWan

    # three downsamplings, two of them in time: 4×8×8 (with Wan2.2's 2×2 patchify, 4×16×16)
    common = dict(
        base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(0)
    if recipe.startswith("wan2.1"):
        return AutoencoderKLWan(z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4, **common)
    # Wan2.2's: a 2×2 patchify (12 input channels) and residual down/up blocks, 48 latent channels
    return AutoencoderKLWan(
        z_dim=48,
        decoder_base_dim=8,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.1] * 48,
        latents_std=[0.5] * 48,
        **common,
    )


def _pipeline_root(tmp, recipe: str):
    """A diffusers Wan pipeline root as downloaded, in miniature: model_index.json, transformer/ (tiny
    random Wan; 48 channels for TI2V), vae/, text_encoder/ (UMT5) and tokenizer/ beside it."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from data.encoders import minilm_path

    ti2v = recipe.startswith("wan2.2")
    root = tmp / recipe
    channels = {"in_channels": 48, "out_channels": 48} if ti2v else {}
    build_wan("ti2v" if ti2v else "t2v", seed=1, **channels).save_pretrained(root / "transformer")
    _vae(recipe).save_pretrained(root / "vae")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    torch.manual_seed(0)
    perturb_(UMT5EncoderModel(config), seed=2).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    write_wan_index(root, expand_timesteps=ti2v)
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan-roots")
    return {name: _pipeline_root(tmp, name) for name in RECIPES}


def _stand_in(root, tmp_path) -> list[str]:
    """The recipe's overrides for a downloaded root (``root``), with the architecture from it."""
    return [
        f"init.from={root}",
        "model.preset=from_init",  # the tiny shapes are not the published ones
        f"data.codec={root / 'vae'}",
        f"data.text_encoder={root / 'text_encoder'}",
        f"data.shards={tmp_path}",
        f"data.val_shards={tmp_path}",
        f"run.dir={tmp_path / 'run'}",
    ]


def _dry_run(capsys, recipe: str, overrides: list[str]) -> tuple[int, dict, str]:
    """``python -m launch.train --config RECIPE --dry-run --world-size 8`` in this process."""
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(_path(recipe)), "--dry-run", "--world-size", "8", *overrides])
    out, err = capsys.readouterr()
    return stop.value.code, json.loads(out), err


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_loads_with_the_published_shapes_and_wan_settings(recipe):
    want = RECIPES[recipe]
    cfg = load_config(_path(recipe), _placeholders())
    arch = cfg.model.arch
    assert cfg.model.preset == want["preset"] and arch == PRESETS[want["preset"]]  # no arch edits
    # Wan's text convention, and the caption length from the preset's text_len
    assert (arch.text_mask, arch.text_null, arch.text_len) == (False, "empty_prompt", 512)
    assert cfg.data.max_text_len == 512
    assert (cfg.diffusion.objective, cfg.diffusion.shift) == ("flow", want["shift"])
    s = cfg.sample
    assert (s.sampler, s.grid, s.cfg, s.fps) == ("unipc", "diffusers", 5.0, want["fps"])
    assert cfg.data.buckets.fps == want["fps"] and cfg.data.buckets.buckets
    assert cfg.run.precision == "bf16" and cfg.parallel.engine == "fsdp" and cfg.parallel.dp_shard == -1
    assert cfg.train.lr <= 2e-5 and cfg.init.from_ == "/placeholder/from"  # required: the user names it
    # every bucket, and the sample size, is a whole clip of the published VAE and the model's patch
    sample = Bucket(s.frames, s.height, s.width, 1)
    for b in [*cfg.data.buckets.buckets, sample]:
        assert check_bucket(b, want["vae"], arch.patch_size) == [], b
    # the paths a user must give are required (a forgotten one is an error naming it)
    with pytest.raises(
        ValueError, match="set data.codec, data.shards, data.text_encoder, data.val_shards, init.from "
    ):
        load_config(_path(recipe))


def test_ti2v_recipe_is_image_to_video_by_the_first_latent_frame():
    cfg = load_config(_path("wan2.2-ti2v-5b-i2v"), _placeholders())
    assert cfg.model.arch.cond_channels == 0 and cfg.model.arch.in_channels == 48  # no image channels
    train = cfg.train
    assert (train.task_i2v, train.task_t2v, train.task_continuation) == (1.0, 0.0, 0.0)
    # a clip of one latent frame has nothing after its image: every bucket has more
    assert all(Compression(4, 16).latent_frames(b.frames) > 1 for b in cfg.data.buckets.buckets)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_dry_run_passes_on_tiny_stand_ins(recipe, roots, tmp_path, capsys):
    root = roots[recipe]
    overrides = _stand_in(root, tmp_path)
    code, report, err = _dry_run(capsys, recipe, overrides)
    assert code == 0 and report["ok"] and report["errors"] == [], err
    # the architecture and the text convention come from the source, not the published preset
    source, _ = interop.to_ours(interop.read_diffusers(root))
    cfg = load_config(_path(recipe), overrides)
    assert cfg.model.arch == source and source.in_channels == (48 if "ti2v" in recipe else 4)
    assert (source.text_mask, source.text_null, source.text_len) == (False, "empty_prompt", 512)
    assert cfg.data.max_text_len == 512
    with torch.device("meta"):
        assert report["params"] == num_params(SpacetimeDiT(source))
    assert report["preset"] == "from_init" and report["params"] < num_params(SpacetimeDiT(PRESETS["tiny"]))
    # the recipe's buckets, each a whole causal clip of 1 + 4k frames with its tokens counted
    want = load_config(_path(recipe), _placeholders()).data.buckets.buckets
    assert [b["name"] for b in report["buckets"]] == [b.name for b in want]
    for b in report["buckets"]:
        assert b["latent"]["t"] == 1 + (b["frames"] - 1) // 4 and b["ok"] and b["tokens"] > 0
    assert report["codec"]["temporal"] == 4 and report["codec"]["causal"] is True
    assert report["layout"]["dp_shard"] == 8 and report["plan"] is not None
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["wan2.1-t2v-1.3b-finetune", "wan2.2-ti2v-5b-i2v"])
def test_dry_run_codec_geometry_is_what_the_vae_does(recipe, roots, tmp_path, capsys):
    """The compression the dry run reports (and buckets, tokens and the memory plan follow) equals what
    the stand-in VAE does to a real clip: 9 frames of 64×64 pixels."""
    from diffusers import AutoencoderKLWan

    root = roots[recipe]
    code, report, err = _dry_run(capsys, recipe, _stand_in(root, tmp_path))
    assert code == 0, err
    vae = AutoencoderKLWan.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 9, 64, 64)).latent_dist.mode()
    assert z.shape[1:3] == (48 if "ti2v" in recipe else 4, 3)  # channels; 1 + 8/4 frames
    spatial = 64 // z.shape[-1]
    assert spatial == RECIPES[recipe]["vae"].spatial
    assert report["codec"]["spatial"] == spatial
    for b in report["buckets"]:
        assert (b["latent"]["h"], b["latent"]["w"]) == (b["height"] // spatial, b["width"] // spatial)


def test_ti2v_recipe_trains_wan22_image_to_video_input(roots, tmp_path):
    """What the trainer feeds the network under the TI2V recipe is what Wan2.2's pipeline
    (``expand_timesteps``) feeds it: the image's latent as latent frame 0, t = 0 on that frame's tokens and
    the sampled t on the rest. Through the real Conditioner (the stand-in VAE encodes the clip, UMT5 the
    captions) and the objective's loss, compared with diffusers' ``WanTransformer3DModel`` on the
    pipeline's inputs; frame 0 counts nowhere in the loss."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = roots["wan2.2-ti2v-5b-i2v"]
    cfg = load_config(_path("wan2.2-ti2v-5b-i2v"), _stand_in(root, tmp_path))
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 9, 64, 64, generator=gen) * 2 - 1  # B, 3, F, H, W in [-1, 1]
    batch = Batch("9x64x64", ["a", "b"], ["a red ball", "a blue cube"], torch.full((2,), 24.0), video=video)
    prep = Conditioner(cfg, torch.device("cpu"))(batch, gen)
    x0 = prep.x0  # 2, 48, 3, 4, 4
    assert prep.cond_frames.tolist() == [[True, False, False]] * 2 and "cond" not in prep.kwargs
    assert prep.loss_frames.tolist() == [2, 2]
    # the pipeline encodes the image alone: the causal VAE gives the clip's first latent frame
    vae = AutoencoderKLWan.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        image = vae.encode(video[:, :, :1]).latent_dist.mode()
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    image = (image - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    assert _rel(x0[:, :, :1], image) <= 1e-5

    seen = {}
    model = load_model(root)

    def network(x_t, net_t, **kwargs):  # the imported model, its inputs kept for the comparison
        seen.update(x_t=x_t, net_t=net_t, context=kwargs["context"])
        seen["out"] = model(x_t, net_t, **kwargs)
        return seen["out"]

    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0.7, 0.3])
    objective = make_objective(cfg.diffusion)
    with torch.no_grad():
        loss = objective.loss(network, x0, prep.kwargs, cond_frames=prep.cond_frames, noise=noise, t=t)
    assert torch.equal(seen["net_t"], torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]]))
    assert torch.equal(loss.per_frame[:, 0], torch.zeros(2)) and (loss.per_frame[:, 1:] > 0).all()

    # WanImageToVideoPipeline with expand_timesteps: a 0/1 mask over latent frames, per-token timesteps
    b, _, f, h, w = x0.shape
    mask = torch.ones(1, 1, f, h, w)
    mask[:, :, 0] = 0
    latents = (1 - t.view(b, 1, 1, 1, 1)) * x0 + t.view(b, 1, 1, 1, 1) * noise  # the state at t
    latent_model_input = (1 - mask) * x0[:, :, :1] + mask * latents
    timestep = torch.stack([(mask[0][0][:, ::2, ::2] * 1000 * ti).flatten() for ti in t])  # B, tokens
    assert torch.equal(seen["x_t"], latent_model_input)
    ref = WanTransformer3DModel.from_pretrained(root / "transformer").eval()
    with torch.no_grad():
        want = ref(latent_model_input, timestep, seen["context"], return_dict=False)[0]
    assert _rel(seen["out"], want) <= 1e-5
