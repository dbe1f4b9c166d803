"""Reading one shard: a local tar (or, opted in, a command's stdout) → raw samples, within limits.

Whether a shard is a command is decided once, when ``data.shards`` is listed (:class:`Shard`), and
never again from the file's name: a file called ``pipe:rm -rf ~ #.tar`` found by a glob is a file.
The tar is read as a stream, member by member, and only what a sample can use enters memory: a member
over ``max_member_mb``, the members of a sample past ``max_sample_mb`` in all, a member whose
extension the loader does not know, and an extended header (PAX, GNU long name, sparse map) over
64 KiB are stepped over in bounded reads. A compressed tar (which would inflate a small file into
gigabytes) is refused unless ``allow_compressed``. A sample is every member sharing one full path
prefix (``a/k.mp4`` and ``c/k.txt`` are two samples, never merged); its key joins that path's
components with ``__`` (``imgs/k1.png`` → ``imgs__k1``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from data.video import DEFAULT_MAX_PIXELS, IMAGE_EXTS, VIDEO_EXTS

# magic bytes of the compressions tarfile's "r|*" would inflate on the fly (and zstd, for the message)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members: not samples
# the members a sample can use; any other is stepped over unread (validate still counts the sample)
KNOWN_EXTS = (
    frozenset(VIDEO_EXTS) | frozenset(IMAGE_EXTS) | {"txt", "json", "latent.npy", "text.npy", "text_mask.npy"}
)
# a PAX or GNU long-name header holds a path (PATH_MAX is 4096) and a few numbers
MAX_EXTENDED_HEADER = 64 << 10


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
    """Largest picture (width × height) decoded (a video frame: at most ``MAX_VIDEO_PIXELS``)."""
    max_member_mb: float = 1024.0
    """Largest tar member read into memory (MiB)."""
    allow_compressed: bool = False
    """Read gzip/bz2/xz tars."""
    max_sample_mb: float | None = None
    """Largest sum of one sample's members read into memory (MiB); None: twice ``max_member_mb`` (the
    media plus its small sidecars, or a latent plus its text states)."""

    def __post_init__(self) -> None:
        # an infinite size would reach int() in every shard (an OverflowError costing each whole shard)
        checks = [("max_pixels", self.max_pixels, ">= 1"), ("max_member_mb", self.max_member_mb, "> 0")]
        if self.max_sample_mb is not None:
            checks.append(("max_sample_mb", self.max_sample_mb, "> 0 (or null: 2 × max_member_mb)"))
        for name, value, rule in checks:
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value >= 1 if name == "max_pixels" else value > 0)):
                raise ValueError(f"data.{name}={value}: must be a finite number {rule}")

    @property
    def max_member_bytes(self) -> int:
        return int(self.max_member_mb * 2**20)

    @property
    def max_sample_bytes(self) -> int:
        return int((self.max_sample_mb or 2 * self.max_member_mb) * 2**20)


def read_shard(shard: Shard | str, errors, limits: Limits = Limits()) -> Iterator[dict]:  # noqa: B008
    """Samples ``{"__key__", "__shard__", ext: bytes, …}`` of one tar; a broken tar ends early.

    A plain ``str`` is always a file. A sample that cannot be used as read (a path with no safe key, a
    member or the whole sample over its size limit, a member tarfile cannot hand over safely) comes
    with ``"__error__": (reason, detail)`` and no data, for :func:`data.stream.validate` to count. A
    member with an extension not in :data:`KNOWN_EXTS` is there with the value None: never read.

    Args:
        shard: the shard.
        errors: a :class:`data.stream.Errors`, for skips that are not samples (a bad tar or member name).
        limits: size limits.
    """
    shard = shard if isinstance(shard, Shard) else Shard(str(shard))
    current: dict | None = None
    path, used = "", 0  # the sample's full path prefix (its identity) and the bytes read for it
    try:
        with _open_shard(shard) as f:
            compression = _compression(f)
            if compression and not limits.allow_compressed:
                errors.add("compressed_tar", shard.name, compression, "data.allow_compressed", sample=False)
                return
            max_extended = min(MAX_EXTENDED_HEADER, limits.max_member_bytes)
            for info, read in _members(f, "r|*" if compression else "r|", max_extended):
                member = _split(info.name)
                if member is None:
                    errors.add("bad_member_name", shard.name, info.name[:80], sample=False)
                    continue
                if current is not None and member[0] != path:
                    yield current
                    current = None
                if current is None:  # a repeated key is caught by validate()
                    path, used = member[0], 0
                    current = _new_sample(path, shard.name)
                ext = member[1]
                refusal = _refusal(info, ext, used, limits)
                if refusal is not None:
                    # what was read of it is dropped: a refused sample holds no data
                    current = {k: v for k, v in current.items() if k.startswith("__")}
                    current.setdefault("__error__", refusal)
                elif "__error__" in current:
                    continue  # refused already: nothing more of it is read
                elif ext not in KNOWN_EXTS:
                    current[ext] = None
                else:
                    current[ext] = read()
                    used += info.size
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (tarfile raises many types for bad bytes; all cost the shard's rest)
        reason = "truncated_tar" if isinstance(e, (tarfile.TarError, OSError, EOFError)) else "bad_tar"
        where = f"after {current['__key__'] if current else 'start'} ({type(e).__name__}: {e})"[:200]
        errors.add(reason, shard.name, where, sample=False)
        return  # the sample being read when the tar broke is incomplete: drop it
    if current is not None:
        yield current


def _new_sample(path: str, shard: str) -> dict:
    key = sample_key(path)
    if key is None:  # the raw path names it in the skip count
        return {"__key__": path, "__shard__": shard, "__error__": ("unsafe_key", path[:80])}
    return {"__key__": key, "__shard__": shard}


def _refusal(info: tarfile.TarInfo, ext: str, used: int, limits: Limits) -> tuple[str, str] | None:
    """Why a member of a sample that has ``used`` bytes so far is not read, or None."""
    name = info.name[:80]
    if getattr(info, "refused", None):
        return info.refused
    if ext not in KNOWN_EXTS:
        return None  # never read, so it costs nothing
    if info.size > limits.max_member_bytes:
        return "member_too_large", f"{name} > data.max_member_mb={limits.max_member_mb:g}"
    if used + info.size > limits.max_sample_bytes:
        return "sample_too_large", f"{name} brings it over {limits.max_sample_bytes / 2**20:g} MiB"
    return None


def sample_key(path: str) -> str | None:
    """The key of the sample whose members share ``path`` (their name before the extension, a leading
    ``./`` already dropped): its components joined by ``__`` (``imgs/k1`` → ``imgs__k1``).

    None for an absolute path or one with an empty, ``.``, ``..`` or hidden (``.x``) component. The
    key must still match the loader's key pattern (:func:`data.stream.validate`), and two paths that
    join to one key are a ``duplicate_key`` there.
    """
    parts = path.split("/")
    if any(not part or part.startswith(".") for part in parts):
        return None
    return "__".join(parts)


def _members(f, mode: str, max_extended: int) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """``(info, read)`` of each regular file in the tar stream; ``read()`` returns its bytes, and
    whatever the caller leaves unread is stepped over before the next header."""
    with tarfile.open(fileobj=f, mode=mode, tarinfo=_bounded_info(max_extended)) as tar:
        for info in tar:
            # directories, links and devices carry no sample data, and links are never followed
            if info.isreg() and not _META_MEMBER.match(info.name):
                yield info, tar.extractfile(info).read
            _skip_to_next_header(tar)  # past what was not read: a refused member, padding
            tar.members = []  # a stream reader keeps every header otherwise


def _skip_to_next_header(tar: tarfile.TarFile) -> None:
    """Read (and drop) up to the next header in 1 MiB steps, ending at the end of the data.

    tarfile's stream reader skips a member 10 KiB at a time even past the end of the file, so a
    header declaring terabytes (a flipped bit or a malicious shard) would spin for hours.
    """
    _skip(tar.fileobj, tar.offset - tar.fileobj.tell())


def _skip(stream, n: int) -> None:
    """Read and drop ``n`` bytes of ``stream`` in 1 MiB steps; ReadError at the end of the data."""
    end = stream.tell() + n
    while stream.tell() < end:
        if not stream.read(min(1 << 20, end - stream.tell())):
            raise tarfile.ReadError(f"unexpected end of data (a header declares data up to byte {end})")


@functools.lru_cache
def _bounded_info(max_extended: int) -> type[tarfile.TarInfo]:
    return type("BoundedTarInfo", (_BoundedTarInfo,), {"max_extended": max_extended})


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that reads no extended header over ``max_extended`` bytes and no sparse map.

    tarfile reads a PAX or GNU long-name header's whole payload, and every block of a sparse map, into
    memory before the member they describe is seen. Here an oversize header is stepped over unread and
    the member after it carries ``refused``; sparse members (which no webdataset writer makes) are
    refused without keeping their maps. ``refused`` is ``(reason, detail)`` for validate() to count.
    """

    max_extended = MAX_EXTENDED_HEADER
    refused: tuple[str, str] | None = None

    def _proc_pax(self, tarfile_):
        if self.size > self.max_extended:
            return self._refuse_next(tarfile_, "PAX")
        return super()._proc_pax(tarfile_)

    def _proc_gnulong(self, tarfile_):
        if self.size > self.max_extended:
            return self._refuse_next(tarfile_, "GNU long-name")
        return super()._proc_gnulong(tarfile_)

    def _refuse_next(self, tarfile_, kind: str):
        _skip(tarfile_.fileobj, self._block(self.size))
        try:
            member = self.fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        why = f"{member.name[:80]}: a {kind} header of {self.size} bytes (limit {self.max_extended})"
        member.offset, member.refused = self.offset, ("member_too_large", why)
        return member

    def _proc_sparse(self, tarfile_):
        _, extended, _ = self._sparse_structs
        del self._sparse_structs
        while extended:  # the map goes on in 512-byte blocks: step over them, keeping none
            block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data in a sparse map")
            extended = bool(block[504])
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)
        self.refused = _sparse(self)
        return self

    # PAX-described sparse files (GNU formats 0.0, 0.1, 1.0): refused before their maps are parsed.
    # Only the member is used: what CPython passes after it differs between releases (0.0 gets the
    # raw headers instead of the header block since the CVE-2024-6232 fix), and a mismatch would be a
    # TypeError costing the rest of the shard.
    def _proc_gnusparse_00(self, member, *_):
        member.refused = _sparse(member)

    def _proc_gnusparse_01(self, member, *_):
        member.refused = _sparse(member)

    def _proc_gnusparse_10(self, member, *_):
        member.refused = _sparse(member)


def _sparse(member: tarfile.TarInfo) -> tuple[str, str]:
    return "unsupported_member", f"{member.name[:80]}: a GNU sparse file"


def _compression(f) -> str | None:
    """The compression a tar stream starts with (its magic bytes), without consuming them."""
    head = f.peek(6)[:6]
    return next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)


def _split(name: str) -> tuple[str, str] | None:
    """``(sample path, extension)`` of a member name: the path is everything before the first dot of
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
