"""Edits still on screen are saved before a site is read for training: Train asks, Annotate saves.

Annotate saves when the image changes and every 15 s; a clinician who draws a mask and presses Start
at once trained without it (the run had read the site before the autosave)."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QObject, Signal


class PendingEdits(QObject):
    """One per napari session: ``save_requested`` carries the resolved folder of a site about to be read."""

    save_requested = Signal(str)

    def request_save(self, site: str | Path) -> None:
        """Every Annotate panel showing ``site`` saves its edits now (in this thread, before this returns)."""
        self.save_requested.emit(str(Path(site).resolve()))


_SESSION: PendingEdits | None = None


def pending_edits() -> PendingEdits:
    global _SESSION
    if _SESSION is None:
        _SESSION = PendingEdits()
    return _SESSION
