"""The suite's own support: its one waiting loop (what it returns, that it fails soon and says why), the
failure a widget test gives where there is no screen, and the limit that turns a hung test into a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def test_a_widget_test_without_a_screen_fails_saying_what_to_install() -> None:
    """Qt without a screen aborted the test process: under xdist a worker crash and an INTERNALERROR naming
    nothing, on a developer's machine without Xvfb. The widget test fails, and the others still run."""
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    widget_test = "test_plugin_widgets.py::test_annotate_mask_boxes_and_tag_are_saved_and_shown_again"
    other_test = "test_test_support.py::test_it_returns_what_the_condition_returned_once_true"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xvfb", "-n", "0",
                           str(tests / widget_test), str(tests / other_test)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tests.parent)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed, 1 error" in done.stdout and "Fatal Python error" not in done.stderr, done.stdout[-3000:]
    assert "there is no screen" in done.stdout and "the apt-get line in .ci/run" in done.stdout


HUNG_TEST = """
import threading

import pytest


@pytest.mark.timeout(3, func_only=True)  # the test, not napari's fixtures (seconds on a busy machine)
def test_waits_for_what_never_comes():
    threading.Event().wait()  # a lost reply: without a limit, the run stalls until CI kills it, saying nothing
"""


def test_a_hung_test_fails_with_its_stack_and_every_test_has_a_limit(tmp_path: Path, pytestconfig) -> None:
    """A deadlock or a lost reply would stall the whole run until CI's 90 minutes were up, with no result and
    no hint. pytest-timeout (signal method) fails the hung test instead, with the stack where it waited; the
    suite's config gives every test a limit."""
    assert float(pytestconfig.getini("timeout")) > 0, "pyproject.toml's [tool.pytest.ini_options] timeout"
    (tmp_path / "test_hung.py").write_text(HUNG_TEST)
    root = Path(__file__).resolve().parents[1]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xvfb", "-n", "0",
                           "-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path), "test_hung.py"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Failed: Timeout (>3.0s) from pytest-timeout" in done.stdout, done.stdout[-3000:]
    assert "threading.Event().wait()" in done.stdout, "the stack shows where it waited"
    assert time.monotonic() - started < 90
