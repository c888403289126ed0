"""The model a clinician would predict with next: the one Train just wrote, or the newest in the site
they opened. Predict and Batch predict start with it, so nobody has to find ``SITE/models/...``."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLineEdit

from fedmix_engine.site_models import newest_site_model


class LatestModel(QObject):
    """One per napari session: ``announce`` a model, and every field that ``follow``s it shows it."""

    written = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self.path = ""

    def announce(self, path: str | Path) -> None:
        self.path = str(path)
        self.written.emit(self.path)

    def announce_site(self, site: str | Path) -> None:
        """A site was opened: its newest model, if it has one, is the one to predict with."""
        if (model := newest_site_model(site)) is not None:
            self.announce(model)

    def follow(self, field: QLineEdit) -> None:
        """Show the latest model in ``field`` now and whenever another is announced, unless the user has
        chosen a model of their own there (a field that is empty or still shows the previous one follows)."""
        follower = _Follower(field, self.path)
        self.written.connect(follower.show)  # a bound method of a child of the field: gone with it


class _Follower(QObject):
    def __init__(self, field: QLineEdit, path: str) -> None:
        super().__init__(field)
        self.field, self.shown = field, ""
        self.show(path)

    def show(self, path: str) -> None:
        if self.field.text() in ("", self.shown):
            self.field.setText(path)
        self.shown = path


_LATEST: LatestModel | None = None


def latest_model() -> LatestModel:
    """The session's; it starts with the newest model of the default site folder (Preferences › FedMix),
    so Predict has it even when Annotate site was never opened."""
    global _LATEST
    if _LATEST is None:
        from napari_fedmix.settings import plugin_defaults

        _LATEST = LatestModel()
        if site := plugin_defaults()["default_site_folder"]:
            _LATEST.announce_site(site)
    return _LATEST
