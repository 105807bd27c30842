"""Diagnostics on stderr: stage headers with elapsed time, progress lines, debug output."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

_debug = False


def set_debug(enabled: bool) -> None:
    global _debug
    _debug = enabled


def _emit(prefix: str, message: str) -> None:
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    _emit("", message)


def warn(message: str) -> None:
    _emit("warning: ", message)


def error(message: str) -> None:
    _emit("error: ", message)


def debug(message: str) -> None:
    if _debug:
        _emit("+ ", message)


def human_seconds(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:04.1f}s" if minutes else f"{secs:.1f}s"


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    """Print a header for a stage and its elapsed time when it ends."""
    start = time.monotonic()
    _emit("", f"==> {name}" + (f": {detail}" if detail else ""))
    ok = False
    try:
        yield
        ok = True
    finally:
        verdict = "done" if ok else "failed"
        _emit("", f"<== {name} {verdict} in {human_seconds(time.monotonic() - start)}")


class Progress:
    """A single self-overwriting progress line on a terminal, periodic lines otherwise."""

    def __init__(self, label: str, total: int | None = None, every: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.every = every
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        if not self._tty and now - self._last < self.every:
            return
        self._last = now
        if self.total:
            amount = f"{human_bytes(done)}/{human_bytes(self.total)} ({100 * done // self.total}%)"
        else:
            amount = human_bytes(done) if not note else ""
        text = f"    {self.label}: {amount} {note} [{human_seconds(now - self.start)}]".rstrip()
        if self._tty:
            sys.stderr.write("\r\033[K" + text[:200])
            sys.stderr.flush()
        else:
            _emit("", text)

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
