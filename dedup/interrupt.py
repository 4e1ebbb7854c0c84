"""Signal policy: SIGINT/SIGTERM stop a command cleanly; a second one stops it at once;
worker processes never outlive the process that started them.

Why: a run is long, and users stop it (Ctrl-C) or a scheduler does (SIGTERM before SIGKILL).
What is finished must stay (``done/`` markers, written last, after their files, which are
renamed into place), what is running must stop promptly, and nothing may keep writing into
the run directory after the command has exited (a rerun would take over its lock).

* :func:`install` (the CLI only): SIGINT and SIGTERM raise :class:`Interrupted` in the main
  thread, wherever it is (a feature wait, a faiss search between calls, a report), so the same
  ``finally``/``with`` clean-up runs as for any error: the executor terminates and joins its
  workers, the run lock is released after that, temp files are removed.
  :func:`exit_interrupted` then prints one line (what is done, how to resume) and exits
  130 (SIGINT) or 143 (SIGTERM).
* A second signal while that clean-up runs does not raise again: it SIGKILLs the registered
  worker processes and ``os._exit``s. The lock is then left behind, but its owner and workers
  are dead, so the next run takes it over (see ``RunLock``).
* :func:`worker_setup` (in each pool worker): ignores SIGINT (a terminal's Ctrl-C reaches the
  whole process group; the parent decides), and makes the worker die with its parent even when
  the parent is SIGKILLed (OOM killer, preemption) and no handler can run: Linux's
  ``PR_SET_PDEATHSIG``, plus a thread that polls the parent pid (other systems, or a sandbox
  that refuses ``prctl``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_GRACE_S = 5.0  # after the message, the interpreter's own exit gets this long, then os._exit
_PARENT_POLL_S = 0.5


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM (a BaseException, like KeyboardInterrupt, so
    ``except Exception`` does not swallow it; not a KeyboardInterrupt, which click would turn
    into "Aborted!" and exit 1)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict = {"signum": None, "status": None}
_workers: set[int] = set()


def _handler(signum, frame) -> None:
    if _state["signum"] is not None:
        _force_exit(signum)
    _state["signum"] = signum
    if frame is not None and str(frame.f_globals.get("__name__", "")).startswith("ray."):
        # Ray's waits check signals in C++ and accept only KeyboardInterrupt (anything else
        # becomes a SystemError); dedup.executors.ray turns it back with as_interrupted().
        raise KeyboardInterrupt
    raise Interrupted(signum)


def as_interrupted(e: BaseException) -> BaseException:
    """The :class:`Interrupted` for a KeyboardInterrupt raised on one of our signals (else ``e``)."""
    if isinstance(e, KeyboardInterrupt) and _state["signum"] is not None:
        new = Interrupted(_state["signum"])
        new.__cause__ = None
        return new
    return e


def install() -> None:
    """SIGINT/SIGTERM → :class:`Interrupted` in the main thread. A signal the parent set to be
    ignored (``nohup``, a background job) stays ignored."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _handler)
            _state["installed"] = True


def reinstall() -> None:
    """Take SIGINT/SIGTERM back after a library set its own (``ray.init`` sets a SIGTERM handler
    that exits at once), if :func:`install` was called in this process."""
    if _state.get("installed"):
        for sig in SIGNALS:
            if signal.getsignal(sig) not in (_handler, signal.SIG_IGN):
                signal.signal(sig, _handler)


def status(fn: Callable[[], str] | None) -> None:
    """What the interrupt message reports, e.g. ``lambda: f"{done} of {total} shards done"``
    (called only when the message is printed)."""
    _state["status"] = fn


def register_workers(pids) -> None:
    """Worker processes to SIGKILL if a second signal forces the exit."""
    _workers.update(int(p) for p in pids if p)


def unregister_workers(pids) -> None:
    _workers.difference_update(int(p) for p in pids if p)


def _kill_workers() -> None:
    for pid in list(_workers):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _force_exit(signum: int) -> None:
    _kill_workers()
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError):
        os.write(2, f"\ninterrupted again ({name}): stopped at once; rerun the same command to resume: {resume_command()}\n".encode())
    os._exit(128 + signum)


def resume_command() -> str:
    return shlex.join(["dedup", *sys.argv[1:]])


def message(e: BaseException) -> str:
    name = e.name if isinstance(e, Interrupted) else "SIGINT"
    detail = ""
    fn = _state["status"]
    if fn is not None:
        with contextlib.suppress(Exception):
            detail = f": {fn()}"
    return f"interrupted ({name}){detail}; rerun the same command to resume: {resume_command()}"


def exit_interrupted(e: BaseException) -> None:
    """Print the one-line message and exit 128+signal. The interpreter's exit (atexit: Ray's
    shutdown, joins of library threads) gets ``EXIT_GRACE_S``; then the process ends anyway."""
    e = as_interrupted(e)
    code = e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT
    _state["signum"] = _state["signum"] or signal.SIGINT  # a further signal forces the exit
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.stderr.write(("\n" if sys.stderr.isatty() else "") + message(e) + "\n")  # after a bar or ^C
    sys.stderr.flush()

    def watchdog() -> None:
        time.sleep(EXIT_GRACE_S)
        _kill_workers()
        os._exit(code)

    threading.Thread(target=watchdog, name="dedup-exit-watchdog", daemon=True).start()
    sys.exit(code)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while processes are started: a child inherits the
    mask, so it cannot be interrupted half-way through its start (a traceback on the terminal)
    before :func:`worker_setup` runs. A signal that arrives meanwhile is delivered afterwards."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_setup(parent_pid: int) -> None:
    """In a worker process, first thing: ignore SIGINT, die with the parent, unblock signals."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="dedup-parent-watch", daemon=True).start()
