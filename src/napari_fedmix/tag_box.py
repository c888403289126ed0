"""A class's image-level tag as a three-state check box: ✓ present, – absent, empty: not tagged (unknown).

napari's theme draws Qt's "partially checked" as a minus and "unchecked" as an empty box. An image nobody
has tagged must look untouched, and a clinician reads "–" as "absent" (lesion –), so a tag maps onto the
states that way, here only, rather than onto Qt's order. A click steps unknown → present → absent →
unknown: present, the first thing marked on an image, stays one click away."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox

_STATE = {None: Qt.CheckState.Unchecked, True: Qt.CheckState.Checked, False: Qt.CheckState.PartiallyChecked}
_TAG = {state: tag for tag, state in _STATE.items()}
_NEXT = {None: True, True: False, False: None}
LEGEND = "✓ present, – absent, empty = not tagged"  # what the box shows, said beside the boxes


class TagBox(QCheckBox):
    """A check box whose state is a tag: True (present), False (absent) or None (not tagged)."""

    def __init__(self, class_name: str):
        super().__init__(class_name)
        self.setTristate(True)
        self.set_tag(None)

    def tag(self) -> bool | None:
        return _TAG[Qt.CheckState(self.checkState())]

    def set_tag(self, tag: bool | None) -> None:
        self.setCheckState(_STATE[tag])

    def nextCheckState(self) -> None:  # Qt calls it on a click
        self.set_tag(_NEXT[self.tag()])
