import json
import subprocess
import sys

import pytest
import torch

from data.encoders import DiffusersVAE, PixelCodec, TextEncoder, build_codec, codec_geometry

diffusers = pytest.importorskip("diffusers")


def tiny_vaes():
    """Random-weight, few-channel versions of the three supported VAEs (built here, never downloaded)."""
    return {
        "wan": (
            diffusers.AutoencoderKLWan(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2],
                num_res_blocks=1,
                temperal_downsample=[True],
                latents_mean=[0.1, 0.2, 0.3, 0.4],
                latents_std=[1.0, 2.0, 3.0, 4.0],
            ),
            (2, 2),
        ),
        "cogvideox": (
            diffusers.AutoencoderKLCogVideoX(
                down_block_types=("CogVideoXDownBlock3D",) * 2,
                up_block_types=("CogVideoXUpBlock3D",) * 2,
                block_out_channels=(8, 16),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=4,
                temporal_compression_ratio=2,
                scaling_factor=0.7,
            ),
            (2, 2),
        ),
        "hunyuan": (
            diffusers.AutoencoderKLHunyuanVideo(
                down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                up_block_types=("HunyuanVideoUpBlock3D",) * 3,
                block_out_channels=(8, 8, 16),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=4,
                spatial_compression_ratio=4,
                temporal_compression_ratio=4,
                scaling_factor=0.5,
            ),
            (4, 4),
        ),
    }


def test_pixel_codec_round_trips_exactly():
    codec = build_codec("pixel:2,4")
    video = torch.rand(2, 3, 4, 16, 24) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 48 * 2, 2, 4, 6) and codec.latent_channels == 96
    assert torch.equal(codec.decode(z), video)
    assert isinstance(build_codec("pixel"), PixelCodec)


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan"])
def test_diffusers_vaes_load_locally_with_their_normalisation(name, tmp_path):
    torch.manual_seed(0)
    vae, (temporal, spatial) = tiny_vaes()[name]
    vae.save_pretrained(tmp_path)
    enc = DiffusersVAE(tmp_path)
    assert (enc.compression.temporal, enc.compression.spatial) == (temporal, spatial)
    # what the loader holds latent shards to, from config.json alone: the loaded VAE's own geometry
    assert codec_geometry(str(tmp_path)) == (enc.compression, enc.latent_channels)
    video = torch.rand(1, 3, 1 + 2 * temporal, 16, 16) * 2 - 1
    z = enc.encode(video)
    assert z.shape == (1, 4, 3, 16 // spatial, 16 // spatial)
    assert z.shape[2] == enc.compression.latent_frames(video.shape[2])
    raw = vae.encode(video).latent_dist.mode()
    expected = (
        (raw - torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, -1, 1, 1, 1))
        / torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, -1, 1, 1, 1)
        if name == "wan"
        else raw * vae.config.scaling_factor
    )
    assert torch.allclose(z, expected, atol=1e-5)
    assert enc.decode(z).shape == video.shape


