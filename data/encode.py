"""Raw shards → latent shards: VAE latents and text-encoder states, computed once.

    python -m data.encode RAW_DIR OUT_DIR --buckets buckets.json [--vae pixel|VAE_DIR] \\
        [--text-encoder minilm|ENCODER_DIR] [--max-text-len 77]
    torchrun --nproc_per_node 8 -m data.encode …        # shards split over ranks

Each raw sample is assigned to its bucket (the same rules and seed as the raw loader), decoded to the
bucket's shape, encoded, and written as ``{key}.latent.npy`` (C×t×h×w float32), ``{key}.text.npy``
(L×D), ``{key}.text_mask.npy`` (L bool), ``{key}.txt`` and ``{key}.json`` (the bucket, fps, latent
and text shapes, codec and text encoder). Rank r writes ``OUT_DIR/train-r{r:03d}-NNNNNN.tar``; rank 0 writes
``index.json``. Train on the result with the same bucket file: ``data.shards=OUT_DIR``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.buckets import Assignment, assign, load_bucket_file
from data.encoders import TextEncoder, build_codec
from data.pipeline import DataConfig, limits, list_shards
from data.reader import Limits, read_shard
from data.shards import ShardSink
from data.stream import Errors, StreamSpec, decode_sample, validate
from data.video import DEFAULT_MAX_PIXELS, MediaError
from dit.extras import MissingExtra

log = logging.getLogger(__name__)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_shards(
    shards: list,
    out_dir: Path,
    bucket_file: str,
    codec,
    text_encoder: TextEncoder,
    rank: int = 0,
    seed: int = 0,
    samples_per_shard: int = 1000,
    limits: Limits = Limits(),  # noqa: B008 (frozen dataclass)
) -> dict:
    """Encode ``shards`` into ``out_dir/train-r{rank}-*.tar``; returns counts and skips.

    A sample that fails (bad metadata, caption or media, or the encoders on it) is counted and skipped.
    """
    buckets = load_bucket_file(bucket_file)
    spec = StreamSpec(shards=shards, buckets=buckets, seed=seed, epoch=0, stream_id=(rank,), limits=limits)
    errors, seen = Errors(), set()
    pattern = str(out_dir / f"train-r{rank:03d}-%06d.tar")
    with ShardSink(pattern, samples_per_shard, 2**40) as sink:
        for shard in shards:
            for raw in read_shard(shard, errors, limits):
                sample = validate(raw, errors, seen, limits)
                if sample is None:
                    continue
                a = assign(sample["__meta__"], buckets)
                if a is None:
                    errors.filter("no_bucket")
                    continue
                try:
                    sink.write(_encoded(sample, a, spec, codec, text_encoder))
                except MemoryError:
                    raise
                except MediaError as e:
                    errors.add(e.reason, sample["__shard__"], sample["__key__"], str(e))
                except Exception as e:  # noqa: BLE001 (one sample must not end the job)
                    why = f"{type(e).__name__}: {e}"
                    errors.add("encode_error", sample["__shard__"], sample["__key__"], why)
    return {"rank": rank, "written": sum(sink.counts.values()), **errors.summary()}


def _encoded(sample: dict, a: Assignment, spec: StreamSpec, codec, text_encoder: TextEncoder) -> dict:
    """The latent-shard members of one validated raw sample."""
    item = decode_sample(sample, a, spec)
    latent = codec.encode(item["video"][None])[0].numpy().astype(np.float32)  # C, t, h, w
    emb, mask = text_encoder([item["text"]])
    b = a.bucket
    meta = {
        "kind": "image" if b.frames == 1 else "video",
        "frames": b.frames,
        "fps": a.fps,
        "width": b.width,
        "height": b.height,
        "duration": (b.frames - 1) / a.fps if b.frames > 1 else 0.0,
        "bucket": b.name,
        "latent_shape": list(latent.shape),
        "text_shape": list(emb.shape[1:]),
        "codec": codec.name,
        "text_encoder": text_encoder.name,
        "source": sample["__meta__"].get("source", sample["__key__"]),
    }
    return {
        "__key__": sample["__key__"],
        "latent.npy": _npy(latent),
        "text.npy": _npy(emb[0].numpy()),
        "text_mask.npy": _npy(mask[0].numpy()),
        "txt": item["text"],
        "json": json.dumps(meta),
    }


def _positive(kind: type):
    """An argparse type: a finite number > 0 (``inf`` would cost every shard, see data.max_sample_mb)."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number > 0")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid float value"
    return parse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.encode", description=__doc__.splitlines()[0])
    p.add_argument("raw_dir")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--buckets", required=True, help="bucket file (JSON), the same one used for training")
    p.add_argument("--vae", default="pixel", help="'pixel', 'pixel:T,S' or a local diffusers VAE folder")
    p.add_argument("--text-encoder", default="minilm", help="'minilm' or a local transformers encoder folder")
    p.add_argument("--max-text-len", type=int, default=77)
    p.add_argument(
        "--text-encoder-mask",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give the text encoder the padding mask (as model.arch.text_encoder_mask; LTX-Video: "
        "--no-text-encoder-mask, its pipeline runs T5 without one)",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument(
        "--seed", type=int, default=0, help="clip starts and crops (as the raw loader's data.seed)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-pixels", type=_positive(int), default=DEFAULT_MAX_PIXELS, help="as data.max_pixels")
    p.add_argument("--max-member-mb", type=_positive(float), default=1024.0, help="as data.max_member_mb")
    p.add_argument("--max-sample-mb", type=_positive(float), default=None, help="as data.max_sample_mb")
    p.add_argument("--allow-compressed", action="store_true", help="as data.allow_compressed")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    device = a.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    # RAW_DIR's glob or directory listing gives files only: no pipe: entries here (allow_pipe is off)
    data = DataConfig(
        shards=a.raw_dir,
        max_pixels=a.max_pixels,
        max_member_mb=a.max_member_mb,
        max_sample_mb=a.max_sample_mb,
        allow_compressed=a.allow_compressed,
    )
    shards, lim = list_shards(data), limits(data)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        codec = build_codec(a.vae, device=device)
    except MissingExtra as e:  # a VAE folder, and diffusers is not installed
        p.exit(2, f"error: {e}\n")
    text_encoder = TextEncoder(
        a.text_encoder, max_length=a.max_text_len, device=device, encoder_mask=a.text_encoder_mask
    )
    summary = encode_shards(
        shards[rank::world], a.out_dir, a.buckets, codec, text_encoder, rank, a.seed, a.samples_per_shard, lim
    )
    summaries = [summary]
    if world > 1:
        summaries = [None] * world
        dist.all_gather_object(summaries, summary)
    if rank == 0:
        index = {
            "shards": sorted(p.name for p in a.out_dir.glob("train-r*.tar")),
            "samples": sum(s["written"] for s in summaries),
            "ranks": summaries,
            "codec": codec.name,
            "latent_channels": codec.latent_channels,
            "text_encoder": text_encoder.name,
            "text_dim": text_encoder.dim,
            "max_text_len": a.max_text_len,
            "text_encoder_mask": a.text_encoder_mask,
            "buckets": a.buckets,
        }
        (a.out_dir / "index.json").write_text(json.dumps(index, indent=1))
        print(
            json.dumps(
                {k: index[k] for k in ("samples", "codec", "text_encoder")} | {"shards": len(index["shards"])}
            )
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
