"""The tests' one waiting loop: what it returns, and that it fails soon and says why."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from waiting import wait_until


def test_it_returns_what_the_condition_returned_once_true() -> None:
    calls = iter([None, 0, "", {"round": 2}])
    assert wait_until(lambda: next(calls), "round 2", 10, every=0.01) == {"round": 2}


def test_it_fails_after_the_timeout_naming_what_it_waited_for_and_the_detail() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^round 2 closing: not within 0.3 s\nthe server's log$"):
        wait_until(lambda: False, "round 2 closing", 0.3, every=0.05, detail=lambda: "the server's log")
    assert 0.3 <= time.monotonic() - started < 5


def test_it_fails_at_once_when_a_watched_process_or_thread_has_ended() -> None:
    """Not after the timeout: what the ended one was to do can no longer happen."""
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    thread = threading.Thread(target=lambda: None, name="join")
    thread.start()
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^an upload: .*-c raise SystemExit\(3\) \(exit 3\) ended first$"):
        wait_until(lambda: False, "an upload", 120, proc)
    with pytest.raises(AssertionError, match=r"^an upload: thread join ended first$"):
        wait_until(lambda: False, "an upload", 120, thread)
    assert time.monotonic() - started < 30
    assert wait_until(lambda: "done", "a condition already true", 120, proc) == "done", "checked before the watched"
