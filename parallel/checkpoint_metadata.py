"""DCP's ``.metadata`` read without effects: no code runs, no object outside the file changes, and memory
and allocations stay proportional to the files of the checkpoint.

torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``, so a crafted checkpoint runs code when
it is exported, sampled, fine-tuned from or resumed. An allow-list of globals alone is not enough: the
pickle machinery also calls, constructs and sets attributes on what it finds (``BUILD`` on an allowed
*class* sets class attributes, so one refused file could leave ``pathlib.PosixPath`` broken for the rest
of the process), and allowed constructors copy memoized data on every call (a 0.37 MB file of
``torch.Size`` calls over one memoized list took 392 MB). So :func:`load_metadata` unpickles with
:class:`_Unpickler`, Python's own pure-Python unpickler with the opcodes that have effects replaced:

- globals: DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts (``_get_layout``), DCP's memory
  format enum and ``PosixPath`` (the globals real ``.metadata`` files hold; listed with ``pickletools`` on
  trainer checkpoints: no sets, complex numbers or slices);
- calls (``REDUCE``): those constructors only, with their arguments checked (``torch.Size``: at most
  :data:`MAX_NDIM` ints in [0, 2^61 - 1); a path: a few short strings; what they copy is charged to the
  memory budget below, so memoized arguments cannot multiply it);
- ``NEWOBJ``: a metadata dataclass without arguments (an empty new instance), and ``BUILD`` only once on
  such a fresh instance, with that dataclass's fields as state: never a class, a function or a shared
  object (an enum member, a layout);
- ``APPEND``/``SETITEM`` on real lists and dicts only (no ``append``/``__setitem__`` of other objects),
  dict keys only strings and flat ``MetadataIndex`` objects, at most 8 keys with one hash (colliding keys
  make inserting quadratic: ints hash modulo 2^61 - 1, and a tuple's hash can be solved for); no sets,
  persistent ids, extension codes, ``INST``/``OBJ``; the file at most
  :data:`MAX_METADATA_BYTES`, checked before it is read;
- memory: each opcode is charged what it may add to memory (``_COST``), at most :data:`MEMORY_PER_BYTE`
  bytes per byte of the file in all (a real file needs at most ~26 by this count; Python's own
  unpickler holds up to ~100 for a file of 1-byte opcodes that each make an empty dict or a memo entry);
  the memo is a list (DCP memoizes with ``MEMOIZE`` only), not a dict of ~100 bytes per entry.

torch's own weights-only unpickler (``torch.load(weights_only=True)``) restricts ``BUILD`` the same way,
but reads pickle protocol 2 only; DCP writes protocol 4 (``FRAME``, ``STACK_GLOBAL``, ``MEMOIZE``). A pure
Python unpickler costs ~0.5 s per MB of ``.metadata`` here (4x ``pickle.load``): seconds for a large
run's file, once per resume, export or sampling, next to reading and checksumming the checkpoint itself.

What the file describes is then checked (:func:`check_metadata`, :func:`check_storage`): field types,
every tensor's size equal to the extent of its chunks, each chunk no larger than its stored bytes, each
storage entry a plain file of the checkpoint, and the entries of a file no longer than the file, so the
tensors DCP allocates from the sizes (``torch.empty(size)`` when exporting) fit in the data on disk.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import math
import os
import pickle
import sys
from pathlib import Path, PosixPath, PurePosixPath

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md

# A real .metadata holds ~131 bytes per tensor chunk (each rank's shard of each tensor: the chunk, its
# index and its storage entry; names are memoized once) and ~1.1 KB per chunk once read. The 14B preset
# (1095 parameter tensors) with AdamW's two moments and an EMA has 4380 sharded tensors: 1 GiB holds them
# sharded over ~1870 ranks, beyond any run we plan (a file pickled as DCP does, sharded 64 ways: 36 MiB).
# With MEMORY_PER_BYTE, the cap bounds what a crafted file can cost every rank that reads it.
MAX_METADATA_BYTES = 1 << 30
MAX_NDIM = 64  # torch.Size length: real tensors have a handful of dimensions
_MAX_PATH_CHARS = 4096  # PATH_MAX
_MAX_PATH_PARTS = 256

_DATACLASSES = (
    dcp_md.Metadata,
    dcp_md.TensorStorageMetadata,
    dcp_md.BytesStorageMetadata,
    dcp_md.ChunkStorageMetadata,
    dcp_md.TensorProperties,
    dcp_md.MetadataIndex,
    dcp_md.StorageMeta,
    dcp_fs._StorageInfo,
)
_FIELDS = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in _DATACLASSES}
_REQUIRED = {
    cls: frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    for cls in _DATACLASSES
}
_MEM_FORMAT = dcp_md._MEM_FORMAT_ENCODING
_GLOBALS = {(c.__module__, c.__name__): c for c in _DATACLASSES} | {
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): _MEM_FORMAT,
    ("torch", "Size"): torch.Size,
    # a layout pickles as ``_get_layout("torch.strided")``: a lookup among torch's layouts
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    # StorageMeta.checkpoint_id is the path the checkpoint was written to
    ("pathlib", "PosixPath"): PosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
}


class CheckpointError(ValueError):
    """A checkpoint (or export) file is damaged, missing, foreign or could not be written; the message
    names the file."""


class CheckpointUnreadable(CheckpointError):
    """A file of a checkpoint could not be read: an I/O error that does not say it is absent (EIO, ESTALE,
    EACCES, EMFILE …), or no memory left. Nothing is known of its content, so the checkpoint is neither
    intact nor damaged: no fallback, nothing moved aside (a retry, once the storage answers, may find it
    whole). EACCES too: a permission is no transient fault, but it says nothing of the content either
    (a copy by another user with mode 0600): after a chmod the run resumes from its newest checkpoint,
    where a fallback would have lost the steps since the older one. The message names the file and the
    error."""


_ABSENT = (errno.ENOENT, errno.ENOTDIR)  # the file is not there: a definite finding


def absent_or_unreadable(f: Path, e: OSError, absent: str) -> str:
    """``"<f>: <absent>"`` when ``e`` says that ``f`` is not there (damage: returned); any other I/O error
    is raised as :class:`CheckpointUnreadable`."""
    if e.errno in _ABSENT:
        return f"{f}: {absent}"
    raise CheckpointUnreadable(f"{f}: could not be read ({e.strerror or e})") from e


class _Refused(Exception):
    """Something a real ``.metadata`` never holds (the message says what)."""


class _Dispatch(dict):
    def __missing__(self, op: int):
        raise _Refused(f"pickle opcode {bytes([op])!r} is not used by DCP metadata")


# CPython hashes an int modulo 2^61 - 1: below it, distinct ints hash apart (larger ones, k * (2^61 - 1),
# would all collide); sizes, offsets and lengths of real tensors are far below it
_HASH_MODULUS = sys.hash_info.modulus
# dict keys sharing one hash: a real file's MetadataIndex keys collide by chance (< 1e-6 for a pair among
# millions), a crafted one's by design (a tuple's hash can be solved for): n of them make inserting O(n^2)
_MAX_SAME_HASH = 8


# What an opcode may add to the memory of the reading process, in bytes (CPython 3.11, 64 bits; measured
# with tracemalloc on files of one opcode repeated, and sys.getsizeof, rounded up): the object it makes
# and its stack slot; any other opcode 8 (a slot of the stack, or of the memo: a list here, where a dict
# memo takes ~100 bytes per 1-byte MEMOIZE). NEWOBJ: an instance and its entry in ``fresh``; BUILD: the
# instance's attribute dict. Charged on top (``_charge``): per pair set in a dict 40 (an entry of a large
# dict, with its share of a resize) and 168 for a dict's first (its table of 5 entries); per item
# appended to a list and per element a torch.Size copies 8; a path 200; a count per MetadataIndex key
# 100. An opcode's own data (a string's characters, UCS-4 at worst; the frame being read) adds at most 5
# bytes per byte of the file.
_OP_COST = dict(
    MARK=64, EMPTY_DICT=72, EMPTY_LIST=64, TUPLE=56, TUPLE1=48, TUPLE2=56, TUPLE3=64, NEWOBJ=184, BUILD=168,
    REDUCE=64, BININT=40, BININT2=40, LONG1=40, BINFLOAT=32, SHORT_BINUNICODE=80, BINUNICODE=80,
    SHORT_BINBYTES=48, BINBYTES=48,
)  # fmt: skip
_COST = [next((c for op, c in _OP_COST.items() if getattr(pickle, op)[0] == i), 8) for i in range(256)]
_PAIR, _FIRST_PAIR, _SLOT, _PATH, _KEY_COUNT = 40, 168, 8, 200, 100
# What all opcodes of a file may take together, per byte of it: 1.5x what real .metadata files take by
# this count (up to 22 for trainer checkpoints, 25.5 for the 14B preset's state pickled as DCP does,
# sharded 64 ways; its peak measured with tracemalloc: 15). Files of 1-byte opcodes that each make an
# empty dict, a list or a memo entry took 72 to 103 before this budget (tracemalloc), 86 in RSS.
MEMORY_PER_BYTE = 40


def _is_index(v) -> bool:
    return type(v) is int and 0 <= v < _HASH_MODULUS


class _Unpickler(pickle._Unpickler):
    """See the module docstring. ``left``: the memory (bytes) the rest of the file may still take."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.left = MEMORY_PER_BYTE * len(data)
        self.memo: list = []  # DCP's pickles memoize with MEMOIZE only: a list suffices
        self.fresh: dict[int, object] = {}  # id → an instance NEWOBJ made and BUILD has not yet filled
        self.key_hashes: dict[int, int] = {}  # hash of a MetadataIndex dict key → how many keys have it

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get((module, name))
        if found is None and module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):
            found = torch.__dict__[name]
        if found is None:
            raise _Refused(
                f"refused to load {module[:100]}.{name[:100]}: DCP metadata holds only checkpoint metadata "
                f"classes, and unpickling anything else could run code (a crafted file?)"
            )
        return found

    def load(self):
        """``pickle._Unpickler.load``, charging each opcode the memory it may take (:data:`_COST`)."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readline = self._unframer.read, self._unframer.readline
        self.readinto = self._unframer.readinto
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch, cost = self.read, self.dispatch, _COST
        try:
            while key := read(1):
                self.left -= cost[key[0]]  # inline, not _charge: one call less per opcode is 15% faster
                if self.left < 0:
                    raise self._too_much()
                dispatch[key[0]](self)
            raise EOFError
        except pickle._Stop as stop:
            return stop.value

    def _charge(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise self._too_much()

    def _too_much(self) -> _Refused:
        return _Refused(
            f"reading it would take more than {MEMORY_PER_BYTE} bytes of memory per byte of the file, more "
            f"than DCP metadata takes (a crafted file?)"
        )

    def load_memoize(self):
        self.memo.append(self.stack[-1])

    def load_binget(self):
        self._recall(self.read(1)[0])

    def load_long_binget(self):
        self._recall(int.from_bytes(self.read(4), "little"))

    def _recall(self, i: int) -> None:
        if i >= len(self.memo):
            raise _Refused(f"memo entry {i} recalled before it was stored")
        self.append(self.memo[i])

    def _call(self, func, args: tuple):
        if func is torch.Size:
            (seq,) = args
            if type(seq) not in (tuple, list) or len(seq) > MAX_NDIM or not all(map(_is_index, seq)):
                raise _Refused(f"torch.Size of more than {MAX_NDIM} ints below 2^61 - 1 or of other values")
            self._charge(_SLOT * len(seq))
            return torch.Size(seq)
        if func is PosixPath or func is PurePosixPath:
            short = len(args) <= _MAX_PATH_PARTS and all(type(a) is str for a in args)
            if not short or sum(map(len, args)) > _MAX_PATH_CHARS:
                raise _Refused("a path of other values than a few strings")
            self._charge(_PATH + 4 * sum(map(len, args)))
            return func(*args)
        if func is torch.serialization._get_layout and len(args) == 1 and type(args[0]) is str:
            return func(*args)  # a lookup: a layout, or KeyError
        if func is _MEM_FORMAT and len(args) == 1 and type(args[0]) is int:
            return func(*args)  # a lookup: a member, or ValueError
        raise _Refused(
            f"a call of {type(func).__name__} {getattr(func, '__name__', '')!r} (not a constructor)"
        )

    def load_reduce(self):
        args = self.stack.pop()
        if type(args) is not tuple:
            raise _Refused("REDUCE arguments that are not a tuple")
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args, cls = self.stack.pop(), self.stack.pop()
        if not any(cls is c for c in _DATACLASSES) or args != ():
            raise _Refused(f"NEWOBJ of {getattr(cls, '__name__', type(cls).__name__)} (not a metadata class)")
        inst = object.__new__(cls)
        self.fresh[id(inst)] = inst  # kept alive here, so its id stays its own
        self.append(inst)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if self.fresh.pop(id(inst), None) is not inst:
            # a class, function or shared object: setting attributes on it would change the process
            raise _Refused(f"BUILD on a {type(inst).__name__} that is not a new metadata instance")
        cls = type(inst)
        if cls is dcp_md.TensorProperties:
            ok = (
                type(state) is tuple
                and len(state) == 5
                and isinstance(state[0], torch.dtype)
                and isinstance(state[1], torch.layout)
                and type(state[2]) is bool
                and type(state[3]) is _MEM_FORMAT
                and type(state[4]) is bool
            )
            if not ok:
                raise _Refused("TensorProperties state of other values than DCP writes")
            inst.__setstate__(state)
            return
        if type(state) is not dict or not all(type(k) is str and k in _FIELDS[cls] for k in state):
            raise _Refused(f"{cls.__name__} state with other keys than its fields")
        inst.__dict__.update(state)

    def load_append(self):
        value = self.stack.pop()
        self._charge(_SLOT)
        self._list().append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._charge(_SLOT * len(items))
        self._list().extend(items)

    def _list(self) -> list:
        if type(self.stack[-1]) is not list:
            raise _Refused("APPEND to something other than a list")
        return self.stack[-1]

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._dict_for([key])[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        d = self._dict_for(items[::2])
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]

    def _dict_for(self, keys: list) -> dict:
        """The dict on the stack, after checking that ``keys`` are what real metadata keys its dicts by
        (names, and MetadataIndex in ``storage_data``; listed on trainer checkpoints): hashing them runs
        no deep recursion and no more than :data:`_MAX_SAME_HASH` of them share a hash, so inserting costs
        O(1) each (str hashes are keyed per process; int keys, which real files never hold, are refused)."""
        d = self.stack[-1]
        if type(d) is not dict:
            raise _Refused("SETITEM on something other than a dict")
        self._charge(_PAIR * len(keys) + (0 if d else _FIRST_PAIR))
        for k in keys:
            if type(k) is str:
                continue
            if type(k) is not dcp_md.MetadataIndex or not _flat_index(k):
                raise _Refused(f"a dict key of type {type(k).__name__}")
            self._charge(_KEY_COUNT)
            h = hash(k)  # 64 bits: at most 5 such ints share a hash (mod 2^61 - 1) in key_hashes in turn
            n = self.key_hashes[h] = self.key_hashes.get(h, 0) + 1
            if n > _MAX_SAME_HASH:
                raise _Refused(f"more than {_MAX_SAME_HASH} dict keys with the same hash (a crafted file?)")
        return d

    _OPS = (
        "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 "
        "BINFLOAT SHORT_BINUNICODE BINUNICODE SHORT_BINBYTES BINBYTES EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 "
        "TUPLE3 EMPTY_LIST EMPTY_DICT GLOBAL STACK_GLOBAL"
    )
    dispatch = _Dispatch(
        {getattr(pickle, op)[0]: pickle._Unpickler.dispatch[getattr(pickle, op)[0]] for op in _OPS.split()}
    )
    dispatch |= {
        pickle.REDUCE[0]: load_reduce,
        pickle.NEWOBJ[0]: load_newobj,
        pickle.BUILD[0]: load_build,
        pickle.APPEND[0]: load_append,
        pickle.APPENDS[0]: load_appends,
        pickle.SETITEM[0]: load_setitem,
        pickle.SETITEMS[0]: load_setitems,
        pickle.MEMOIZE[0]: load_memoize,
        pickle.BINGET[0]: load_binget,
        pickle.LONG_BINGET[0]: load_long_binget,
    }


def _flat_index(k: dcp_md.MetadataIndex) -> bool:
    """A MetadataIndex whose hash is that of a string and a flat torch.Size (its fields are checked
    before it is used as a dict key: a nested tuple would make hashing recurse without bound)."""
    state = vars(k)
    return type(state.get("fqn")) is str and type(state.get("offset")) in (torch.Size, type(None))


# ---- reading -------------------------------------------------------------------------------------------
def read_capped(path: str | os.PathLike, stream=None) -> bytes:
    """The bytes of a ``.metadata`` file (from ``stream`` if given), refused unread beyond
    :data:`MAX_METADATA_BYTES`."""
    if stream is None:
        with open(path, "rb") as f:
            return read_capped(path, f)
    try:
        size = os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a plain file: the read is capped
        size = 0
    data = stream.read(MAX_METADATA_BYTES + 1) if size <= MAX_METADATA_BYTES else b""
    if size > MAX_METADATA_BYTES or len(data) > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"{path}: {max(size, len(data))} bytes, more than the {MAX_METADATA_BYTES >> 20} MiB of DCP "
            f"metadata any run we plan writes (a crafted or foreign file?)"
        )
    return data


def load_metadata(data: bytes, name: str) -> dcp_md.Metadata:
    """A DCP ``Metadata`` from the bytes of a ``.metadata`` file, unpickled without effects and checked
    (:func:`check_metadata`).

    Args:
        name: the file, for errors.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"{name}: larger than {MAX_METADATA_BYTES >> 20} MiB (a crafted or foreign file?)"
        )
    try:
        md = _Unpickler(data).load()
    except _Refused as e:
        raise CheckpointError(f"{name}: {e}") from None
    except MemoryError:  # this process's state, not the file's: found under the budget, as by any reader
        raise
    except Exception as e:  # truncated, not a pickle at all, a failed lookup
        raise CheckpointError(
            f"{name}: not a DCP metadata file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    problem = check_metadata(md)
    if problem is not None:
        raise CheckpointError(f"{name}: {problem}")
    return md


def _short(s: str) -> str:
    return repr(s if len(s) <= 120 else s[:120] + "…")


def _complete(obj) -> bool:
    """``obj`` is one of the metadata dataclasses with its required fields set and no other attributes."""
    cls = type(obj)
    if cls not in _FIELDS:
        return False
    names = vars(obj).keys()
    return names <= _FIELDS[cls] and _REQUIRED[cls] <= names


# ---- what the metadata says ------------------------------------------------------------------------------
def check_metadata(md) -> str | None:
    """The first thing in ``md`` that DCP's writer never produces, or None: wrong types, a storage entry
    outside the checkpoint's plain files, a chunk outside its tensor or larger than its stored bytes, a
    tensor larger than its chunks (DCP allocates a whole tensor from its size when exporting)."""
    if type(md) is not dcp_md.Metadata or not _complete(md):
        return f"not a DCP metadata file (holds a {type(md).__name__})"
    sdm, storage = md.state_dict_metadata, md.storage_data
    if type(sdm) is not dict or type(storage) is not dict:
        return "not a DCP metadata file (state_dict_metadata and storage_data are not dicts)"
    for key, info in storage.items():
        if not (type(key) is dcp_md.MetadataIndex and _complete(key) and _flat_index(key)):
            return "a storage key that is not the index of a named tensor or item"
        if not (key.index is None or _is_index(key.index)):
            return f"the storage key of {_short(key.fqn)} has an index that is not a count"
        if not _plain_entry(info):
            return f"the storage entry of {_short(key.fqn)} is not a plain file of this checkpoint"
    for fqn, item in sdm.items():
        if type(fqn) is not str:
            return "a state dict key that is not a string"
        if type(item) is dcp_md.BytesStorageMetadata and _complete(item):
            continue
        problem = _tensor_problem(fqn, item, storage)
        if problem is not None:
            return f"tensor {_short(fqn)}: {problem}"
    return _planner_problem(md.planner_data, len(sdm)) or _storage_meta_problem(md.storage_meta)


def _plain_entry(info) -> bool:
    """Each item lies in a plain file of the checkpoint (no path out of it) at a sane offset, untransformed
    (we write no compression or other stream transforms)."""
    return (
        type(info) is dcp_fs._StorageInfo
        and _complete(info)
        and type(info.relative_path) is str
        and info.relative_path not in ("", ".", "..")
        and "/" not in info.relative_path
        and "\\" not in info.relative_path
        and _is_index(info.offset)
        and _is_index(info.length)
        and not info.transform_descriptors
    )


def _tensor_problem(fqn: str, item, storage: dict) -> str | None:
    if type(item) is not dcp_md.TensorStorageMetadata or not _complete(item):
        return "neither tensor nor bytes metadata"
    props, size, chunks = item.properties, item.size, item.chunks
    if type(props) is not dcp_md.TensorProperties or not _complete(props):
        return "its properties are not DCP's"
    if type(size) is not torch.Size or type(chunks) is not list:
        return "its size or chunk list are not DCP's"
    covered, seen = 0, set()
    for c in chunks:
        dims_ok = type(c) is dcp_md.ChunkStorageMetadata and _complete(c)
        dims_ok = dims_ok and type(c.offsets) is torch.Size and type(c.sizes) is torch.Size
        if not dims_ok or len(c.offsets) != len(size) or len(c.sizes) != len(size):
            return f"a chunk that is not offsets and sizes in the tensor's {len(size)} dimensions"
        where = f"the chunk at {tuple(c.offsets)} of {tuple(c.sizes)}"
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, size, strict=True)):
            return f"{where} lies outside its size {tuple(size)}"
        # the entry first: ``seen`` then holds only offsets of storage keys, whose hashes were bounded
        info = storage.get(dcp_md.MetadataIndex(fqn, c.offsets))
        if info is None:
            return f"{where} has no storage entry"
        if c.offsets in seen:  # counted twice, a chunk would cover a tensor larger than its data
            return f"{where} is listed twice"
        seen.add(c.offsets)
        nbytes = math.prod(c.sizes) * props.dtype.itemsize
        if nbytes > info.length:
            return f"{where} declares {nbytes} bytes, its storage entry holds {info.length}"
        covered += math.prod(c.sizes)
    if math.prod(size) > covered:
        return (
            f"its size {tuple(size)} ({math.prod(size)} elements) is larger than its chunks ({covered} "
            f"elements): a crafted file?"
        )
    return None