def test_unknown_vae_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "os.system"}))
    with pytest.raises(ValueError, match="is not one of"):
        DiffusersVAE(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersVAE(tmp_path / "missing")


def test_default_text_encoder_is_the_packaged_minilm():
    enc = TextEncoder(max_length=12)
    emb, mask = enc(["a red circle moves from left to right on a blue background", "a red circle", ""])
    assert emb.shape == (3, 12, 384) and enc.dim == 384 and mask.dtype == torch.bool
    assert mask.sum(1).tolist()[0] == 12 and 2 <= mask.sum(1).tolist()[2] < mask.sum(1).tolist()[1]
    assert torch.count_nonzero(emb[~mask]) == 0  # padded positions are zero
    again, _ = enc(["a red circle moves from left to right on a blue background"])
    assert torch.allclose(again[0], emb[0], atol=1e-5)


def _tiny_t5(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moves", "on", "background"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, is_encoder_decoder=True
    )
    T5EncoderModel(cfg).save_pretrained(path)


def test_t5_encoder_from_a_local_folder(tmp_path):
    _tiny_t5(tmp_path)
    enc = TextEncoder(tmp_path, max_length=8)
    emb, mask = enc(["a red circle", "a blue square moves on a red background"])
    assert emb.shape == (2, 8, 16) and enc.dim == 16 and mask.sum(1).tolist() == [3, 8]


def test_text_encoder_of_a_pipeline_root_finds_its_sibling_tokenizer(tmp_path):
    """A diffusers pipeline root keeps the tokenizer in ``tokenizer/`` beside ``text_encoder/`` (Wan,
    LTX): naming the encoder folder is enough, and it tokenizes as the tokenizer in one folder does."""
    one = tmp_path / "one"
    _tiny_t5(one)
    root = tmp_path / "root"
    (root / "tokenizer").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    for f in one.iterdir():
        model_file = f.name in ("config.json", "model.safetensors")
        f.rename(root / ("text_encoder" if model_file else "tokenizer") / f.name)
    (root / "tokenizer").rename(root / "elsewhere")
    # without it transformers would build an untrained default tokenizer: an error naming the folder
    with pytest.raises(FileNotFoundError, match=rf"{root / 'text_encoder'}: no tokenizer files"):
        TextEncoder(root / "text_encoder", max_length=8)
    (root / "elsewhere").rename(root / "tokenizer")
    enc = TextEncoder(root / "text_encoder", max_length=8)
    _, mask = enc(["a red circle", "a blue square moves on a red background"])
    assert mask.sum(1).tolist() == [3, 8]


@pytest.mark.slow
def test_encode_cli_under_torchrun_writes_latent_shards_the_loader_reads(tmp_path):
    from data.buckets import load_bucket_file
    from data.pipeline import DataConfig, build_loader
    from data.synthetic import generate

    generate(tmp_path / "raw", num=16, seed=0, samples_per_shard=4)
    (tmp_path / "b.json").write_text(
        json.dumps({"fps": 8, "buckets": [[1, 32, 32, 1], [2, 32, 32, 1], [4, 32, 32, 1]]})
    )
    _tiny_t5(tmp_path / "t5")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "data.encode",
        str(tmp_path / "raw"),
        str(tmp_path / "lat"),
        "--buckets",
        str(tmp_path / "b.json"),
        "--text-encoder",
        str(tmp_path / "t5"),
        "--max-text-len",
        "8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert index["samples"] == 16 and {r["rank"] for r in index["ranks"]} == {0, 1}
    assert all(r["written"] > 0 for r in index["ranks"])  # both ranks did work
    loader = build_loader(
        DataConfig(
            shards=str(tmp_path / "lat"), buckets=load_bucket_file(str(tmp_path / "b.json")), num_workers=0
        )
    )
    batch = next(iter(loader))
    frames = int(batch.bucket.split("x")[0])
    assert batch.latent.shape == (1, 48, frames, 8, 8) and batch.text_emb.shape == (1, 8, 16)
    assert batch.text_mask.dtype == torch.bool and batch.text[0]


def test_an_unmasked_encoder_gives_ltx_pipelines_states(tmp_path):
    """``encoder_mask=False`` (``model.arch.text_encoder_mask``, LTX-Video) runs T5 on the padded ids
    without an attention mask, as ``LTXPipeline._get_t5_prompt_embeds`` does (its own code is the
    reference here): the padding changes a short caption's states; the mask returned is the padding's."""
    from types import SimpleNamespace

    from diffusers import LTXPipeline

    _tiny_t5(tmp_path)
    masked, unmasked = TextEncoder(tmp_path, 8), TextEncoder(tmp_path, 8, encoder_mask=False)
    captions = ["a red circle", "a blue square moves on a red background"]
    pipe = SimpleNamespace(tokenizer=unmasked.tokenizer, text_encoder=unmasked.model, _execution_device="cpu")
    ref, ref_mask = LTXPipeline._get_t5_prompt_embeds(pipe, captions, max_sequence_length=8, device="cpu")
    emb, mask = unmasked(captions)
    assert torch.equal(mask, ref_mask) and mask.sum(1).tolist() == [3, 8]
    assert torch.allclose(emb[mask], ref[mask], atol=1e-6, rtol=0) and torch.count_nonzero(emb[~mask]) == 0
    with_mask, _ = masked(captions)
    assert torch.allclose(with_mask[1], emb[1], atol=1e-6, rtol=0)  # no padding: the same states
    assert not torch.allclose(with_mask[0, :3], emb[0, :3], atol=1e-3)  # padded: T5 attended it


def test_encode_cli_without_the_encoder_mask_stores_unmasked_states(tmp_path):
    """``data.encode --no-text-encoder-mask`` writes the states :class:`TextEncoder` gives with
    ``encoder_mask=False`` and records the choice in ``index.json``."""
    from data.buckets import load_bucket_file
    from data.encode import main
    from data.pipeline import DataConfig, build_loader
    from data.synthetic import generate

    generate(tmp_path / "raw", num=2, seed=0, samples_per_shard=2)
    (tmp_path / "b.json").write_text(
        json.dumps({"fps": 8, "buckets": [[1, 32, 32, 1], [2, 32, 32, 1], [4, 32, 32, 1]]})
    )
    _tiny_t5(tmp_path / "t5")
    args = [str(tmp_path / "raw"), str(tmp_path / "lat"), "--buckets", str(tmp_path / "b.json")]
    main([*args, "--text-encoder", str(tmp_path / "t5"), "--max-text-len", "24", "--device", "cpu"])
    main([*args[:1], str(tmp_path / "lat2"), *args[2:], "--text-encoder", str(tmp_path / "t5")]
         + ["--max-text-len", "24", "--device", "cpu", "--no-text-encoder-mask"])  # fmt: skip
    assert json.loads((tmp_path / "lat" / "index.json").read_text())["text_encoder_mask"] is True
    assert json.loads((tmp_path / "lat2" / "index.json").read_text())["text_encoder_mask"] is False
    buckets = load_bucket_file(str(tmp_path / "b.json"))
    got = {}
    for name in ("lat", "lat2"):
        loader = build_loader(DataConfig(shards=str(tmp_path / name), buckets=buckets, num_workers=0))
        batch = next(iter(loader))
        got[name] = (batch.text[0], batch.text_emb[0], batch.text_mask[0])
    caption = got["lat2"][0]
    assert not got["lat2"][2].all()  # a padded caption: the two encodings differ
    assert not torch.allclose(got["lat"][1].float(), got["lat2"][1].float(), atol=1e-3)
    for name, encoder_mask in (("lat", True), ("lat2", False)):
        emb, mask = TextEncoder(tmp_path / "t5", 24, encoder_mask=encoder_mask)([caption])
        assert got[name][0] == caption and torch.equal(got[name][2], mask[0])
        assert torch.allclose(got[name][1].float(), emb[0], atol=1e-6, rtol=0)
