"""Long work as steps: a generator that yields progress and returns its result, so a GUI worker can
show each step and stop between two, while a command line or a caller that needs only the result
runs it to the end with :func:`run_steps`."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

Progress = TypeVar("Progress")
Result = TypeVar("Result")
Shown = TypeVar("Shown")


def run_steps(steps: Generator[Progress, None, Result], progress: Callable[[Progress], None] | None = None) -> Result:
    """Run the steps to the end, telling ``progress`` each one; returns the generator's result."""
    while True:
        try:
            update = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress:
            progress(update)


def mapped(steps: Generator[Progress, None, Result], change: Callable[[Progress], Shown]
           ) -> Generator[Shown, None, Result]:
    """``steps`` with each progress passed through ``change``; returns what ``steps`` return."""
    while True:
        try:
            update = next(steps)
        except StopIteration as finished:
            return finished.value
        yield change(update)


def labelled(steps: Generator[tuple[int, int], None, Result], label: str
             ) -> Generator[tuple[str, int, int], None, Result]:
    """``steps``' (done, total) progress as (``label``, done, total), so that one worker running two kinds of
    steps in turn can say which is under way; returns what ``steps`` return."""
    return mapped(steps, lambda step: (label, *step))


def shifted(steps: Generator[tuple[int, int], None, Result], start: int, total: int
            ) -> Generator[tuple[int, int], None, Result]:
    """A part's (done, part) progress as the whole's (``start`` + done, ``total``): work done in parts
    (a site scored a few images at a time) shows one bar; returns what ``steps`` return."""
    return mapped(steps, lambda step: (start + step[0], total))