def _planner_problem(planner_data, n_items: int) -> str | None:
    """``planner_data``: each flattened key's path in the nested state dict (a list index in a path is
    below the number of items: a larger one would make DCP grow a list to it)."""
    if planner_data is None:
        return None
    if type(planner_data) is not dict:
        return "planner_data is not a dict"
    for key, path in planner_data.items():
        ok = type(key) is str and type(path) is tuple and 1 <= len(path) <= MAX_NDIM
        if not ok or not all(type(p) is str or (type(p) is int and 0 <= p < n_items) for p in path):
            return f"planner_data of {_short(str(key))} is not a short path of names and list indices"
    return None


def _storage_meta_problem(sm) -> str | None:
    if sm is None:
        return None
    ok = type(sm) is dcp_md.StorageMeta and _complete(sm)
    ok = ok and type(sm.checkpoint_id) in (str, PosixPath, PurePosixPath, type(None))
    ok = ok and all(type(v) in (str, type(None)) for v in (sm.save_id, sm.load_id))
    ok = ok and type(sm.modules) is list and all(type(m) is str for m in sm.modules)
    return None if ok else "storage_meta is not DCP's"


def check_storage(md: dcp_md.Metadata, directory: Path) -> str | None:
    """The first data file that is missing or cannot hold the entries ``.metadata`` places in it (each one
    inside it, and all together no longer than it: DCP writes them one after another), or None. With
    :func:`check_metadata`, every tensor DCP allocates fits in the data files on disk."""
    per_file: dict[str, tuple[int, int]] = {}
    for info in md.storage_data.values():
        total, end = per_file.get(info.relative_path, (0, 0))
        per_file[info.relative_path] = (total + info.length, max(end, info.offset + info.length))
    for name, (total, end) in sorted(per_file.items()):
        f = directory / name
        try:
            if not f.is_file():
                return f"{f}: missing (.metadata points into it)"
            size = f.stat().st_size
        except OSError as e:
            return absent_or_unreadable(f, e, "missing (.metadata points into it)")
        if end > size:
            return f"{f}: {size} bytes, .metadata needs {end} (truncated)"
        if total > size:
            return f"{f}: .metadata places {total} bytes of entries in its {size} bytes (a crafted file?)"
    return None


def check_dcp_structure(path: Path) -> str | None:
    """``.metadata`` passes :func:`load_metadata` and every file it points into can hold its entries (all
    an old checkpoint without checksums can be checked for), or the problem. Raises
    :class:`CheckpointUnreadable` when a file could not be read (see :func:`absent_or_unreadable`)."""
    name = path / ".metadata"
    try:
        md = load_metadata(read_capped(name), str(name))
    except CheckpointUnreadable:
        raise
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return absent_or_unreadable(name, e, "missing")
    return check_storage(md, path)


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP file reader with :func:`load_metadata` in place of ``pickle.load`` and
    :func:`check_storage` on what it read."""

    def read_metadata(self, *args, **kwargs) -> dcp_md.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(read_capped(path, f), str(path))
        problem = check_storage(metadata, Path(self.path))
        if problem is not None:
            raise CheckpointError(problem)
        # as FileSystemReader.read_metadata does
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
