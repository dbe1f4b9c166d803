"""Media probing and decoding with PyAV (videos) and Pillow (stills).

Decoding reads only what a training sample needs: it seeks to the keyframe before the clip start,
decodes forward, and converts (and resizes) only the frames picked at the target frame rate,
stopping after the last one. ``decode_all_frames`` is the naive reference (convert every frame, then
subsample) that ``benchmarks.dataloader`` compares against.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image

VIDEO_EXTS = ("mp4", "mov", "mkv", "webm", "avi")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Pillow's hard limit (it refuses more than twice MAX_IMAGE_PIXELS outright and only warns below): a
# lower default would newly refuse stills Pillow decodes (a 100 MP camera's), a higher one nothing it
# decodes. 8K video frames fit; a 48 KB PNG of 20000² does not.
DEFAULT_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)  # None (disabled by a user): Pillow's default
# Video frames are held to at most 16384 × 8704 = 142,606,336 pixels whatever max_pixels says: the
# largest frame any codec level defines (AV1's level 7; its level 6 and the top levels of H.264, HEVC
# and VP9 stop at 35,651,584, e.g. 8192 × 4352), so no conforming stream is refused. A decoder keeps
# several frames of the declared size (H.264 up to 16 references), so a frame bound costs a video more
# than a still, and a larger declared frame is a crafted header, not footage.
MAX_VIDEO_PIXELS = 16384 * 8704
# The only decoders shard bytes reach. Without ``formats`` Pillow tries every plugin it has, and its EPS
# plugin runs Ghostscript on the PostScript inside; MPO (multi-picture JPEG) comes through JPEG's opener.
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
# The FFmpeg demuxer of each extension, given to every av.open: autodetection would also accept formats
# that open files named inside the data (ffconcat, HLS playlists, image2 patterns) or fetch URLs.
DEMUXERS = {"mp4": "mov", "mov": "mov", "mkv": "matroska", "webm": "matroska", "avi": "avi"}
# The top-level boxes an mp4/mov may start with (its type is bytes 4-8, after the size): ISO/IEC
# 14496-12's ftyp, styp (a segment), sidx (a segment index), moov (QuickTime without ftyp), mdat,
# free, skip and uuid, and QuickTime's wide, pnot (a preview) and junk.
# fmt: off
MOV_FIRST_BOXES = (
    b"ftyp", b"styp", b"sidx", b"moov", b"mdat", b"free", b"skip", b"uuid", b"wide", b"pnot", b"junk",
)
# fmt: on


class MediaError(ValueError):
    """A file that cannot be used: ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class MediaInfo:
    """What the shard writer records in ``{key}.json``."""

    kind: str  # "video" | "image"
    frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str

    def to_dict(self) -> dict:
        return asdict(self)


def media_kind(ext: str) -> str | None:
    ext = ext.lower().lstrip(".")
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def video_pixels(max_pixels: int) -> int:
    """The largest video frame decoded under ``max_pixels`` (``data.max_pixels``): at most
    :data:`MAX_VIDEO_PIXELS`."""
    return min(max_pixels, MAX_VIDEO_PIXELS)


def check_pixels(width: int, height: int, max_pixels: int, video: bool = False) -> None:
    """Refuse a picture (a video frame: ``video``) by its declared size, before a pixel is decoded."""
    limit = video_pixels(max_pixels) if video else max_pixels
    if width * height > limit:
        bound = f"max_pixels={max_pixels}" if limit == max_pixels else f"video frames at most {limit}"
        raise MediaError("too_many_pixels", f"{width}×{height} > {bound}")


@contextlib.contextmanager
def open_image(data: bytes, max_pixels: int):
    """A Pillow image whose header passed the pixel limit; any Pillow failure is a MediaError."""
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            check_pixels(im.width, im.height, max_pixels)  # the header only: nothing decoded yet
            yield im
    except MediaError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own (larger) limit
        raise MediaError("too_many_pixels", str(e)) from e
    except Exception as e:  # Pillow raises many types for bad files (UnidentifiedImageError, OSError, …)
        raise MediaError("undecodable", f"{type(e).__name__}: {e}") from e


