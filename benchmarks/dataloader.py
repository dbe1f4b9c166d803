"""Data loader throughput: seek-and-stride decoding next to a naive decode-everything baseline.

    python -m benchmarks.dataloader --shards DIR [--buckets FILE] [--workers N] [--batches N] [--no-report]

Runs the real loader twice on the same shards, buckets and seed: once as shipped (seek to the clip
start, convert only the frames picked at the target fps) and once with this benchmark's baseline
decoder, :func:`decode_everything` (convert every frame, then pick). Prints one JSON object with
``samples_per_s``, ``tokens_per_s``, ``batches``, ``buckets`` (histogram), ``errors`` (by reason),
``decode_ms_per_sample`` for ours, the same (and its ``errors``) under ``naive``, and the speed ratios;
writes a dated report to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import av
import numpy as np
import torch

from benchmarks import report
from data.buckets import BucketConfig, Compression, buckets_from_budget, latent_tokens, load_bucket_file
from data.pipeline import DataConfig, build_loader
from data.video import (
    DEFAULT_MAX_PIXELS,
    MediaError,
    crop,
    decode_all_frames,
    frame_times,
    resize_crop_size,
)


def default_buckets() -> BucketConfig:
    """Buckets for the synthetic demo data: 64² area, 1–16 frames at 8 fps, pixel codec (1, 4)."""
    comp = Compression(1, 4, causal=False)
    return BucketConfig(
        buckets_from_budget(4096, resolutions=(64,), frame_counts=(1, 4, 8, 16), compression=comp), fps=8
    )


def decode_everything(
    data: bytes,
    start: float,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
    offset=(0.5, 0.5),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ext: str | None = None,
) -> np.ndarray:
    """The baseline: :func:`data.video.decode_clip`'s frames, the slow way. Every frame of the video is
    decoded and converted to full-size RGB; then the clip's frames are picked by the same rule (the
    first frame within half a source frame of each wanted time) and resized.

    It fails where ``decode_clip`` fails, with the same :class:`MediaError` reason (``undecodable``,
    ``too_short``, …), so that both runs skip and count the same samples.
    """
    frames, times, rate = decode_all_frames(data, max_pixels, ext)
    half = 0.5 / (rate or fps)  # decode_clip's rule: the first frame within half a source frame
    picked, j = [], 0
    for want in frame_times(start, num_frames, fps):
        while j < len(times) and times[j] < want - half:
            j += 1
        if j == len(times):
            raise MediaError(
                "too_short", f"got {len(picked)} of {num_frames} frames from t={start:.2f}s at {fps} fps"
            )
        picked.append(frames[j])
    width, height = resize_crop_size((frames[0].shape[1], frames[0].shape[0]), size)
    resized = [
        av.VideoFrame.from_ndarray(f, format="rgb24").reformat(width=width, height=height).to_ndarray()
        for f in picked
    ]
    return crop(np.stack(resized), size, offset)  # T, H, W, 3


def run(
    cfg: DataConfig, batches: int, comp: Compression, patch: tuple[int, int, int], naive: bool = False
) -> dict:
    """Time ``batches`` batches of the real loader (with the :func:`decode_everything` baseline when
    ``naive``)."""
    loader = build_loader(cfg)
    if naive:
        loader.clip_decoder = decode_everything
    histogram: collections.Counter = collections.Counter()
    samples = tokens = 0
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(batches):
        batch = next(it)
        f, h, w = (int(v) for v in batch.bucket.split("x"))
        n = len(batch)
        histogram[batch.bucket] += 1
        samples += n
        tokens += n * latent_tokens(f, h, w, comp, patch)
    elapsed = time.perf_counter() - start
    errors = loader.error_summary()
    return {
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "batches": batches,
        "samples": samples,
        "seconds": elapsed,
        "buckets": dict(histogram.most_common()),
        "errors": errors["skipped"],
        "filtered": errors["filtered"],
        "decode_ms_per_sample": 1000 * errors.get("decode_s", 0.0) / max(errors.get("decoded", 0), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dataloader", description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard directory, glob or list")
    p.add_argument("--buckets", help="bucket file (JSON); default: 64² buckets for the synthetic data")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--compression", default="1,4", help="codec temporal,spatial factors for token counts")
    p.add_argument("--patch", default="1,2,2", help="model patch for token counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="print the JSON only, write no report file")
    a = p.parse_args(argv)
    buckets = load_bucket_file(a.buckets) if a.buckets else default_buckets()
    t, s = (int(v) for v in a.compression.split(","))
    comp = Compression(t, s, causal=t > 1)
    patch = tuple(int(v) for v in a.patch.split(","))
    common = {"shards": a.shards, "buckets": buckets, "num_workers": a.workers, "seed": a.seed}
    ours = run(DataConfig(**common), a.batches, comp, patch)
    naive = run(DataConfig(**common), a.batches, comp, patch, naive=True)
    result = {
        **{
            k: ours[k]
            for k in ("samples_per_s", "tokens_per_s", "batches", "buckets", "errors", "decode_ms_per_sample")
        },
        "naive": {k: naive[k] for k in ("samples_per_s", "tokens_per_s", "decode_ms_per_sample", "errors")},
        "speedup_samples_per_s": ours["samples_per_s"] / naive["samples_per_s"],
        "speedup_decode_ms": naive["decode_ms_per_sample"] / max(ours["decode_ms_per_sample"], 1e-9),
    }
    print(json.dumps(result))
    if not a.no_report:
        print(f"report: {_report(a, buckets, ours, naive, result)}", flush=True)
    return result


def _report(a: argparse.Namespace, buckets: BucketConfig, ours: dict, naive: dict, result: dict):
    rows = [
        {
            "decoder": name,
            "samples/s": f"{r['samples_per_s']:.1f}",
            "tokens/s": f"{r['tokens_per_s']:,.0f}",
            "decode ms/sample": f"{r['decode_ms_per_sample']:.2f}",
            "seconds": f"{r['seconds']:.1f}",
        }
        for name, r in (("seek + stride (ours)", ours), ("naive: all frames, then subsample", naive))
    ]
    body = (
        report.table(rows)
        + f"\n\nSpeed-up: samples/s ×{result['speedup_samples_per_s']:.2f}, decode time per "
        f"sample ×{result['speedup_decode_ms']:.2f}.\n\nBuckets: `{json.dumps(ours['buckets'])}`\n\n"
        f"Skipped (bad input): `{json.dumps(ours['errors'])}`; filtered: `{json.dumps(ours['filtered'])}`"
    )
    config = {
        "shards": a.shards,
        "workers": a.workers,
        "batches": a.batches,
        "fps": buckets.fps,
        "buckets": [(b.name, b.batch_size) for b in buckets.buckets],
        "compression": a.compression,
        "patch": a.patch,
        "seed": a.seed,
    }
    path = report.write(
        f"dataloader-{os.path.basename(os.path.normpath(a.shards))}",
        "benchmarks.dataloader",
        "Data loader throughput",
        torch.device("cpu"),
        config,
        body,
        packages=("av", "webdataset"),
    )
    return path


if __name__ == "__main__":
    main()
