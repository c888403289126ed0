"""Tell a docked panel that it is being closed, which Qt and napari do not.

napari's ✕ on a dock takes the panel out of its dock (``setParent(None)``) and deletes the dock:
the panel gets no close event, and Qt keeps it alive a while, its worker still running (a training
nobody can see or stop, holding the site's join lock) and its timers still firing. Closing napari
sends its docked panels no close event either. :class:`PanelClosing` watches the panel and every
widget above it and calls back for both.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget


class PanelClosing(QObject):
    """Calls ``on_closed`` once when the panel is done with: taken out of its dock (its ✕) or closed
    itself; and ``on_window_closing`` (if given) whenever napari's window, or a floating dock, is about
    to close, which may still be cancelled. Parented to the panel."""

    def __init__(self, panel: QWidget, on_closed: Callable[[], None],
                 on_window_closing: Callable[[], None] | None = None):
        super().__init__(panel)
        self._panel = weakref.ref(panel)
        self._on_closed = on_closed
        self._on_window_closing = on_window_closing
        self._ancestors: list[weakref.ref] = []  # held weakly: napari's window must be free to go
        self._docked = self._done = False
        panel.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        kind, panel = event.type(), self._panel()
        if kind == QEvent.Type.ParentChange:
            self._follow_ancestors()
            if panel is not None and watched is panel:
                if panel.parent() is not None:
                    self._docked = True
                elif self._docked:
                    self._closed()
        elif kind == QEvent.Type.Close:
            if watched is panel:
                self._closed()
            elif self._on_window_closing is not None:
                self._on_window_closing()  # before the window goes, whether or not the close then goes ahead
        return False

    def _closed(self) -> None:
        if not self._done:
            self._done = True
            self._on_closed()

    def _follow_ancestors(self) -> None:
        """Filter the events of every widget above the panel: napari docks the panel, then the dock, so
        the chain is looked up again whenever one of them moves."""
        panel = self._panel()
        chain, widget = [], panel.parentWidget() if panel is not None else None
        while widget is not None:
            chain.append(widget)
            widget = widget.parentWidget()
        known = [ref() for ref in self._ancestors]
        for old in filter(None, known):
            if all(old is not new for new in chain):
                with contextlib.suppress(RuntimeError):  # already deleted by Qt
                    old.removeEventFilter(self)
        for new in chain:
            if all(new is not old for old in known):
                new.installEventFilter(self)
        self._ancestors = [weakref.ref(widget) for widget in chain]
