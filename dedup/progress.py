"""Progress display: rich bars on a terminal, periodic log lines otherwise (CI, cron, Ray jobs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

log = logging.getLogger("dedup")


class _Task:
    def __init__(self, reporter: Progress, name: str, total: int | None):
        self.r, self.name, self.total, self.done = reporter, name, total, 0
        self._last = 0.0
        self._id = reporter._bar.add_task(name, total=total) if reporter._bar else None

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str | None = None) -> None:
        self.done = done
        if self._id is not None:
            assert self.r._bar is not None  # a task id comes from the bar
            self.r._bar.update(self._id, completed=done, description=f"{self.name} {note or ''}".strip())
        elif self.r.enabled:
            now = time.monotonic()
            if now - self._last >= self.r.interval or (self.total and done >= self.total):
                self._last = now
                total = f"/{self.total}" if self.total else ""
                log.info("%s: %d%s %s", self.name, done, total, note or "")


class Progress:
    """``with Progress() as p: t = p.task("features", total); t.advance()``."""

    def __init__(self, enabled: bool = True, interval: float = 10.0):
        self.enabled = enabled
        self.interval = interval
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar:
            self._bar.stop()

    def task(self, name: str, total: int | None = None) -> _Task:
        return _Task(self, name, total)

    def updater(self, name: str) -> Callable[[int, int], None]:
        """``fn(done, total)`` for code that reports its own totals: the task is made on the
        first call."""
        task: _Task | None = None

        def fn(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = self.task(name, total=total)
            task.update(done)

        return fn


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    log.info("%s ...", name)
    yield
    log.info("%s done in %.1fs", name, time.perf_counter() - t0)
