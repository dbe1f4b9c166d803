"""Shard writer: a folder or CSV/JSONL of videos/images with captions → webdataset tar shards.

    python -m data.shards write SRC OUT_DIR [--max-samples 1000] [--max-mb 1024] [--processes 4]

SRC is a folder (media files with sidecar ``.txt`` captions, searched recursively) or a ``.csv`` /
``.jsonl`` with ``path`` and ``caption`` columns and optional ``start``/``end`` seconds (paths relative
to the file). Each sample becomes ``{key}.{mp4|mov|…|jpg|png|webp}`` (the original bytes, never
re-encoded), ``{key}.txt`` (caption) and ``{key}.json`` (PyAV/Pillow probe: kind, frames, fps, width,
height, duration, codec; plus source and clip window). ``OUT_DIR/index.json`` lists the shards, the
sample counts, duration/resolution histograms and every skipped file with its reason. Probing runs in
``--processes`` worker processes; a bad file is reported and skipped, never fatal.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import multiprocessing as mp
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data.video import MediaError, probe

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(name: str) -> str:
    """A webdataset-safe sample key: letters, digits, ``_`` and ``-`` only.

    Path separators, ``..`` and dots become ``_`` (webdataset splits a member name at its first dot,
    so a dot inside a key would silently split the sample).
    """
    key = _UNSAFE.sub("_", name).strip("_")
    return key or "sample"


@dataclass
class SourceItem:
    """One sample to write: a media file, its caption, an optional clip window."""

    path: Path
    caption: str | None
    name: str  # path relative to SRC, the basis of the key
    start: float | None = None
    end: float | None = None


def _float_or_none(v) -> float | None:
    return None if v in (None, "") else float(v)


def list_sources(src: Path) -> list[SourceItem]:
    """Items from a folder (sidecar captions) or a CSV/JSONL manifest, in a stable order."""
    if src.is_dir():
        items = []
        for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() != ".txt"):
            side = path.with_suffix(".txt")
            caption = side.read_text(encoding="utf-8").strip() if side.exists() else None
            items.append(SourceItem(path, caption, str(path.relative_to(src).with_suffix(""))))
        return items
    if src.suffix.lower() == ".csv":
        with src.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif src.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise SystemExit(f"{src}: expected a folder, a .csv or a .jsonl manifest")
    items = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise SystemExit(f"{src}: row {i + 1} has no 'path' column")
        path = (src.parent / row["path"]).resolve()
        start, end = _float_or_none(row.get("start")), _float_or_none(row.get("end"))
        name = str(Path(row["path"]).with_suffix(""))
        if start is not None or end is not None:
            name += f"_{start or 0:g}-{end if end is not None else 'end'}"
        items.append(SourceItem(path, (row.get("caption") or "").strip() or None, name, start, end))
    return items


def _probe_item(item: SourceItem) -> tuple[SourceItem, bytes | None, dict | None, str | None]:
    """Read and probe one file (runs in a worker process). Returns data + meta, or a skip reason."""
    if not item.caption:
        return item, None, None, "missing_caption"
    try:
        data = item.path.read_bytes()
        info = probe(data, item.path.suffix).to_dict()
    except OSError as e:
        return item, None, None, f"unreadable: {e.strerror}"
    except MediaError as e:
        return item, None, None, str(e)
    if info["kind"] == "video" and info["frames"] < 1:
        return item, None, None, "zero_frames"
    if item.start is not None or item.end is not None:
        info["start"] = item.start or 0.0
        info["end"] = item.end if item.end is not None else info["duration"]
        if info["end"] <= info["start"]:
            return item, None, None, f"empty_window: start={info['start']} end={info['end']}"
    return item, data, info, None


def _duration_bin(seconds: float) -> str:
    for edge in (1, 2, 4, 8, 16, 32, 64):
        if seconds < edge:
            return f"<{edge}s"
    return ">=64s"


def write_shards(
    items: list[SourceItem],
    out_dir: Path,
    *,
    prefix: str = "train",
    max_samples: int = 1000,
    max_mb: float = 1024.0,
    processes: int = 1,
) -> dict:
    """Probe ``items`` in parallel and write them to ``out_dir/{prefix}-NNNNNN.tar``; returns the index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: set[str] = set()
    skipped: dict[str, list[dict]] = collections.defaultdict(list)
    durations, resolutions, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    ctx = mp.get_context("spawn")  # no fork: safe with threads in the parent (PyAV, torch)
    with (
        ctx.Pool(processes) if processes > 1 else _Inline() as pool,
        ShardSink(pattern, max_samples, int(max_mb * 2**20)) as sink,
    ):
        for item, data, info, reason in pool.imap(_probe_item, items, chunksize=4):
            if reason is not None:
                kind = reason.split(":")[0]
                skipped[kind].append({"source": str(item.path), "detail": reason})
                log.warning("skipping %s: %s", item.path, reason)
                continue
            key = base = sanitize_key(item.name)
            n = 1
            while key in keys:  # two sources mapping to one key: keep both, distinctly named
                key, n = f"{base}-{n}", n + 1
            keys.add(key)
            info["source"] = item.name
            ext = item.path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sink.write({"__key__": key, ext: data, "txt": item.caption, "json": info})
            kinds[info["kind"]] += 1
            durations[_duration_bin(info["duration"]) if info["kind"] == "video" else "image"] += 1
            resolutions[f"{info['width']}x{info['height']}"] += 1
    shards = [
        {"name": Path(path).name, "bytes": Path(path).stat().st_size, "samples": n}
        for path, n in sorted(sink.counts.items())
    ]
    index = {
        "prefix": prefix,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "kinds": dict(kinds),
        "histogram": {
            "duration": dict(sorted(durations.items())),
            "resolution": dict(resolutions.most_common()),
        },
        "skipped": {k: v for k, v in sorted(skipped.items())},
        "skipped_total": sum(len(v) for v in skipped.values()),
    }
    name = "index.json" if prefix == "train" else f"index-{prefix}.json"
    (out_dir / name).write_text(json.dumps(index, indent=1))
    return index


