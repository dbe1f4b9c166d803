"""A crafted DCP ``.metadata`` has no effect on the process that reads it: no attribute of a class, function
or shared object changes (the reading falls back to an older checkpoint in the same process), no memory is
multiplied, and no tensor larger than the checkpoint's data is allocated. Real checkpoints written by DCP,
payloads assembled opcode by opcode; the effects are looked for in a fresh interpreter."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError
from parallel.checkpoint_metadata import MAX_METADATA_BYTES, SafeFileSystemReader, check_dcp_structure
from parallel.checkpoint_safety import file_sum


def _save(root, step: int) -> Path:
    state = {"model": {"w": torch.full((64,), float(step))}, "step": torch.tensor(step)}
    return ckpt.save(root, step, state, {"own": step}, rank=0)


def _replace_metadata(path: Path, data: bytes) -> None:
    """Put ``data`` in a checkpoint's ``.metadata`` and fix the marker's checksum, as an attacker would."""
    (path / ".metadata").write_bytes(data)
    m = json.loads((path / ckpt.MARKER).read_text())
    m["files"][".metadata"] = file_sum(path / ".metadata")
    (path / ckpt.MARKER).write_text(json.dumps(m))


def _run(script: str, *args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- opcodes (pickletools names) -------------------------------------------------------------------------
def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


NONE, EMPTY_DICT, EMPTY_LIST, SETITEM, TUPLE1, TUPLE2 = b"N", b"}", b"]", b"s", b"\x85", b"\x86"
BUILD, REDUCE, APPEND, MARK, APPENDS, STOP, PROTO2 = b"b", b"R", b"a", b"(", b"e", b".", b"\x80\x02"


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def _slot_state(**attrs) -> bytes:
    """``(None, {name: value})``: BUILD sets these with ``setattr`` on whatever is below on the stack."""
    items = b"".join(_str(k) + v + SETITEM for k, v in attrs.items())
    return NONE + EMPTY_DICT + items + TUPLE2


def _dict_state(**attrs) -> bytes:
    return EMPTY_DICT + b"".join(_str(k) + v + SETITEM for k, v in attrs.items())


MD = "torch.distributed.checkpoint.metadata"
# BUILD on objects that exist before the file is read: an allow-listed class, a function, an enum member
POISON = {
    "class": _global("pathlib", "PosixPath") + _slot_state(__truediv__=_str("poisoned")) + BUILD,
    "dataclass": _global(MD, "ChunkStorageMetadata") + _slot_state(__repr__=_str("poisoned")) + BUILD,
    "function": _global("torch.serialization", "_get_layout")
    + _dict_state(cache=EMPTY_DICT + _str("torch.strided") + _str("poisoned") + SETITEM)
    + BUILD,
    "enum_member": _global(MD, "_MEM_FORMAT_ENCODING")
    + _int(0)
    + TUPLE1
    + REDUCE
    + _dict_state(_value_=_int(7))
    + BUILD,
}

_POISON_CHILD = """
import json, logging, sys
from pathlib import Path, PosixPath
import torch
from torch.distributed.checkpoint import metadata as md
from parallel import checkpoint as ckpt
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
root = Path(sys.argv[1])
out = {}
for case in sys.argv[2:]:
    found = ckpt.latest(root / case)  # skips the crafted step 2 for step 1, in this same process
    error = ""
    try:
        ckpt.verify(root / case / "step-00000002")
    except ckpt.CheckpointError as e:
        error = str(e)
    out[case] = {
        "found": found.name,
        "error": error,
        "weights": ckpt.read_full(found, {"model"})["model"]["w"].tolist()[:2],
        "path_ok": Path("/tmp") / "a" == PosixPath("/tmp/a"),
        "repr_ok": callable(md.ChunkStorageMetadata.__repr__),
        "layout_ok": torch.serialization._get_layout("torch.strided") is torch.strided,
        "enum_ok": md._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT.value == 0,
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_build_on_existing_objects_is_refused_and_changes_nothing(tmp_path):
    template = tmp_path / "template"
    for step in (1, 2):
        _save(template, step)
    for case, payload in POISON.items():
        shutil.copytree(template, tmp_path / case)
        _replace_metadata(tmp_path / case / "step-00000002", PROTO2 + payload + STOP)
    got = _run(_POISON_CHILD, tmp_path, *POISON)
    for case, r in got.items():
        assert r["found"] == "step-00000001" and r["weights"] == [1.0, 1.0], case
        assert str(tmp_path / case / "step-00000002" / ".metadata") in r["error"], case
        assert "BUILD on a" in r["error"] and "not a new metadata instance" in r["error"], case
        assert r["path_ok"] and r["repr_ok"] and r["layout_ok"] and r["enum_ok"], (case, r)


# ---- hash collisions -------------------------------------------------------------------------------------
_M64 = (1 << 64) - 1
_XX1, _XX2, _XX5 = 11400714785074694791, 14029467366897019727, 2870177450012600261  # CPython's tuple hash
_MOD = (1 << 61) - 1  # the modulus of CPython's int hash: the ints k * _MOD all hash to 0
N_KEYS = 20_000
MEMOIZE, EMPTY_TUPLE, NEWOBJ, SETITEMS, POP, PROTO4 = b"\x94", b")", b"\x81", b"u", b"0", b"\x80\x04"


def _first_lane(a: int) -> int:
    """CPython's tuple hash accumulator after a first element that hashes to ``a``."""
    acc = (_XX5 + a * _XX2) & _M64
    return (((acc << 31) | (acc >> 33)) & _M64) * _XX1 & _M64


def _colliding_offsets(n: int) -> list[tuple[int, int]]:
    """``n`` 2-d offsets ``(a, b)``, every int below 2^61 - 1 (so it hashes to itself), whose tuples hash
    alike: ``b`` is solved for from ``a`` so that the accumulators meet after the second element."""
    inv, target, out, a = pow(_XX2, -1, 1 << 64), _first_lane(0), [], 0
    while len(out) < n:
        b = (target - _first_lane(a)) * inv & _M64
        if b < _MOD:
            out.append((a, b))
        a += 1
    return out


def _long(i: int) -> bytes:
    data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _dict_of(keys: list[bytes], prelude: bytes = b"") -> bytes:
    """A dict of ``keys`` (each the opcodes pushing one key) to None, in SETITEMS of 1000 as pickle writes."""
    batches = (keys[i : i + 1000] for i in range(0, len(keys), 1000))
    body = b"".join(MARK + b"".join(k + NONE for k in batch) + SETITEMS for batch in batches)
    return PROTO4 + prelude + EMPTY_DICT + body + STOP


def _index_keys(offsets: list[tuple[int, ...]]) -> bytes:
    """A dict of MetadataIndex keys of one tensor at ``offsets``, built as DCP pickles them."""
    prelude = _global(MD, "MetadataIndex") + MEMOIZE + _global("torch", "Size") + MEMOIZE  # memo 0, 1
    prelude += _str("w") + MEMOIZE + _str("fqn") + MEMOIZE + _str("offset") + MEMOIZE + POP  # 2, 3, 4

    def key(offset) -> bytes:
        size = _get(1) + EMPTY_LIST + MARK + b"".join(map(_long, offset)) + APPENDS + TUPLE1 + REDUCE
        state = EMPTY_DICT + _get(3) + _get(2) + SETITEM + _get(4) + size + SETITEM
        return _get(0) + EMPTY_TUPLE + NEWOBJ + state + BUILD

    return _dict_of([key(o) for o in offsets], prelude)


COLLIDING = {
    "int_keys": ([k * _MOD for k in range(1, N_KEYS + 1)], "a dict key of type int"),
    # 7-d offsets of multiples of the modulus below the old bound of 2^63: 5^7 of them, all hashing alike
    "offsets_beyond_the_hash_modulus": (
        [
            tuple(k * _MOD for k in ks)
            for ks in itertools.islice(itertools.product(range(5), repeat=7), N_KEYS)
        ],
        "torch.Size of more than 64 ints below 2^61 - 1",
    ),
    "colliding_index_keys": (_colliding_offsets(N_KEYS), "more than 8 dict keys with the same hash"),
}


class _Quadratic(BaseException):
    """Past the key comparisons only a quadratic insertion makes (escapes the reader's ``except
    Exception``, so an unprotected reader fails here in seconds, not after minutes)."""


@pytest.mark.parametrize("kind", COLLIDING)
def test_keys_whose_hashes_collide_are_refused_before_insertion(kind, tmp_path, monkeypatch):
    """CPython hashes ints modulo 2^61 - 1 and tuples with a hash that can be solved for: n dict keys with
    one hash make inserting them O(n^2) (20000 int keys, a 259 kB file, took 2.2 s; a 13 MB file ~1.5 h).
    Refused for what is wrong with them; the deterministic measure of the work is the count of key
    comparisons (calls of MetadataIndex.__eq__), at most 8 per key."""
    from torch.distributed.checkpoint import metadata as dcp_md

    from parallel.checkpoint_metadata import load_metadata

    keys, reason = COLLIDING[kind]
    if kind == "int_keys":
        data = _dict_of([_long(k) for k in keys])
    else:  # the test's own premise: these keys do share one hash
        assert len({hash(dcp_md.MetadataIndex("w", torch.Size(o))) for o in keys}) == 1
        data = _index_keys(keys)
    compared, eq = [0], dcp_md.MetadataIndex.__eq__

    def counting_eq(a, b):
        compared[0] += 1
        if compared[0] > 8 * N_KEYS:
            raise _Quadratic(f"{compared[0]} key comparisons for {N_KEYS} keys")
        return eq(a, b)

    monkeypatch.setattr(dcp_md.MetadataIndex, "__eq__", counting_eq)
    f = tmp_path / ".metadata"
    with pytest.raises(CheckpointError, match=re.escape(reason)) as e:
        load_metadata(data, str(f))
    assert str(e.value).startswith(f"{f}: ")
    assert compared[0] <= 8 * N_KEYS


# ---- memory ----------------------------------------------------------------------------------------------
def _amplifier(module: str, name: str, n: int = 20_000, calls: int = 1000) -> bytes:
    """A list of ``n`` ints, memoized once, passed to ``module.name`` ``calls`` times (each result kept):
    an unpickler that lets the call copy its argument holds ``n * calls`` items from ``5 n`` bytes."""
    ints = EMPTY_LIST + MARK + b"".join(_int(1000 + i) for i in range(n)) + APPENDS
    call = _get(0) + _get(1) + TUPLE1 + REDUCE + APPEND
    return PROTO4 + _global(module, name) + MEMOIZE + ints + MEMOIZE + EMPTY_LIST + call * calls + STOP


_MEMORY_CHILD = """
import json, resource, sys
from parallel.checkpoint import CheckpointError
from parallel.checkpoint_metadata import load_metadata
files = sys.argv[1:]
datas = [open(f, "rb").read() for f in files]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
errors = []
for f, data in zip(files, datas):
    try:
        load_metadata(data, f)
        errors.append("")
    except CheckpointError as e:
        errors.append(str(e))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"increase": (peak - before) * 1024, "errors": errors}))
"""


@pytest.mark.slow
def test_constructors_cannot_multiply_memoized_data(tmp_path):
    """torch.Size (and sets, which real metadata never holds) over one memoized list, a thousand times:
    refused, and the reading process's peak memory grows by no more than a small multiple of the files."""
    files = []
    for module, name in (("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset")):
        f = tmp_path / f"{name}.metadata"
        f.write_bytes(_amplifier(module, name))
        files.append(f)
    got = _run(_MEMORY_CHILD, *files)
    total = sum(f.stat().st_size for f in files)
    assert all(str(f) in e for f, e in zip(files, got["errors"], strict=True)), got["errors"]
    assert "torch.Size of more than 64" in got["errors"][0]
    assert "refused to load builtins.set" in got["errors"][1]
    assert got["increase"] < (16 << 20) + 10 * total, f"peak memory grew by {got['increase'] >> 20} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["MEMOIZE", "EMPTY_DICT", "MARK"])
def test_files_of_one_byte_allocations_stay_within_a_memory_budget(kind, tmp_path):
    """Every rank reads .metadata: a file of 1-byte opcodes that each make an object took 72 to 86 bytes
    of memory (RSS) per byte of it (a 19 MiB MEMOIZE file: +1.3 GiB; one at the 1 GiB cap: ~86 GiB on
    every rank). Here the memo is a list (8 bytes per entry) and every opcode is charged what it may
    take, at most 40 bytes per byte of the file: refused naming the file, the peak measured in a fresh
    interpreter."""
    f = tmp_path / f"{kind}.metadata"
    op = {"MEMOIZE": NONE + MEMOIZE, "EMPTY_DICT": EMPTY_DICT, "MARK": MARK}[kind]
    f.write_bytes(PROTO4 + op * 2_800_000 + STOP)  # just past a resize of a dict memo: 2/3 of 2^22
    got = _run(_MEMORY_CHILD, f)
    ratio = got["increase"] / f.stat().st_size  # 60 to 63 before the budget, 2 to 33 with it
    assert ratio < 48, f"peak memory grew by {ratio:.0f} bytes per byte of the file"
    (error,) = got["errors"]
    assert error.startswith(f"{f}: "), error
    if kind != "MEMOIZE":  # memo entries fit the budget: refused for what the file holds (None)
        assert "more than 40 bytes of memory per byte of the file" in error


def _sharded_metadata(ways: int) -> bytes:
    """DCP's metadata for 100 tensors of a model, AdamW's two moments and an EMA (2-d, 1-d and scalar),
    each sharded ``ways`` ways along dim 0 as FSDP does, pickled as DCP's writer pickles it."""
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    sdm, storage, planner, ends = {}, {}, {}, [0] * ways
    props = md.TensorProperties(dtype=torch.float32)
    shapes = [(1024, 64), (1024,), ()] * 33 + [(64, 16, 2, 2, 2)]
    for i, shape in enumerate(shapes):
        for prefix in ("model", "ema", "optim.state.model.exp_avg", "optim.state.model.exp_avg_sq"):
            fqn, chunks = f"{prefix}.blocks.{i // 3}.param{i % 3}", []
            shards = [((), ())] if not shape else []  # a scalar is one chunk
            for r in range(ways if shape else 0):
                lo, hi = r * shape[0] // ways, (r + 1) * shape[0] // ways
                shards.append(((lo,) + (0,) * (len(shape) - 1), (hi - lo, *shape[1:])))
            for r, (offsets, sizes) in enumerate(shards):
                offsets, sizes = torch.Size(offsets), torch.Size(sizes)
                n = 4 * math.prod(sizes)
                storage[md.MetadataIndex(fqn, offsets, len(chunks))] = _StorageInfo(
                    f"__{r}_0.distcp", ends[r], n
                )
                chunks.append(md.ChunkStorageMetadata(offsets, sizes))
                ends[r] += n
            sdm[fqn] = md.TensorStorageMetadata(props, torch.Size(shape), chunks)
            planner[fqn] = tuple(fqn.split(".", 1))
    meta = md.StorageMeta(checkpoint_id=Path("/runs/a/checkpoints/.tmp-step-00000001"), save_id="s")
    return pickle.dumps(md.Metadata(sdm, planner, storage, storage_meta=meta))


@pytest.mark.parametrize("ways", [1, 16])
def test_real_metadata_fits_the_memory_budget_with_a_margin(ways):
    """The budget is 1.5x what real files take (chunks are what large files hold): a model's state
    sharded 1 and 16 ways reads as pickle reads it, within 70% of the budget."""
    from parallel.checkpoint_metadata import MEMORY_PER_BYTE, _Unpickler, load_metadata

    data = _sharded_metadata(ways)
    assert load_metadata(data, "m") == pickle.loads(data)  # our own file
    reader = _Unpickler(data)
    reader.load()
    used = MEMORY_PER_BYTE - reader.left / len(data)
    assert used < 0.7 * MEMORY_PER_BYTE, f"{used:.1f} bytes per byte of {len(data)} bytes"


def test_metadata_larger_than_the_cap_is_refused_unread(tmp_path):
    path = _save(tmp_path / "c", 1)
    with open(path / ".metadata", "r+b") as f:
        f.truncate(MAX_METADATA_BYTES + 1)  # sparse: no disk, and never read
    said = rf"{path / '.metadata'}: \d+ bytes, more than the 1024 MiB"
    with pytest.raises(CheckpointError, match=said):
        SafeFileSystemReader(str(path)).read_metadata()  # what DCP reads through
    assert re.match(said, check_dcp_structure(path))  # what verification reads through


# ---- sizes that the data cannot hold ---------------------------------------------------------------------
def _alter(path: Path, change) -> None:
    md = pickle.loads((path / ".metadata").read_bytes())  # our own file, written by this test
    change(md)
    _replace_metadata(path, pickle.dumps(md))


def _huge_tensor(md) -> None:
    md.state_dict_metadata["model.w"].size = torch.Size([2**40])


def _huge_chunk(md) -> None:
    w = md.state_dict_metadata["model.w"]
    w.size = w.chunks[0].sizes = torch.Size([2**20, 2**20])
    w.chunks[0].offsets = torch.Size([0, 0])
    (key,) = [k for k in md.storage_data if k.fqn == "model.w"]
    md.storage_data[type(key)("model.w", torch.Size([0, 0]))] = md.storage_data.pop(key)


def _huge_entry(md) -> None:
    _huge_chunk(md)
    md.storage_data[next(k for k in md.storage_data if k.fqn == "model.w")].length = 2**42


def _repeated_chunk(md) -> None:
    """One chunk listed a thousand times: a tensor a thousand times its stored data."""
    w = md.state_dict_metadata["model.w"]
    w.chunks = w.chunks * 1000
    w.size = torch.Size([64 * 1000])


def _shared_entry(md) -> None:
    """Many tensors, each within its own chunk and entry, all pointing at the same bytes of the file."""
    w = md.state_dict_metadata["model.w"]
    (key,) = [k for k in md.storage_data if k.fqn == "model.w"]
    for i in range(1000):
        md.state_dict_metadata[f"model.w{i}"] = w
        md.storage_data[type(key)(f"model.w{i}", key.offset)] = md.storage_data[key]


HUGE = {
    "tensor_beyond_its_chunks": (
        _huge_tensor,
        r"\.metadata: tensor 'model\.w': its size \(1099511627776,\)",
    ),
    "chunk_beyond_its_entry": (
        _huge_chunk,
        r"\.metadata: tensor 'model\.w': the chunk at .* declares 4398046511104 bytes",
    ),
    "chunk_listed_twice": (
        _repeated_chunk,
        r"\.metadata: tensor 'model\.w': the chunk at \(0,\) of \(64,\) is listed twice",
    ),
    "entry_beyond_its_file": (_huge_entry, r"__0_0\.distcp: \d+ bytes, \.metadata needs \d+"),
    "entries_sharing_bytes": (
        _shared_entry,
        r"__0_0\.distcp: \.metadata places \d+ bytes of entries in its \d+",
    ),
}


@pytest.mark.parametrize("kind", HUGE)
def test_tensor_sizes_the_data_cannot_hold_are_refused(kind, tmp_path):
    """Exporting allocates every tensor whole from its declared size (``torch.empty(size)``): a 2^40-element
    tensor, or a thousand tensors on the same bytes, is refused first, naming the file."""
    change, what = HUGE[kind]
    path = _save(tmp_path / "c", 1)
    _alter(path, change)
    with pytest.raises(CheckpointError, match=what):
        ckpt.read_full(path, {"model"})  # export, init.from
    with pytest.raises(CheckpointError, match=what):
        ckpt.verify(path)  # resume: refused before DCP reads it


def test_real_metadata_reads_as_pickle_does(tmp_path):
    path = _save(tmp_path / "c", 3)
    from parallel.checkpoint_metadata import load_metadata

    data = (path / ".metadata").read_bytes()
    assert load_metadata(data, "m") == pickle.loads(data)  # our own file
    assert ckpt.read_full(path, {"model"})["model"]["w"].tolist() == [3.0] * 64
