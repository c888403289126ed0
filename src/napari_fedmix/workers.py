"""Thread workers for the widgets, with one error policy: the widget shows every error in its status
line; an unexpected one (not an :class:`InputError`) is also raised in the event loop, so napari's
notification offers its traceback for a bug report. Bad input (a NaN frame, a refused file) needs no
traceback: napari's default would pop one up for it as well."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmix_engine.errors import InputError


def make_worker(func: Callable[..., Any], *args: Any, on_error: Callable[[Exception], None]):
    """A napari worker for ``func(*args)`` (a generator function gives a generator worker), not started."""
    from napari.qt.threading import create_worker

    def errored(exc: Exception) -> None:
        on_error(exc)
        if not isinstance(exc, InputError):
            raise exc

    return create_worker(func, *args, _start_thread=False, _connect={"errored": errored})
