"""Progress of the long phases: SFT, RL steps, a job's runs, the eta sweep, the report.

:class:`Progress` is a tqdm bar when stderr is a terminal, and plain lines on
stderr when it is not (a log file, a pipe, a batch job): one every
``LINE_EVERY_S`` seconds and one at the end, so a long run in the background
still says where it is. ``show=False`` prints nothing, ``show=True`` always draws
the bar.

A worker process of ``mtpdiag run`` calls :func:`forward_to` once: its bars then
draw nothing and send each :class:`Update` to the parent, which shows one bar per
phase for all its workers.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

LINE_EVERY_S = 30.0  # off a terminal: one line per phase this often
FORWARD_EVERY_S = 0.5  # in a worker: at most this often to the parent (and always at the end)

_forward: Callable[["Update"], None] | None = None


@dataclass(frozen=True)
class Update:
    """Where one worker's bar stands: ``key`` names the bar (process and description)."""

    key: str
    desc: str
    n: int
    total: int
    postfix: str


def forward_to(send: Callable[[Update], None] | None) -> None:
    """Send every bar of this process to ``send`` instead of drawing it (None: draw again)."""
    global _forward
    _forward = send


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning`` for the console: ``mtpdiag: warning: <message>``, one line."""
    print(f"mtpdiag: warning: {message}", file=sys.stderr if file is None else file)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """``total`` units of one phase named ``desc``; ``update(n)`` adds, ``moveto(n)``
    sets the count, ``set_postfix(reward=..., j_true=...)`` the numbers shown after it."""

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0, show: bool | None = None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.postfix = ""
        if show is False:
            self.mode = "off"
        elif show is None and _forward is not None:
            self.mode = "forward"
        else:
            self.mode = "bar" if show or sys.stderr.isatty() else "lines"
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) if self.mode == "bar" else None
        self._start = time.monotonic()
        self._last = self._start
        self._printed = None  # the count and numbers of the last line printed
        self._key = f"{os.getpid()}:{desc}"
        if self.mode == "forward":
            self._send()

    def update(self, n: int = 1) -> None:
        self.moveto(self.n + n)

    def moveto(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n
        self._tick()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix)

    def line(self) -> str:
        numbers = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s{numbers} ({duration(time.monotonic() - self._start)})"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._printed != (self.n, self.postfix):
            self._print()
        elif self.mode == "forward":
            self._send()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tick(self) -> None:
        now = time.monotonic()
        if self.mode == "lines" and now - self._last >= LINE_EVERY_S:
            self._last = now
            self._print()
        elif self.mode == "forward" and now - self._last >= FORWARD_EVERY_S:
            self._last = now
            self._send()

    def _print(self) -> None:
        self._printed = (self.n, self.postfix)
        print(self.line(), file=sys.stderr, flush=True)

    def _send(self) -> None:
        _forward(Update(self._key, self.desc, self.n, self.total, self.postfix))
