"""The shard writer reports and skips every bad source row or file and still writes the good ones:
a bad caption file, a caption that is a directory, a dangling symlink, a bad CSV/JSONL row (named by
file and 1-based line). Nothing aborts the job."""

import json
import subprocess
import sys
import tarfile

import pytest

from data.shards import list_sources, write_shards
from data.video import encode_h264
from tests.data.conftest import gradient_clip


def _names(out, index) -> list[str]:
    names = []
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            names += tar.getnames()
    return sorted(names)


@pytest.mark.slow
def test_folder_with_bad_captions_and_a_dangling_symlink_still_writes_the_good_clips(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    clip = encode_h264(gradient_clip(8, 32, 32), fps=8)
    for name in ("good", "latin1", "dircap"):
        (src / f"{name}.mp4").write_bytes(clip)
    (src / "good.txt").write_text("a good clip")
    (src / "latin1.txt").write_bytes("un café".encode("latin-1"))  # not UTF-8
    (src / "dircap.txt").mkdir()  # a caption path that is a directory
    (src / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (src / "gone.txt").write_text("its video is missing")
    proc = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 1 and _names(out, index) == ["good.json", "good.mp4", "good.txt"]
    skipped = {kind: [row["source"] for row in rows] for kind, rows in index["skipped"].items()}
    assert skipped == {
        "bad_caption": [str(src / "latin1.txt")],
        "unreadable_caption": [str(src / "dircap.txt")],
        "dangling_symlink": [str(src / "gone.mp4")],
    }
    assert index["skipped_total"] == 3


def _rows(index, kind="bad_row") -> list[tuple[str, int]]:
    return [(row["source"], row["line"]) for row in index["skipped"].get(kind, [])]


def test_bad_csv_rows_are_skipped_with_their_line(tmp_path):
    (tmp_path / "a.mp4").write_bytes(encode_h264(gradient_clip(8, 32, 32), fps=8))
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(
        b"path,caption,start,end\n"
        b"a.mp4,first,0,0.5\n"
        b"a.mp4,bad start,abc,\n"  # line 3
        b"a.mp4,bad end,0,nan\n"  # line 4
        b"a.mp4,caf\xe9 in latin-1,,\n"  # line 5: not UTF-8
        b",no path,,\n"  # line 6
        b"a.mp4,second,0.5,\n"
    )
    index = write_shards(list_sources(manifest), tmp_path / "out")
    assert index["samples"] == 2
    assert _rows(index) == [(str(manifest), 3), (str(manifest), 4), (str(manifest), 5), (str(manifest), 6)]
    assert "'start'='abc'" in index["skipped"]["bad_row"][0]["detail"]


@pytest.mark.slow
def test_bad_jsonl_rows_are_skipped_with_their_own_line(tmp_path):
    (tmp_path / "a.mp4").write_bytes(encode_h264(gradient_clip(8, 32, 32), fps=8))
    manifest = tmp_path / "m.jsonl"
    lines = [
        b'{"path": "a.mp4", "caption": "one"}',
        b'{"path": "a.mp4", "caption": 5}',  # 2: caption not a string
        b"",
        b'{"path": "a.mp4", "caption": "unterminated',  # 4: malformed
        b"[1, 2]",  # 5: not an object
        b'{"path": "a.mp4", "caption": "caf\xe9"}',  # 6: not UTF-8
        b'{"path": "a.mp4", "caption": "two", "start": "soon"}',  # 7
        b'{"path": "a.mp4", "caption": "three", "start": 0.25}',
    ]
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    proc = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", str(manifest), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["samples"] == 2
    assert _rows(index) == [(str(manifest), n) for n in (2, 4, 5, 6, 7)]
    assert all(f"{manifest}:{row['line']}" in row["detail"] for row in index["skipped"]["bad_row"])


@pytest.mark.slow
def test_manifest_rows_naming_no_file_are_skipped_through_the_cli(tmp_path):
    """``/``, ``.``, ``..``, a trailing ``/``, a NUL byte and a symlink loop each cost their row (named
    by file and line), in JSONL and CSV alike; pathlib and the OS raising on them never ends the job."""
    (tmp_path / "a.mp4").write_bytes(encode_h264(gradient_clip(8, 32, 32), fps=8))
    (tmp_path / "loop.mp4").symlink_to("loop.mp4")
    bad = ["/", ".", "..", "clips/", "a\0.mp4", "loop.mp4"]
    rows = [{"path": "a.mp4", "caption": "one"}] + [{"path": p, "caption": "bad"} for p in bad]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "m.csv"
    csv.write_text("path,caption\n" + "".join(f'"{r["path"]}",{r["caption"]}\n' for r in rows))
    for manifest in (jsonl, csv):
        out = tmp_path / f"out-{manifest.suffix[1:]}"
        proc = subprocess.run(
            [sys.executable, "-m", "data.shards", "write", str(manifest), str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        index = json.loads((out / "index.json").read_text())
        assert index["samples"] == 1 and _names(out, index) == ["a.json", "a.mp4", "a.txt"]
        first = 1 if manifest is jsonl else 2  # the CSV's line 1 is its header
        assert _rows(index) == [(str(manifest), first + n) for n in range(1, len(bad) + 1)]
        details = [row["detail"] for row in index["skipped"]["bad_row"]]
        assert "NUL" in details[4] and "directory" in details[3]
        assert "symlink loop" in details[5].lower() or "too many levels" in details[5].lower()
