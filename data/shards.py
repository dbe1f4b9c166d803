"""Shard writer: a folder or CSV/JSONL of videos/images with captions → webdataset tar shards.

    python -m data.shards write SRC OUT_DIR [--max-samples 1000] [--max-mb 1024] [--min-shards 8]
                                            [--processes 4]

SRC is a folder (media files with sidecar ``.txt`` captions, searched recursively) or a ``.csv`` /
``.jsonl`` with ``path`` and ``caption`` columns and optional ``start``/``end`` seconds (paths relative
to the file). Each sample becomes ``{key}.{mp4|mov|…|jpg|png|webp}`` (the original bytes, never
re-encoded), ``{key}.txt`` (caption) and ``{key}.json`` (PyAV/Pillow probe: kind, frames, fps, width,
height, duration, codec; plus source and clip window). ``OUT_DIR/index.json`` lists the shards, the
sample counts, duration/resolution histograms and every skipped file with its reason. A small source
is spread over at least ``--min-shards`` shards (one sample each at the least), so that the loader's
data-parallel ranks and workers each get one. Probing runs in
``--processes`` worker processes. A bad file (or a bad manifest row, named by file and line; an
unreadable caption; a dangling symlink; a picture over ``--max-pixels``) is reported and skipped,
never fatal.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import json
import logging
import multiprocessing as mp
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data.video import DEFAULT_MAX_PIXELS, MediaError, probe

log = logging.getLogger(__name__)

MIN_SHARDS = 8  # the CLI's default --min-shards: 1 rank × 8 workers, or 8 ranks × 1, without resampling
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
    """One sample to write: a media file, its caption, an optional clip window; or, with ``error``
    set, a source that cannot be one (a bad manifest row, an unreadable caption), to be reported."""

    path: Path  # the media file (or, for a bad manifest row, the manifest)
    caption: str | None
    name: str  # path relative to SRC, the basis of the key
    start: float | None = None
    end: float | None = None
    error: str | None = None  # "reason: detail" → index.json's skipped, never written
    line: int | None = None  # 1-based manifest line of the row


def list_sources(src: Path) -> list[SourceItem]:
    """Items from a folder (sidecar captions) or a CSV/JSONL manifest, in a stable order.

    A row or file that cannot become a sample is an item with ``error`` set (reported and skipped by
    :func:`write_shards`), never an exception: one bad caption must not stop a job of millions.
    """
    if src.is_dir():
        return [_folder_item(src, path) for path in sorted(src.rglob("*")) if _is_media_candidate(path)]
    suffix = src.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise SystemExit(f"{src}: expected a folder, a .csv or a .jsonl manifest")
    try:
        rows = _csv_rows(src) if suffix == ".csv" else _jsonl_rows(src)
    except (OSError, csv.Error) as e:
        raise SystemExit(f"{src}: cannot read the manifest ({e})") from e
    return [_manifest_item(src, line, row) for line, row in rows]


def _is_media_candidate(path: Path) -> bool:
    # a dangling symlink is neither file nor directory: listed so that it is reported, not lost
    dangling = path.is_symlink() and not path.exists()
    return dangling or (path.is_file() and path.suffix.lower() != ".txt")


def _folder_item(src: Path, path: Path) -> SourceItem:
    name = str(path.relative_to(src).with_suffix(""))
    if not path.exists():
        return SourceItem(path, None, name, error=f"dangling_symlink: {path} -> {os.readlink(path)}")
    side = path.with_suffix(".txt")
    if not side.exists():
        return SourceItem(path, None, name)  # missing_caption, reported when probed
    try:
        caption = side.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        return SourceItem(side, None, name, error=f"bad_caption: {side} is not UTF-8 ({e.reason})")
    except OSError as e:  # a directory named clip.txt, no permission, …
        return SourceItem(side, None, name, error=f"unreadable_caption: {side}: {e.strerror or e}")
    return SourceItem(path, caption, name)


def _csv_rows(src: Path) -> list[tuple[int, dict]]:
    # bytes that are not UTF-8 survive as surrogates, so they cost their row, not the file
    with src.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise SystemExit(f"{src}: the header has no 'path' column (got {reader.fieldnames})")
        # line_num after a row is its last physical line: the row's own line unless quoted newlines
        return [(reader.line_num, row if _utf8(row) else "not UTF-8") for row in reader]


def _utf8(row: dict) -> bool:
    try:
        for v in row.values():
            for text in v if isinstance(v, list) else [v]:  # extra cells come as a list
                if isinstance(text, str):
                    text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl_rows(src: Path) -> list[tuple[int, dict | str]]:
    """``(line, object)`` per non-empty line; a line that does not parse is ``(line, error text)``."""
    rows: list[tuple[int, dict | str]] = []
    for line, raw in enumerate(src.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError:
            rows.append((line, "not UTF-8"))
        except (ValueError, RecursionError) as e:
            rows.append((line, f"not JSON ({e})"[:200]))
    return rows


def _manifest_item(src: Path, line: int, row) -> SourceItem:
    """The item of one manifest row; a bad row becomes an item naming ``src`` and its line."""
    where = f"{src}:{line}"
    try:
        if isinstance(row, str):
            raise ValueError(row)
        if not isinstance(row, dict):
            raise ValueError(f"a row must be an object, got {type(row).__name__}")
        path, caption = row.get("path"), row.get("caption")
        if not isinstance(path, str) or not path:
            raise ValueError(f"'path' must be a non-empty string, got {path!r}"[:120])
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"'caption' must be a string, got {caption!r}"[:120])
        start, end = _seconds(row, "start"), _seconds(row, "end")
        media, name = _row_path(src, path)
    except ValueError as e:
        return SourceItem(src, None, where, error=f"bad_row: {where}: {e}", line=line)
    if start is not None or end is not None:
        name += f"_{start or 0:g}-{end if end is not None else 'end'}"
    return SourceItem(media, (caption or "").strip() or None, name, start, end, line=line)


def _row_path(src: Path, path: str) -> tuple[Path, str]:
    """``(file, key basis)`` of a manifest row's ``path``; ValueError for one that names no file
    (``/``, ``.``, ``..``, a trailing ``/``) or holds a NUL, which pathlib and the OS reject."""
    if "\0" in path:
        raise ValueError(f"'path' holds a NUL byte: {path!r}"[:120])
    if path.endswith("/") or Path(path).name in ("", ".", ".."):
        raise ValueError(f"'path'={path!r} names a directory, not a file"[:120])
    try:
        media = (src.parent / path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise ValueError(f"'path'={path!r}: {e}"[:120]) from None
    return media, str(Path(path).with_suffix(""))


def _seconds(row: dict, field: str) -> float | None:
    v = row.get(field)
    if v in (None, ""):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"'{field}' must be seconds, got {v!r}"[:120])
    try:
        seconds = float(v)
    except ValueError:
        raise ValueError(f"'{field}'={v!r} is not a number of seconds"[:120]) from None
    if not 0 <= seconds < 1e9:  # also NaN and inf
        raise ValueError(f"'{field}'={v!r} must be finite seconds >= 0"[:120])
    return seconds


def _probe_item(
    item: SourceItem, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[SourceItem, bytes | None, dict | None, str | None]:
    """Read and probe one file (runs in a worker process). Returns data + meta, or a skip reason."""
    if item.error is not None:
        return item, None, None, item.error
    if not item.caption:
        return item, None, None, "missing_caption"
    try:
        data = item.path.read_bytes()
        info = probe(data, item.path.suffix, max_pixels).to_dict()
    except OSError as e:
        return item, None, None, f"unreadable: {e.strerror or e}"
    except MediaError as e:
        return item, None, None, str(e)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (a probe bug on one file must not stop the job)
        return item, None, None, f"undecodable: {type(e).__name__}: {e}"
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


def index_name(prefix: str) -> str:
    """The index file of the shards written with ``prefix`` (``index.json`` for ``train``)."""
    return "index.json" if prefix == "train" else f"index-{prefix}.json"


def write_shards(
    items: list[SourceItem],
    out_dir: Path,
    *,
    prefix: str = "train",
    max_samples: int = 1000,
    max_mb: float = 1024.0,
    processes: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_shards: int = 1,
) -> dict:
    """Probe ``items`` in parallel and write them to ``out_dir/{prefix}-NNNNNN.tar``; returns the index.

    Args:
        items: the sources (:func:`list_sources`).
        out_dir: where the shards and ``index.json`` go.
        prefix: shard name prefix (``train``, ``val``, …).
        max_samples: most samples per shard.
        max_mb: most MiB per shard.
        processes: probe processes (1: in this process).
        max_pixels: larger images or video frames (width × height) are skipped.
        min_shards: aim for at least this many shards: fewer samples per shard than ``max_samples``
            when ``items`` are few (one sample each at the least, so never more shards than samples;
            skipped items can leave fewer). 1: ``max_samples`` alone decides (the CLI's default is
            :data:`MIN_SHARDS`).
    """
    if min_shards < 1 or max_samples < 1:
        raise ValueError(f"min_shards={min_shards}, max_samples={max_samples}: each must be at least 1")
    per_shard = max(1, min(max_samples, len(items) // min_shards))
    if per_shard < max_samples:
        log.info("%d sources, at least %d shards: %d samples per shard", len(items), min_shards, per_shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: set[str] = set()
    skipped: dict[str, list[dict]] = collections.defaultdict(list)
    durations, resolutions, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    ctx = mp.get_context("spawn")  # no fork: safe with threads in the parent (PyAV, torch)
    with (
        ctx.Pool(processes) if processes > 1 else _Inline() as pool,
        ShardSink(pattern, per_shard, int(max_mb * 2**20)) as sink,
    ):
        probe_one = functools.partial(_probe_item, max_pixels=max_pixels)
        for item, data, info, reason in pool.imap(probe_one, items, chunksize=4):
            if reason is not None:
                kind = reason.split(":")[0]
                row = {"source": str(item.path), "detail": reason}
                skipped[kind].append(row if item.line is None else {**row, "line": item.line})
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
    (out_dir / index_name(prefix)).write_text(json.dumps(index, indent=1))
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
    w.add_argument(
        "--min-shards",
        type=int,
        default=MIN_SHARDS,
        help="spread a small source over at least this many shards (never more than its samples)",
    )
    w.add_argument("--processes", type=int, default=1, help="probe processes")
    w.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="skip larger images/frames (width × height)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not a.src.exists():
        p.error(f"{a.src} does not exist")
    for flag, value in (("--max-samples", a.max_samples), ("--min-shards", a.min_shards)):
        if value < 1:
            p.error(f"{flag}={value}: must be at least 1")
    items = list_sources(a.src)
    index = write_shards(
        items,
        a.out_dir,
        prefix=a.prefix,
        max_samples=a.max_samples,
        max_mb=a.max_mb,
        processes=a.processes,
        max_pixels=a.max_pixels,
        min_shards=a.min_shards,
    )
    print(
        json.dumps(
            {
                "shards": len(index["shards"]),
                "samples": index["samples"],
                "skipped": index["skipped_total"],
                "index": str(a.out_dir / index_name(a.prefix)),
            }
        )
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
