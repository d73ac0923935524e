"""What a person sees while kfp.local runs the pipeline: one line per task as it starts and as it finishes, a
progress bar for training, and, when a task fails, its last lines; everything else goes to a log file.

kfp.local writes all it has to ``sys.stdout``: its own log records, every task's streamed output (each task is a
subprocess whose stdout and stderr it copies line by line) and JSON dumps of each task's inputs and outputs. A
``PipelineConsole`` stands in for ``sys.stdout`` and ``sys.stderr`` while the pipeline runs, writes every line to
the log unchanged and reads three kinds of line to drive the terminal: kfp's "Executing task 'x'", its "Task 'x'
finished with status S" and the training task's tqdm bar.
"""

from __future__ import annotations

import collections
import io
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '(?P<task>[^']+)'")
_FINISH = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
_PROGRESS = re.compile(
    r"train (?P<algo>[\w-]+):\s*\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)"
    r"(?: \[(?P<inside>[^\]]*)\])?"
)
"""tqdm's bar: ``train unexrl-cic:  20%|##   | 1000/5000 [00:07<00:23, 170.74it/s, q=1.29, val=1183s]``"""
TAIL_LINES = 40
"""how many of a failed task's last lines are shown on the terminal"""
BAR_WIDTH = 30


class PipelineConsole(io.TextIOBase):
    """A text stream: every line to ``log``; task starts and finishes, training progress and failures to
    ``terminal``. On a terminal the progress bar redraws in place; elsewhere (CI, a file) it prints a line per
    quarter of the run."""

    def __init__(self, log: TextIO, terminal: TextIO) -> None:
        super().__init__()
        self.log, self.terminal = log, terminal
        self.live = terminal.isatty()
        self._partial = ""
        self._started: dict[str, float] = {}
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._quarter = -1
        self._bar_open = False
        self.failed: str | None = None
        """the task that finished with a status other than SUCCESS, if any"""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        # tqdm redraws with a carriage return: each redraw is a line here
        lines = (self._partial + text.replace("\r", "\n")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._read(_ANSI.sub("", line).strip())
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def _read(self, line: str) -> None:
        if not line:
            return
        if m := _START.search(line):
            self._started[m["task"]] = time.perf_counter()
            self._tail.clear()
            self._say(f"  {m['task']:<24} started")
        elif m := _FINISH.search(line):
            seconds = time.perf_counter() - self._started.get(m["task"], time.perf_counter())
            self._say(f"  {m['task']:<24} {m['status']:<8} {seconds:7.1f} s")
            if m["status"] != "SUCCESS":
                self.failed = m["task"]
                self._say(f"  last {len(self._tail)} lines of {m['task']}:")
                for tail in self._tail:
                    self._say(f"    | {tail}")
        elif m := _PROGRESS.search(line):
            postfix = ", ".join((m["inside"] or "").split(", ")[2:])  # after the times and the rate
            self._progress(int(m["done"]), int(m["total"]), m["algo"], postfix)
        else:
            self._tail.append(line)

    def _progress(self, done: int, total: int, algo: str, postfix: str) -> None:
        filled = BAR_WIDTH * done // max(total, 1)
        bar = (
            f"    train {algo} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} updates  {postfix}"
        )
        if self.live:
            self.terminal.write("\r" + bar.ljust(100)[:100])
            self._bar_open = True
        elif (quarter := 4 * done // max(total, 1)) > self._quarter:
            self._quarter = quarter
            self._say(bar)

    def _say(self, line: str) -> None:
        if self._bar_open:
            self.terminal.write("\n")
            self._bar_open = False
        self.terminal.write(line + "\n")
        self.terminal.flush()


@contextmanager
def console(log_path: Path) -> Iterator[PipelineConsole]:
    """sys.stdout and sys.stderr are a PipelineConsole writing ``log_path`` (kept whatever happens) for the body."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stdout, stderr = sys.stdout, sys.stderr
    with log_path.open("w", buffering=1) as log:
        stream = PipelineConsole(log, stdout)
        sys.stdout = sys.stderr = stream  # type: ignore[assignment]
        try:
            yield stream
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            stream.flush()