def demuxer(ext: str | None, data: bytes = b"") -> str:
    """The FFmpeg demuxer to read a video with: by its extension, or (``ext`` None: a file the user
    named, not shard data) by its first bytes; never FFmpeg's own autodetection.

    Raises:
        MediaError: ``unknown_extension``, or ``undecodable`` when the bytes are none of the containers.
    """
    if ext is not None:
        name = DEMUXERS.get(ext.lower().lstrip("."))
        if name is None:
            raise MediaError("unknown_extension", ext)
        return name
    if data[4:8] in MOV_FIRST_BOXES:
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    raise MediaError("undecodable", "not an mp4/mov, mkv/webm or avi container")


def open_video(data: bytes, ext: str | None):
    """``av.open`` of the bytes with the demuxer of :func:`demuxer` (FFmpeg never picks one itself)."""
    return av.open(io.BytesIO(data), format=demuxer(ext, data))


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> MediaInfo:
    with open_image(data, max_pixels) as im:
        im.load()  # decode fully: a truncated file fails here, not in a training worker
        w, h, fmt = im.width, im.height, (im.format or "").lower()
    if w < 1 or h < 1:
        raise MediaError("empty", f"{w}×{h} image")
    return MediaInfo("image", 1, 0.0, w, h, 0.0, fmt)


def video_stream(container, max_pixels: int):
    """The first video stream, its declared frame size checked (:func:`video_pixels`); an audio-only
    file is a MediaError."""
    if not container.streams.video:
        raise MediaError("no_video_stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a codec FFmpeg does not know (or a garbled codec id)
        raise MediaError("undecodable", "no decoder for the video stream")
    check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels, video=True)
    return stream


def probe_video(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, ext: str | None = None) -> MediaInfo:
    """Container metadata plus a decode of the first frame (so undecodable files fail here); ``ext``
    picks the demuxer (:func:`demuxer`)."""
    try:
        with open_video(data, ext) as container:
            stream = video_stream(container, max_pixels)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            frames = stream.frames
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            first = next(container.decode(stream), None)
            if first is None:
                raise MediaError("zero_frames")
            check_pixels(first.width, first.height, max_pixels, video=True)  # the container may not say
            if frames == 0:  # some containers do not store a count; derive it
                frames = max(1, round(duration * fps))
            return MediaInfo(
                "video", int(frames), fps, first.width, first.height, duration, stream.codec_context.name
            )
    except MediaError:
        raise
    except (av.error.FFmpegError, StopIteration, ValueError, IndexError) as e:
        raise MediaError("undecodable", str(e)) from e