class ShardSink:
    """``webdataset.ShardWriter`` that counts the samples of each shard it writes.

    The writer opens its first shard before any sample arrives; if none does, that empty tar is
    removed on exit. Tars are reproducible (fixed mtime).
    """

    def __init__(self, pattern: str, max_samples: int, max_bytes: int):
        self.writer = wds.ShardWriter(pattern, maxcount=max_samples, maxsize=max_bytes, verbose=0, mtime=0)
        self.counts: collections.Counter = collections.Counter()  # shard path → samples

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.counts[self.writer.fname] += 1  # fname is the shard this sample went into

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> bool:
        self.writer.close()
        if not self.counts:
            Path(self.writer.fname).unlink(missing_ok=True)
        return False


class _Inline:
    """A single-process stand-in for ``Pool`` (no worker start-up cost for small jobs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write shards from a folder or manifest")
    w.add_argument("src", type=Path)
    w.add_argument("out_dir", type=Path)
    w.add_argument("--prefix", default="train", help="shard name prefix (train, val, …)")
    w.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    w.add_argument("--max-mb", type=float, default=1024.0, help="MiB per shard")
    w.add_argument("--processes", type=int, default=1, help="probe processes")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not a.src.exists():
        p.error(f"{a.src} does not exist")
    items = list_sources(a.src)
    index = write_shards(
        items, a.out_dir, prefix=a.prefix, max_samples=a.max_samples, max_mb=a.max_mb, processes=a.processes
    )
    print(
        json.dumps(
            {
                "shards": len(index["shards"]),
                "samples": index["samples"],
                "skipped": index["skipped_total"],
                "index": str(a.out_dir / "index.json"),
            }
        )
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
