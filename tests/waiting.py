"""Waiting for what another process or thread does. One loop for every test: it polls until the condition
holds, and fails naming what it waited for when the time is up, or at once when a process or thread that was
to bring it about has ended (rather than waiting out the time for something that can no longer happen)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float,
               *watched: subprocess.Popen | threading.Thread, every: float = 0.1,
               detail: Callable[[], object] | None = None) -> T:
    """Poll ``condition`` every ``every`` s until it returns something true, and return that. Fails after
    ``timeout`` s, or as soon as one of ``watched`` has ended; ``detail()`` (a log, a status) is added to the
    message then, and only then (it may be costly to read)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        ended = next((w for w in watched if not _running(w)), None)
        if ended is not None or time.monotonic() >= deadline:
            why = f"{_name(ended)} ended first" if ended is not None else f"not within {timeout:g} s"
            raise AssertionError(f"{what}: {why}" + ("" if detail is None else f"\n{detail()}"))
        time.sleep(every)
    return result


def _running(worker: subprocess.Popen | threading.Thread) -> bool:
    return worker.is_alive() if isinstance(worker, threading.Thread) else worker.poll() is None


def _name(worker: subprocess.Popen | threading.Thread) -> str:
    if isinstance(worker, threading.Thread):
        return f"thread {worker.name}"
    args = worker.args if isinstance(worker.args, (list, tuple)) else [worker.args]
    return f"{' '.join(map(str, args))[:120]} (exit {worker.returncode})"