def probe(data: bytes, ext: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> MediaInfo:
    """Probe the bytes of a file with extension ``ext``; raises :class:`MediaError`."""
    kind = media_kind(ext)
    if kind is None:
        raise MediaError("unknown_extension", ext)
    if not data:
        raise MediaError("empty", "zero bytes")
    return probe_video(data, max_pixels, ext) if kind == "video" else probe_image(data, max_pixels)


def resize_crop_size(src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int]:
    """(width, height) to resize ``src`` to so it covers ``dst`` with the aspect ratio kept."""
    (sw, sh), (dw, dh) = src, dst
    scale = max(dw / sw, dh / sh)
    return max(dw, math.ceil(sw * scale - 1e-6)), max(dh, math.ceil(sh * scale - 1e-6))


def crop(frames: np.ndarray, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Crop ...×H×W×C arrays to ``size`` = (width, height); ``offset`` in [0, 1] (0.5 = centre)."""
    h, w = frames.shape[-3:-1]
    dw, dh = size
    x = round((w - dw) * offset[0])
    y = round((h - dh) * offset[1])
    return frames[..., y : y + dh, x : x + dw, :]


def decode_image(
    data: bytes, size: tuple[int, int], offset=(0.5, 0.5), max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """1×H×W×3 uint8: the still resized to cover ``size`` = (width, height), then cropped.

    Raises:
        MediaError: undecodable or truncated, or larger than ``max_pixels`` (by its header).
    """
    with open_image(data, max_pixels) as im:
        im = im.convert("RGB")
        im = im.resize(resize_crop_size(im.size, size), Image.BICUBIC)
        arr = np.asarray(im)[None]
    return crop(arr, size, offset)


def frame_times(start: float, num_frames: int, fps: float) -> list[float]:
    """Presentation times (s) of ``num_frames`` frames from ``start`` at ``fps``."""
    return [start + i / fps for i in range(num_frames)]


def decode_clip(
    data: bytes,
    start: float,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
    offset=(0.5, 0.5),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ext: str | None = None,
) -> np.ndarray:
    """T×H×W×3 uint8: ``num_frames`` frames from ``start`` s, sampled at ``fps``, resized and cropped.

    Args:
        data: the encoded video.
        start: clip start in seconds.
        num_frames: frames wanted.
        fps: frame rate to sample at (frames are picked from the source by timestamp, so a 30 fps source
            sampled at 10 fps keeps every third frame).
        size: (width, height) of the output.
        offset: crop position in [0, 1]² (0.5, 0.5 = centre).
        max_pixels: the largest frame (width × height) decoded, at most :data:`MAX_VIDEO_PIXELS`;
            checked on the stream's declared size.
        ext: the file's extension, which picks the demuxer (:func:`demuxer`); always given for shard
            data and by ``launch.sample``. None: by the first bytes.

    Raises:
        MediaError: undecodable, no video stream, frames over ``max_pixels``, or the clip is shorter
            than asked.
    """
    wanted = frame_times(start, num_frames, fps)
    out: list[np.ndarray] = []
    try:
        with open_video(data, ext) as container:
            stream = video_stream(container, max_pixels)
            stream.thread_type = "AUTO"
            tb = stream.time_base or Fraction(1, 1_000_000)
            if start > 0:
                container.seek(int(start / tb), stream=stream, backward=True)
            half = 0.5 / (float(stream.average_rate) if stream.average_rate else fps)
            scaled = None
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                ts = float(frame.pts * tb)
                # take the source frame nearest each wanted time (within half a source frame)
                while len(out) < num_frames and ts >= wanted[len(out)] - half:
                    if scaled is None:
                        check_pixels(frame.width, frame.height, max_pixels, video=True)
                        scaled = resize_crop_size((frame.width, frame.height), size)
                    rgb = frame.reformat(width=scaled[0], height=scaled[1], format="rgb24").to_ndarray()
                    out.append(rgb)
                if len(out) == num_frames:
                    break
    except av.error.FFmpegError as e:
        raise MediaError("undecodable", str(e)) from e
    if len(out) < num_frames:
        raise MediaError(
            "too_short", f"got {len(out)} of {num_frames} frames from t={start:.2f}s at {fps} fps"
        )
    return crop(np.stack(out), size, offset)


def decode_all_frames(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, ext: str | None = None
) -> tuple[list[np.ndarray], list[float], float | None]:
    """Every frame (H×W×3 uint8 at the source size), its time, and the stream's average frame rate
    (None: not declared): the naive reference decoder, which converts everything
    (``benchmarks.dataloader``'s baseline picks a clip from it). Frames without a timestamp are left
    out; a file FFmpeg cannot decode is a MediaError (``undecodable``)."""
    frames, times, rate = [], [], None
    try:
        with open_video(data, ext) as container:
            stream = video_stream(container, max_pixels)
            stream.thread_type = "AUTO"
            tb = stream.time_base or Fraction(1, 1_000_000)
            rate = float(stream.average_rate) if stream.average_rate else None
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if not frames:  # the declared size was checked; the decoded one may differ
                    check_pixels(frame.width, frame.height, max_pixels, video=True)
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.pts * tb))
    except av.error.FFmpegError as e:
        raise MediaError("undecodable", str(e)) from e
    return frames, times, rate


def encode_h264(frames: np.ndarray, fps: float, crf: int = 23, gop: int = 12) -> bytes:
    """Encode T×H×W×3 uint8 frames as an H.264 mp4 (yuv420p; H and W must be even).

    Single-threaded, so the decoded frames are reproducible. The bitstream itself may still differ in
    a few bytes between runs (x264 reads uninitialised frame padding in some searches); compare decoded
    pixels, not mp4 bytes.
    """
    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # PyAV's own thread settings override options["threads"]; set them on the codec context, and
        # keep x264's lookahead single-threaded too
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        stream.options = {
            "crf": str(crf),
            "g": str(gop),
            "preset": "veryfast",
            "x264-params": "threads=1:lookahead-threads=1",
        }
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
