"""What rank 0 shows of a training run (``run.progress``): a one-line bar redrawn in place (``bar``, or
``auto`` on a terminal), or plain lines for SLURM logs and pipes (``lines``, or ``auto`` elsewhere).

Both show the same facts: step/total, steps/s over the last steps of this process (so neither a slow
first step nor a resume's earlier steps count), the ETA from that rate, loss, lr and elapsed time. The
bar is redrawn every step; the plain lines come one per metrics record (``logging.every``), and those
records are also printed above the bar.

A bar shares its line with whatever else writes to the stream, so everything written during the run
goes *above* it: :class:`ProgressHandler` (the root logger's handler, installed by ``launch.train``)
and :meth:`Progress.line` erase the bar, write their own line and redraw the bar, and warnings shown
while a bar is drawn do the same. Without that a log record is glued onto the bar ("loss 0.10962026-12-01
09:46:52,910 INFO …" reads as a loss of 0.10962026).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import ClassVar, TextIO

CLEAR = "\r\x1b[K"
"""Back to the start of the line and erase it (ANSI "erase in line"): what a log line needs first."""

MODES = ("auto", "bar", "lines", "off")  # "off": the ranks other than 0


def fmt_duration(seconds: float | None) -> str:
    """``42s``, ``1m23s``, ``1h02m``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = round(seconds)  # rounded first, so 59.6 s reads 1m00s, not 0m60s
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_loss(v: float) -> str:
    """Four significant digits, trailing zeros kept so the width holds still: ``0.1096``, ``2.000``."""
    return f"{v:#.4g}"


def fmt_lr(v: float) -> str:
    return f"{v:.1e}"  # 9.3e-04


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


class StepRate:
    """Steps per second over the last ``window`` steps seen: recent, not since the start. The first
    point is the end of this process's first step, so start-up, compilation and a resumed run's
    earlier steps never enter; a slow step (an evaluation, a checkpoint) leaves after ``window`` steps."""

    def __init__(self, window: int = 20):
        self.points: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def add(self, now: float, step: int) -> None:
        self.points.append((now, step))

    def value(self) -> float | None:
        if len(self.points) < 2:
            return None
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


