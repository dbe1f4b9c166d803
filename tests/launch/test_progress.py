"""The progress bar and plain lines (``run.progress``): log records and printed lines go above the bar,
never glued onto it; steps/s and ETA from this process's recent steps; readable numbers; the same facts
in plain lines; nothing from the other ranks. Unit tests with an injected clock and a StringIO stream,
then one real training run with the bar forced and one in plain lines."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest
import torch

import launch.progress as progress_module
from launch.progress import (
    Progress,
    ProgressHandler,
    StepRate,
    _show_warning,
    fmt_duration,
    fmt_loss,
    fmt_lr,
)
from tests.launch.conftest import run, train_cmd

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # launch.train's
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Clock:
    """A clock the test moves: no sleeping, no timed asserts."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: ``\\r`` returns to column 0, ``ESC[K`` erases to the end
    of the line, ``\\n`` starts a new line, anything else overwrites. (A bar that is not erased before
    a shorter log line leaves its tail visible after it: the split-on-\\r check alone misses that.)"""
    lines, cur, col = [], [], 0
    i = 0
    while i < len(text):
        c = text[i]
        if text.startswith("\x1b[K", i):
            del cur[col:]
            i += 3
            continue
        if c == "\r":
            col = 0
        elif c == "\n":
            lines.append("".join(cur))
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = c
            else:
                cur.append(c)
            col += 1
        i += 1
    lines.append("".join(cur))
    return lines


def segments(text: str) -> list[str]:
    return [s for s in (ANSI.sub("", x) for x in re.split(r"[\r\n]", text)) if s.strip()]


def assert_not_glued(text: str, n_records: int) -> None:
    """Every piece of output holding a log record starts with its timestamp, no bar piece holds a
    timestamp, and on the emulated terminal every log line is the record alone."""
    segs = segments(text)
    logged = [s for s in segs if STAMP.search(s)]
    assert len(logged) == n_records, segs
    for s in logged:
        assert STAMP.match(s), f"something before the log record: {s!r}"
        assert "steps/s" not in s and "ETA" not in s, f"bar text in a log line: {s!r}"
    shown = screen(text)
    records = [s for s in shown if STAMP.search(s)]
    assert len(records) == n_records, shown
    for s in records:
        # a bar erased only by "\r" leaves its tail (it ends "elapsed 4s") after a shorter record
        assert STAMP.match(s) and "steps/s" not in s and not re.search(r"elapsed \S+$", s), s


@pytest.fixture
def logger():
    """A logger whose only handler is a ProgressHandler on a StringIO (the root logger is pytest's)."""
    buf = io.StringIO()
    handler = ProgressHandler(buf)
    handler.setFormatter(logging.Formatter(FORMAT))
    log = logging.getLogger("test.progress")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    yield log, buf
    log.removeHandler(handler)


def test_log_records_lines_and_warnings_go_above_the_bar_not_onto_it(logger, monkeypatch):
    log, buf = logger
    clock = Clock()
    p = Progress(100, "bar", stream=buf, clock=clock, width=120)  # hooks warnings.showwarning
    # below the hook: the standard showwarning writes to the file, but under pytest's warning capture
    # it records instead, so a plain writer stands in for it
    monkeypatch.setattr(
        progress_module,
        "_plain_showwarning",
        lambda msg, cat, name, lineno, file=None, line=None: file.write(
            warnings.formatwarning(msg, cat, name, lineno, line)
        ),
    )
    try:
        log.info("before the first step (no bar yet)")
        for step in range(1, 8):
            clock.t += 0.5
            p.update(step, loss=0.109620, lr=9.3e-4)
            if step == 3:
                log.info("saved runs/x/checkpoints/step-00000003")
            if step == 4:
                p.record({"step": 4, "loss": 0.1096, "lr": 9.3e-4, "val_loss": 0.2})
            if step == 5:
                log.warning("w")  # shorter than the bar: its tail must be erased, not left after it
            if step == 6:  # what warnings.warn calls while a bar is drawn (there on stderr)
                assert warnings.showwarning is _show_warning
                warnings.showwarning(UserWarning("a torch warning"), UserWarning, "x.py", 1, file=buf)
    finally:
        p.close()
    text = buf.getvalue()
    assert_not_glued(text, n_records=3)
    shown = screen(text)
    # the bar is drawn again after each line written above it, and the last one stays
    assert shown[-1] == "" and "7/100" in shown[-2] and shown[-2].startswith("[")
    for k in ("saved", " w", "step 4/100", "torch"):  # the next thing written after each is a bar
        after = text.index("\n", text.index(k)) + 1
        assert text[after:].startswith("\r["), (k, text[after : after + 20])
    assert not any(s.startswith("[") and "torch" in s for s in shown)
    assert shown[0].startswith("2") and "before the first step" in shown[0]


def test_forced_bar_in_a_file_and_plain_lines_never_write_a_carriage_return(logger):
    log, buf = logger
    clock = Clock()
    p = Progress(10, "lines", stream=buf, clock=clock)
    assert not p.bar
    for step in range(1, 4):
        clock.t += 2.0
        p.update(step, loss=1.0, lr=1e-3)
        log.info("saved step %d", step)
    p.record({"step": 3, "loss": 0.5, "lr": 1e-3, "grad_norm": 0.25, "tokens_per_s": 12345.6})
    p.close()
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [s for s in lines if not STAMP.match(s)] == [
        "step 3/10  0.5 steps/s  ETA 14s  loss 0.5000  lr 1.0e-03  grad_norm 0.25  12,346 tokens/s  "
        "elapsed 6s"
    ]
    # "auto" is a bar only on a terminal: a StringIO (a SLURM log, a pipe) gets plain lines
    assert not Progress(10, "auto", stream=io.StringIO()).bar


def test_rate_and_eta_count_only_this_processs_recent_steps():
    clock = Clock(1000.0)
    # a resumed run: steps 1–50 were another process; setup and the first step took 100 s
    p = Progress(100, "lines", stream=io.StringIO(), clock=clock)
    clock.t += 100
    p.update(51)
    assert p.facts() == ["51/100", "- steps/s", "ETA -"]  # one point: no rate yet, never a guess
    for step in range(52, 61):  # 2 s per step
        clock.t += 2
        p.update(step)
    assert p.facts() == ["60/100", "0.5 steps/s", "ETA 1m20s"]  # 40 steps left at 0.5/s
    for step in range(61, 91):  # faster now: 4 steps/s; the window (20 steps) forgets the slow ones
        clock.t += 0.25
        p.update(step)
    assert p.facts() == ["90/100", "4 steps/s", "ETA 2s"]
    assert p.elapsed() == f"elapsed {fmt_duration(100 + 18 + 7.5)}" == "elapsed 2m06s"


def test_step_rate_window_and_degenerate_points():
    r = StepRate(window=2)
    assert r.value() is None
    r.add(0.0, 1)
    r.add(0.0, 2)  # no time passed: no rate rather than a division by zero
    assert r.value() is None
    r.add(10.0, 3)
    r.add(11.0, 4)  # the window holds the last 3 points: (0, 2), (10, 3), (11, 4)
    assert r.value() == pytest.approx(2 / 11)


def test_bar_shows_running_loss_then_logged_loss_and_current_lr():
    clock = Clock()
    buf = io.StringIO()
    p = Progress(10, "bar", stream=buf, clock=clock, width=200)
    for step, loss in ((1, 1.0), (2, 2.0), (3, float("nan"))):  # a skipped step's NaN is left out
        clock.t += 1
        p.update(step, loss=loss, lr=1e-3 * step)
    assert p.loss() == 1.5 and "loss 1.500" in p.bar_text() and "lr 3.0e-03" in p.bar_text()
    p.record({"step": 3, "loss": 1.25, "lr": 2e-3})  # the record's mean lr does not replace the step's
    assert "loss 1.250" in p.bar_text() and "lr 3.0e-03" in p.bar_text()
    p.close()
    assert Progress.active is None


def test_a_bar_never_wraps_a_narrow_terminal():
    clock = Clock()
    for width in (40, 80, 200):
        p = Progress(1000, "bar", stream=io.StringIO(), clock=clock, width=width)
        clock.t += 1
        p.update(1, loss=0.1, lr=1e-4)
        clock.t += 1
        p.update(2, loss=0.1, lr=1e-4)
        assert len(p.bar_text()) <= width - 1
        p.close()
    assert "[" in p.bar_text()  # room for the bar at 200 columns


def test_formats():
    assert [fmt_duration(s) for s in (0, 5, 59.6, 83, 3599.6, 3720, 100 * 3600)] == [
        "0s",
        "5s",
        "1m00s",
        "1m23s",
        "1h00m",
        "1h02m",
        "100h00m",
    ]
    assert fmt_duration(None) == fmt_duration(float("inf")) == "-"
    assert [fmt_loss(v) for v in (0.1096202, 2.0, 12345.6)] == ["0.1096", "2.000", "1.235e+04"]
    assert [fmt_lr(v) for v in (9.3e-4, 2.7e-4, 1e-3)] == ["9.3e-04", "2.7e-04", "1.0e-03"]
    with pytest.raises(ValueError, match="'bars'"):
        Progress(1, "bars")


def test_other_ranks_print_nothing(capsys):
    p = Progress(10, "off")
    p.update(1, loss=1.0)
    p.line("stopped at step 1")
    p.record({"step": 1, "loss": 1.0})
    p.close()
    assert capsys.readouterr() == ("", "")


FIELDS = re.compile(
    r"^\[[#.]+\] (\d+)/4  (\S+) steps/s  ETA (\S+)  loss \d\.\d{3}  lr \d\.\de-0\d  elapsed \S+$"
)


@pytest.mark.slow
def test_training_with_the_bar_forced_keeps_log_lines_whole(tmp_path, overrides):
    """``python -m launch.train`` with stderr a file and ``run.progress=bar``: two checkpoints and an
    evaluation inside a 4-step run; every log record is a line of its own and the bar has its fields."""
    rd = tmp_path / "run"
    extra = ["train.steps=4", "checkpoint.every=2", "eval.every=3", "eval.batches=1", "run.progress=bar"]
    proc = run(train_cmd(rd, *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    n = len(STAMP.findall(err))
    assert n >= 3 and err.count("INFO launch.train: saved") == 2, err  # held-out, 2 checkpoints
    assert_not_glued(err, n_records=n)
    bars = [s for s in segments(err) if s.startswith("[")]
    steps = [int(m.group(1)) for m in map(FIELDS.match, bars) if m]
    assert len(steps) == len(bars) and steps[0] == 1 and steps[-1] == 4, bars
    assert not any(m.group(2) == "-" for m in map(FIELDS.match, bars) if int(m.group(1)) > 1)
    assert FIELDS.match(bars[-1]).group(3) == "0s"  # nothing left
    shown = screen(err)
    assert any(s.startswith("step 3/4 ") and "val_loss " in s for s in shown), shown  # the eval's record
    assert f"done: 4 steps in {rd}" in err  # on the bar's stream, below the closed bar


@pytest.mark.slow
def test_training_in_plain_lines_prints_the_facts_every_logging_every_steps(tmp_path, overrides, capsys):
    """The same trainer (in this process: the plain lines need no process boundary), ``run.progress=lines``
    and ``logging.every=2``: one line per record with steps/s, ETA, loss and lr, no carriage return."""
    from launch.train import main

    rd = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses' OMP_NUM_THREADS=1: two cores, and workers beside
    try:
        main([f"run.dir={rd}", *overrides, "train.steps=4", "logging.every=2", "run.progress=lines"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "\x1b" not in out + err
    lines = [s for s in out.splitlines() if s.startswith("step ")]
    pattern = (
        r"step {}/4  \S+ steps/s  ETA \S+  loss \d\.\d{{3}}  lr \d\.\de-0\d  grad_norm \S+  [\d,]+ tokens/s"
    )
    assert len(lines) == 2, out
    for step, line in zip((2, 4), lines, strict=True):
        assert re.match(pattern.format(step), line), line
    assert "ETA 0s" in lines[1] and "- steps/s" not in lines[0]
