"""What a person sees while a long command runs: one line per stage, progress bars, a summary table.

Everything else the process prints (Ray's and Ray Train's INFO lines, workers' output forwarded to the
driver, library warnings and progress bars) goes to a log file under the run's output folder, whose path
the console names; `--verbose` shows it all in the terminal instead. The redirection is at the file
descriptor level, so it also catches what libraries write straight to stdout / stderr.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_terminal: TextIO | None = None  # the terminal while quiet_libraries logs fd 1 and 2; None: sys.stdout as it is now
_last_log: Path | None = None  # the log file of the latest quiet command in this process


def stream() -> TextIO:
    """The terminal: console lines and progress bars, even while the rest of the output is logged. Read
    sys.stdout at each call, not at import, so that whoever replaced it (pytest's capture) receives them."""
    return _terminal or sys.stdout


def forwards_worker_output() -> bool:
    """Whether Ray should forward its workers' output to this process: not while the console is quiet. The
    driver prints forwarded lines whenever they arrive, possibly after the command's log redirection ended;
    they stay in Ray's session logs (the log file names the folder)."""
    return _terminal is None


def say(line: str = "") -> None:
    print(line, file=stream(), flush=True)


@contextmanager
def quiet_libraries(log_file: Path, verbose: bool):
    """Send the process's stdout and stderr to `log_file` for the duration (the console keeps the terminal);
    with verbose, leave everything on the terminal."""
    global _terminal, _last_log
    if verbose:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _last_log = log_file
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    previous, _terminal = _terminal, terminal
    _silence_progress_bars()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal = previous
        terminal.close()


def log_until_exit() -> None:
    """After the command's last console line: what the process still prints while it exits (Ray's shutdown,
    threads of its libraries winding down) goes to the latest quiet command's log file too. Only for a
    process that ends here (the `perfusion` script), never for a caller that goes on printing."""
    if _last_log is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        log = os.open(_last_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # the command replaced its output folder, log included: the exit output goes nowhere
        log = os.open(os.devnull, os.O_WRONLY)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _silence_progress_bars() -> None:
    """Ray Data draws its own progress bars; in quiet mode they would fill the log file with redraws."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass


class Stages:
    """Numbered stage lines with their wall time: '[2/7] ingest (Ray Data) ... 41s'."""

    def __init__(self, total: int):
        self.total = total
        self.seconds: dict[str, float] = {}
        self.titles: dict[str, str] = {}

    @contextmanager
    def stage(self, key: str, title: str):
        say(f"[{len(self.seconds) + 1}/{self.total}] {title}")
        started = time.perf_counter()
        yield
        self.seconds[key], self.titles[key] = time.perf_counter() - started, title
        say(f"      done in {self.seconds[key]:.0f}s")

    def titled(self) -> dict[str, float]:
        return {self.titles[key]: seconds for key, seconds in self.seconds.items()}


def table(rows: list[tuple], header: tuple[str, ...]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    rows = [tuple(str(cell) for cell in row) for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])