class Progress:
    """Rank 0's view of the run; see the module docstring. ``clock`` and ``width`` are for tests."""

    active: ClassVar[Progress | None] = None
    """The bar being drawn, which :class:`ProgressHandler` writes above (one per process)."""

    def __init__(
        self,
        total: int,
        mode: str = "auto",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
        window: int = 20,
    ):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
        # None: sys.stderr for the bar, sys.stdout for lines, looked up when written
        self.stream, self.clock, self.width = stream, clock, width
        self.quiet = mode == "off"
        self.bar = mode == "bar" or (mode == "auto" and _isatty(self.bar_stream))
        self.total, self.started = total, clock()
        self.rate = StepRate(window)
        self.step = 0
        self.lr: float | None = None
        self.logged_loss: float | None = None
        self.loss_sum, self.loss_n = 0.0, 0  # finite step losses since the last metrics record
        self.drawn = self.closed = False
        self.lock = threading.RLock()  # a record may be logged from another thread
        if self.bar:
            Progress.active = self
            _hook_warnings()

    @property
    def bar_stream(self) -> TextIO:
        return self.stream or sys.stderr

    # -- what is shown

    def loss(self) -> float | None:
        """The mean loss of the steps since the last record (what the next record will log), else the
        last logged one."""
        return self.loss_sum / self.loss_n if self.loss_n else self.logged_loss

    def facts(self, step: int | None = None) -> list[str]:
        """``step/total``, steps/s and ETA; the ETA counts the steps left at this process's rate."""
        step = self.step if step is None else step
        rate = self.rate.value()
        eta = (self.total - step) / rate if rate else None
        return [f"{step}/{self.total}", f"{fmt_rate(rate)} steps/s", f"ETA {fmt_duration(eta)}"]

    def elapsed(self) -> str:
        return f"elapsed {fmt_duration(self.clock() - self.started)}"

    def bar_text(self) -> str:
        parts = self.facts()
        loss = self.loss()
        if loss is not None:
            parts.append(f"loss {fmt_loss(loss)}")
        if self.lr is not None:
            parts.append(f"lr {fmt_lr(self.lr)}")
        parts.append(self.elapsed())
        text = "  ".join(parts)
        cols = self.width or _columns(self.bar_stream)
        # narrower than the terminal: "\r" cannot go back over a wrapped line, which then piles up
        room = min(30, cols - 1 - len(text) - 3)
        if room < 10:
            return text[: cols - 1]
        filled = int(room * min(1.0, self.step / max(1, self.total)))
        return f"[{'#' * filled}{'.' * (room - filled)}] {text}"

    def record_text(self, record: dict) -> str:
        """The plain line of a metrics record: the bar's facts and the record's headline values."""
        step, rate, eta = self.facts(record["step"])
        parts = [f"step {step}", rate, eta]
        fmts = {"loss": fmt_loss, "val_loss": fmt_loss, "lr": fmt_lr, "grad_norm": lambda v: f"{v:.3g}"}
        parts += [f"{k} {f(record[k])}" for k, f in fmts.items() if record.get(k) is not None]
        if record.get("tokens_per_s") is not None:
            parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
        parts.append(self.elapsed())
        return "  ".join(parts)

    # -- what the training loop calls

    def update(self, step: int, loss: float | None = None, lr: float | None = None) -> None:
        """After every optimizer step (every mode: the rate needs every step); redraws the bar."""
        with self.lock:
            self.rate.add(self.clock(), step)
            self.step = step
            if loss is not None and math.isfinite(loss):  # a skipped step's NaN is not averaged in
                self.loss_sum += loss
                self.loss_n += 1
            if lr is not None:
                self.lr = lr
            if self.bar and not self.closed:
                self._draw()

    def record(self, record: dict) -> None:
        """A metrics record (rank 0): its plain line, and the bar's loss until the next step. (The bar's
        lr stays the step's own: a record's lr is the mean over its steps.)"""
        with self.lock:
            if "loss" in record:  # a record of the steps since the previous one: a new running mean
                if record["loss"] is not None:
                    self.logged_loss = record["loss"]
                self.loss_sum, self.loss_n = 0.0, 0
            self.line(self.record_text(record))

    def line(self, text: str) -> None:
        """A line of its own: above the bar (on its stream), else on stdout; nothing on other ranks."""
        if self.quiet:
            return
        with self.lock:
            if not self.bar:
                print(text, file=self.stream or sys.stdout, flush=True)
                return
            self.clear()
            self.bar_stream.write(text + "\n")
            self.redraw()

    def clear(self) -> None:
        """Erase the bar (before something else writes a line to its stream)."""
        if self.drawn:
            self.bar_stream.write(CLEAR)
            self.drawn = False

    def redraw(self) -> None:
        """Draw the bar again after something wrote above it (nothing before the first step)."""
        if self.bar and not self.closed and self.rate.points:
            self._draw()
        else:
            self.bar_stream.flush()

    def _draw(self) -> None:
        self.bar_stream.write("\r" + self.bar_text() + "\x1b[K")
        self.bar_stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Leave the last bar on its own line; later lines and records print plainly below it."""
        with self.lock:
            if self.drawn:
                self.bar_stream.write("\n")
                self.bar_stream.flush()
            self.drawn, self.closed = False, True
            if Progress.active is self:
                Progress.active = None


class ProgressHandler(logging.StreamHandler):
    """A stream handler (stderr by default) whose records go above the active progress bar when the
    bar is drawn on the same stream; a plain stream handler otherwise."""

    def emit(self, record: logging.LogRecord) -> None:
        bar = Progress.active
        if bar is None or not _same_stream(bar.bar_stream, self.stream):
            super().emit(record)
            return
        with bar.lock:
            bar.clear()
            super().emit(record)
            bar.redraw()


def install_log_handler(level: int = logging.INFO) -> None:
    """``logging.basicConfig`` with a :class:`ProgressHandler` on stderr (nothing when the root
    logger has handlers already, as basicConfig)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[ProgressHandler()],
    )


_plain_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` that writes above an active bar (torch warns on the first step)."""
    bar = Progress.active
    if bar is None or not _same_stream(bar.bar_stream, sys.stderr if file is None else file):
        _plain_showwarning(message, category, filename, lineno, file, line)
        return
    with bar.lock:
        bar.clear()
        _plain_showwarning(message, category, filename, lineno, file, line)
        bar.redraw()


def _hook_warnings() -> None:
    global _plain_showwarning
    if warnings.showwarning is not _show_warning:  # once, keeping whatever was installed before
        _plain_showwarning = warnings.showwarning
        warnings.showwarning = _show_warning


def _same_stream(a, b) -> bool:
    if a is b:
        return True
    try:
        return a.fileno() == b.fileno()
    except (AttributeError, OSError, ValueError):  # StringIO and closed streams have no descriptor
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream) -> int:
    """The terminal's width, ``COLUMNS``, else 100 (a forced bar in a file)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        pass
    try:
        return int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return 100
