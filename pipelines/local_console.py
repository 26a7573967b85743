"""A console a person can read for local pipeline runs: one line per step with its outcome and
timing, while kfp.local's detail (executor input JSON, component paths, every line a step prints)
goes to a log file, one per step beside it.

kfp.local prints to sys.stdout (its logger's handler is bound to sys.stdout when a task starts,
and the steps' output is re-printed line by line), so swapping sys.stdout catches all of it.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([\w-]+)'")
_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
_RETRY = re.compile(r"Task ([\w-]+) failed \(attempt (\d+)/(\d+)\)\. Retrying in ([\d.]+)s")
_SKIP = re.compile(r"Skipping (?:conditional )?task ([\w-]+)")


class StepConsole:
    """File-like: everything to ``log_dir/pipeline.log`` (and the current step's ``<step>.log``);
    step starts, ends, retries and skips to ``terminal``."""

    def __init__(self, log_dir: Path, terminal: TextIO):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.terminal = terminal
        self.log = open(self.dir / "pipeline.log", "a", encoding="utf-8")
        self.step: str | None = None
        self.step_log: TextIO | None = None
        self.t0 = 0.0
        self.failed: list[str] = []
        self._partial = ""

    def step_log_path(self, step: str) -> Path:
        return self.dir / f"{step}.log"

    def write(self, text: str) -> int:
        self.log.write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def _say(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _line(self, line: str) -> None:
        if m := _START.search(line):
            self._close_step()
            self.step, self.t0 = m.group(1), time.monotonic()
            self.step_log = open(self.step_log_path(self.step), "a", encoding="utf-8")
            self._say(f"[{self.step}] running ...")
        if self.step_log:  # the step's own log: its lines, without colour codes
            self.step_log.write(line + "\n")
        if m := _END.search(line):
            step, state = m.groups()
            took = time.monotonic() - self.t0
            if state == "SUCCESS":
                self._say(f"[{step}] done in {took:.1f} s")
            else:
                self.failed.append(step)
                self._say(f"[{step}] {state} after {took:.1f} s; its log: {self.step_log_path(step)}")
            self._close_step()
        elif m := _RETRY.search(line):
            step, attempt, total, delay = m.groups()
            self._say(f"[{step}] failed (try {attempt} of {total}); retrying in {float(delay):.0f} s; "
                      f"log: {self.step_log_path(step)}")
        elif m := _SKIP.search(line):
            self._say(f"[{m.group(1)}] skipped ({line.split(':', 1)[-1].strip() or 'condition not met'})")

    def _close_step(self) -> None:
        if self.step_log:
            self.step_log.close()
        self.step_log, self.step = None, None

    def flush(self) -> None:
        self.log.flush()
        if self.step_log:
            self.step_log.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self._close_step()
        self.log.close()


@contextlib.contextmanager
def step_console(log_dir: str | Path) -> Iterator[StepConsole]:
    """Route kfp.local's output into ``log_dir`` for the duration; the terminal gets one line per
    step event. kfp's local-runner notices (a CUDA image run without containers, resource limits
    that have no effect locally) go to the log too: they are true of every local run."""
    console = StepConsole(Path(log_dir), sys.stdout)
    old = sys.stdout
    sys.stdout = console
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=r"Task '.*': settings \[", category=UserWarning)
            yield console
    finally:
        sys.stdout = old
        console.close()
