"""Reading one shard: a local tar (or, opted in, a command's stdout) → raw samples, within limits.

Whether a shard is a command is decided once, when ``data.shards`` is listed (:class:`Shard`), and
never again from the file's name: a file called ``pipe:rm -rf ~ #.tar`` found by a glob is a file.
The tar is read as a stream, member by member, so a member larger than ``max_member_mb`` is stepped
over (in bounded chunks) without entering memory, and a compressed tar (which would inflate a small
file into gigabytes) is refused unless ``allow_compressed``. A sample is every member sharing one full
path prefix (``a/k.mp4`` and ``c/k.txt`` are two samples, never merged).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from data.video import DEFAULT_MAX_PIXELS

# magic bytes of the compressions tarfile's "r|*" would inflate on the fly (and zstd, for the message)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members: not samples


@dataclass(frozen=True)
class Shard:
    """A shard to read. ``pipe`` is True only for an entry written literally in ``data.shards`` as
    ``pipe:CMD`` with ``data.allow_pipe`` set; everything globbed or listed is a plain file."""

    url: str
    pipe: bool = False

    @property
    def name(self) -> str:
        """What errors call the shard: the file name (or the end of the command)."""
        return self.url.rsplit("/", 1)[-1]

    def __fspath__(self) -> str:  # so tarfile.open(shard) etc. work on files, and never on a command
        if self.pipe:
            raise TypeError(f"{self.url}: a pipe: shard is a command, not a file")
        return self.url

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class Limits:
    """What one shard or sample may cost before it is refused (``data.max_pixels`` etc.)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_mb: float = 1024.0
    allow_compressed: bool = False

    @property
    def max_member_bytes(self) -> int:
        return int(self.max_member_mb * 2**20)


def read_shard(shard: Shard | str, errors, limits: Limits = Limits()) -> Iterator[dict]:  # noqa: B008
    """Samples ``{"__key__", "__shard__", ext: bytes, …}`` of one tar; a broken tar ends early.

    A plain ``str`` is always a file. A sample with a member over the size limit comes with
    ``"__error__": (reason, detail)`` and no data, for :func:`data.stream.validate` to count.

    Args:
        shard: the shard.
        errors: a :class:`data.stream.Errors`, for skips that are not samples (a bad tar or member name).
        limits: size limits.
    """
    shard = shard if isinstance(shard, Shard) else Shard(str(shard))
    current: dict | None = None
    try:
        with _open_shard(shard) as f:
            compression = _compression(f)
            if compression and not limits.allow_compressed:
                errors.add("compressed_tar", shard.name, compression, "data.allow_compressed", sample=False)
                return
            for name, data in _members(f, "r|*" if compression else "r|", limits.max_member_bytes):
                member = _split(name)
                if member is None:
                    errors.add("bad_member_name", shard.name, name[:80], sample=False)
                    continue
                key, ext = member
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:  # a repeated key is caught by validate()
                    current = {"__key__": key, "__shard__": shard.name}
                if data is None:
                    too_large = f"{name[:80]} > data.max_member_mb={limits.max_member_mb:g}"
                    current.setdefault("__error__", ("member_too_large", too_large))
                else:
                    current[ext] = data
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (tarfile raises many types for bad bytes; all cost the shard's rest)
        reason = "truncated_tar" if isinstance(e, (tarfile.TarError, OSError, EOFError)) else "bad_tar"
        where = f"after {current['__key__'] if current else 'start'} ({type(e).__name__}: {e})"[:200]
        errors.add(reason, shard.name, where, sample=False)
        return  # the sample being read when the tar broke is incomplete: drop it
    if current is not None:
        yield current


def _members(f, mode: str, max_bytes: int) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of each regular file in the tar stream; data None when over ``max_bytes``."""
    with tarfile.open(fileobj=f, mode=mode) as tar:
        for info in tar:
            # directories, links and devices carry no sample data, and links are never followed
            if info.isreg() and not _META_MEMBER.match(info.name):
                yield info.name, (tar.extractfile(info).read() if info.size <= max_bytes else None)
            _skip_to_next_header(tar)  # past what was not read: a member over the limit, padding
            tar.members = []  # a stream reader keeps every header otherwise


def _skip_to_next_header(tar: tarfile.TarFile) -> None:
    """Read (and drop) up to the next header in 1 MiB steps, ending at the end of the data.

    tarfile's stream reader skips a member 10 KiB at a time even past the end of the file, so a
    header declaring terabytes (a flipped bit or a malicious shard) would spin for hours.
    """
    stream = tar.fileobj
    while stream.tell() < tar.offset:
        if not stream.read(min(1 << 20, tar.offset - stream.tell())):
            raise tarfile.ReadError(f"unexpected end of data (a member declares {tar.offset} bytes)")


def _compression(f) -> str | None:
    """The compression a tar stream starts with (its magic bytes), without consuming them."""
    head = f.peek(6)[:6]
    return next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)


def _split(name: str) -> tuple[str, str] | None:
    """``(sample key, extension)`` of a member name: the key is the full path before the first dot of
    the file name (``a/b/k.latent.npy`` → ``a/b/k``, ``latent.npy``); None if there is none."""
    name = name.removeprefix("./")  # what `tar -C dir -cf x.tar .` writes
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or dot == len(name) - 1:
        return None
    ext = name[dot + 1 :].lower()
    if ext.startswith("__"):  # would overwrite the sample's own fields (__key__, __shard__)
        return None
    return name[:dot], ext


@contextlib.contextmanager
def _open_shard(shard: Shard):
    """A local tar, or the stdout of a ``pipe:`` command (only when listed as one, see :class:`Shard`)."""
    if not shard.pipe:
        with open(shard.url, "rb") as f:
            yield f
        return
    # the command is the user's own config text (data.shards with data.allow_pipe=true), not shard data
    proc = subprocess.Popen(shard.url.removeprefix("pipe:"), shell=True, stdout=subprocess.PIPE)  # noqa: S602
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise OSError(f"{shard.url}: command exited with {proc.returncode}")
