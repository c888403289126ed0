"""Thread workers for the widgets, with one error policy: the widget shows every error in its status
line; an unexpected one (not an :class:`InputError` or a :class:`FederationError`) is also raised in the
event loop, so napari's notification offers its traceback for a bug report. Bad input (a NaN frame, a
refused file) and a server's refusal (a revoked token, another join of the site running) need no
traceback: napari's default would pop one up for them as well."""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from fedmix_engine.errors import SAID_ERRORS

if TYPE_CHECKING:
    from napari.qt.threading import WorkerBase


class _CarriedRuntimeError(Exception):
    """A RuntimeError on its way out of a generator worker. superqt takes any RuntimeError raised there for
    a deleted worker and drops it with a warning: no ``errored``, no ``finished``, so the widget said
    "starting…" for ever (a revoked token in Train; a torch error such as CUDA out of memory)."""

    def __init__(self, original: RuntimeError) -> None:
        super().__init__(str(original))
        self.original = original


def make_worker(func: Callable[..., Any], *args: Any, on_error: Callable[[Exception], None]) -> WorkerBase:
    """A napari worker for ``func(*args)`` (a generator function gives a generator worker), not started.

    napari's window keeps every worker it made for as long as it is open (its task list holds the worker's
    ``quit``, and the worker's signals the function it ran): a prediction's closure held its image, its
    result's slot the image's layer, after the layer was closed, all day. Once the worker has finished,
    its signals' connections and its function are let go (``_let_go``)."""
    from napari.qt.threading import create_worker

    def errored(exc: Exception) -> None:
        if isinstance(exc, _CarriedRuntimeError):
            exc = exc.original
        on_error(exc)
        if not isinstance(exc, SAID_ERRORS):
            raise exc

    job: list[Any] = [func, args]  # emptied when the worker has finished
    if inspect.isgeneratorfunction(func):
        def run() -> Any:
            work, arguments = job
            try:
                return (yield from work(*arguments))
            except RuntimeError as exc:
                raise _CarriedRuntimeError(exc) from exc
    else:
        def run() -> Any:
            work, arguments = job
            return work(*arguments)

    run.__name__, run.__qualname__ = func.__name__, func.__qualname__  # what napari's close dialog names
    worker = create_worker(run, _start_thread=False, _connect={"errored": errored})
    # superqt emits its (private) ``_finished`` right after ``finished``, from the worker's thread: each queued
    # delivery of ``finished`` is posted by then, so this slot runs after the widgets' ``finished`` slots. (A
    # release posted from a ``finished`` slot could overtake a delivery the worker's thread had yet to post.)
    worker._finished.connect(lambda _: _let_go(worker, job))
    return worker


_SIGNALS = ("started", "yielded", "returned", "errored", "warned", "aborted", "paused", "resumed", "finished")


def _let_go(worker: WorkerBase, job: list[Any]) -> None:
    """Disconnect a finished worker's signals (the widgets' slots and napari's own) and drop its function."""
    job.clear()
    for name in _SIGNALS:
        signal = getattr(worker, name, None)
        if signal is not None:
            with contextlib.suppress(TypeError, RuntimeError):  # nothing connected; a worker Qt has deleted
                signal.disconnect()


def until_stopped(steps: Iterable[Any], stop: threading.Event) -> Generator[Any, None, Any]:
    """``steps`` until ``stop`` is set (asked after each step), then closed here, in the worker; returns what
    they return, or None when stopped. A worker's ``quit`` left them suspended at their last step, and
    napari keeps every worker it made (its window's task list holds the worker's ``quit``): a stopped
    evaluation kept its model in memory for good, a stopped training its run and its folder's lock (Start
    right after Stop, to continue the run, was refused as 'another run is writing to this folder'). Closed
    in the worker, a stopped run lets go of all of it before ``finished``, off napari's GUI thread.
    ``steps`` needs a ``close``: a generator, a ``FolderBatch``."""
    with contextlib.closing(steps):
        iterator = iter(steps)
        while True:
            try:
                step = next(iterator)
            except StopIteration as end:
                return end.value
            yield step
            if stop.is_set():
                return None
