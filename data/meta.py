"""The schema of a sample's ``{key}.json`` sidecar: one parser, typed and range-checked per field.

Everything downstream of :func:`data.stream.validate` (bucket assignment, clip starts, decoding,
labels) reads the dict :func:`parse_meta` returns, so it only ever sees known fields of the right type
inside their range: ``frames`` an int, ``fps`` a finite float, a ``bucket`` of the form ``FxHxW``.
Unknown fields are dropped (newer writers may add some). A field that breaks the schema costs only
its sample: :class:`MetaError` carries a short reason and names the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from data.video import MediaError, video_pixels

MAX_JSON_BYTES = 1 << 20  # a sidecar is a few hundred bytes; more is not metadata
_BUCKET = re.compile(r"^[1-9][0-9]{0,5}x[1-9][0-9]{0,5}x[1-9][0-9]{0,5}$")
_BIG = 1e9  # bounds frames/seconds/sides well beyond any real clip, well inside float precision


class MetaError(MediaError):
    """A sidecar json that breaks the schema; ``reason`` is ``bad_metadata`` or a sharper cause."""


@dataclass(frozen=True)
class Field:
    """One sidecar field: its JSON type, inclusive range (numbers) and whether it must be there."""

    type: type  # int, float, str or list (a list of ints)
    low: float = -math.inf
    high: float = math.inf
    required: bool = False


SCHEMA: dict[str, Field] = {
    "kind": Field(str, required=True),  # "video" | "image"
    "width": Field(int, 1, 1 << 20, required=True),
    "height": Field(int, 1, 1 << 20, required=True),
    "frames": Field(int, 0, _BIG),  # 0 is a valid parse; validate() reports it as zero_frames
    "fps": Field(float, 0, 10_000),  # 0: unknown (stills); the bucket's target rate is used
    "duration": Field(float, 0, _BIG),
    "start": Field(float, 0, _BIG),
    "end": Field(float, 0, _BIG),
    "bucket": Field(str),  # latent shards: "FxHxW"
    "label": Field(int, 0, (1 << 31) - 1),
    "latent_shape": Field(list, 1, 1 << 20),  # latent shards: C, t, h, w
    "text_shape": Field(list, 1, 1 << 20),  # latent shards: L, D of text.npy
    "codec": Field(str),
    "source": Field(str),
    "text_encoder": Field(str),
}


def parse_meta(data: bytes, max_pixels: int) -> dict:
    """The sidecar's fields, each checked against :data:`SCHEMA`.

    Args:
        data: the raw bytes of ``{key}.json``.
        max_pixels: the largest ``width × height`` a sample may declare (``data.max_pixels``; a video
            at most :data:`data.video.MAX_VIDEO_PIXELS`).

    Returns:
        A dict of the known fields present, with Python values of the schema's types.

    Raises:
        MetaError: ``bad_metadata`` naming the field (not UTF-8, not a JSON object, nested too deep,
            a wrong type, out of range, a non-finite number) or ``too_many_pixels``.
    """
    if len(data) > MAX_JSON_BYTES:
        raise MetaError("bad_metadata", f"json is {len(data)} bytes (limit {MAX_JSON_BYTES})")
    try:
        raw = json.loads(data.decode("utf-8"))
    except RecursionError as e:  # [[[[…]]]] 100k deep: the parser's recursion limit, not a crash
        raise MetaError("bad_metadata", "json nested too deep") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MetaError("bad_metadata", f"json does not parse: {e}"[:160]) from e
    if not isinstance(raw, dict):
        raise MetaError("bad_metadata", f"json is a {type(raw).__name__}, not an object")
    meta = {}
    for name, spec in SCHEMA.items():
        if name in raw:
            meta[name] = _checked(name, raw[name], spec)
        elif spec.required:
            raise MetaError("bad_metadata", f"json has no '{name}'")
    if meta["kind"] not in ("video", "image"):
        raise MetaError("bad_metadata", f"'kind' must be 'video' or 'image', got {meta['kind'][:40]!r}")
    if "bucket" in meta and not _BUCKET.match(meta["bucket"]):
        raise MetaError("bad_metadata", f"'bucket' must look like 8x256x256, got {meta['bucket'][:40]!r}")
    limit = video_pixels(max_pixels) if meta["kind"] == "video" else max_pixels
    if meta["width"] * meta["height"] > limit:
        bound = f"data.max_pixels={max_pixels}" if limit == max_pixels else f"video frames at most {limit}"
        raise MetaError("too_many_pixels", f"{meta['width']}×{meta['height']} declared; {bound}")
    return meta


def _checked(name: str, value, spec: Field):
    """``value`` as ``spec.type`` inside its range, or MetaError naming ``name``."""
    if spec.type is str:
        if not isinstance(value, str) or len(value) > 4096:
            raise MetaError("bad_metadata", f"'{name}' must be a string, got {_show(value)}")
        return value
    if spec.type is list:
        if not isinstance(value, list) or len(value) > 8:
            raise MetaError("bad_metadata", f"'{name}' must be a short list of integers, got {_show(value)}")
        return [_number(f"{name}[{i}]", v, Field(int, spec.low, spec.high)) for i, v in enumerate(value)]
    return _number(name, value, spec)


def _number(name: str, value, spec: Field) -> int | float:
    # bool is an int in Python, but `true` is not a frame count
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetaError("bad_metadata", f"'{name}' must be a number, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MetaError("bad_metadata", f"'{name}' must be finite, got {value}")
    if not spec.low <= value <= spec.high:
        raise MetaError("bad_metadata", f"'{name}'={_show(value)} is outside [{spec.low:g}, {spec.high:g}]")
    if spec.type is int:
        if value != int(value):
            raise MetaError("bad_metadata", f"'{name}' must be an integer, got {value}")
        return int(value)
    return float(value)


def _show(value) -> str:
    return repr(value)[:40]
