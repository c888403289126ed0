"""The fields the Predict, Batch predict and Evaluate widgets share: a path with its browse buttons, the
model they run (the checkpoint chosen, on the device Preferences › FedMix names) and a threshold."""

from __future__ import annotations

from qtpy.QtWidgets import QDoubleSpinBox, QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget

from fedmix_engine.errors import InputError

CHECKPOINT_FILES = "Checkpoints (*.safetensors)"


def path_row(edit: QLineEdit, parent: QWidget, title: str, folder: bool = False,
             files: str | None = None) -> QHBoxLayout:
    """A path field with a browse button for a folder, for a file matching ``files`` (a Qt name filter),
    or one of each ("folder…", "file…") when it takes either."""
    row = QHBoxLayout()
    row.addWidget(edit)
    choosers = []
    if folder:
        choosers.append(("folder…", lambda: QFileDialog.getExistingDirectory(parent, title)))
    if files is not None:
        choosers.append(("file…", lambda: QFileDialog.getOpenFileName(parent, title, filter=files)[0]))
    for text, choose in choosers:
        button = QPushButton(text if len(choosers) > 1 else "…")
        button.setObjectName(text)
        button.setToolTip(title)

        def set_path(_checked: bool = False, choose=choose) -> None:
            if path := choose():
                edit.setText(path)

        button.clicked.connect(set_path)
        row.addWidget(button)
    return row


def preferred_device() -> str:
    """Preferences › FedMix › device: for prediction as for training (auto, cpu, cuda or mps)."""
    from napari_fedmix.settings import plugin_defaults

    return plugin_defaults()["device"]


def chosen_checkpoint(field: QLineEdit) -> str:
    if not (path := field.text().strip()):
        raise InputError("model", "choose a checkpoint (.safetensors) first; training, or opening a site that "
                                  "has a model, fills it in")
    return path


def threshold_field() -> QDoubleSpinBox:
    """A probability threshold (0.01–0.99, 0.50 by default), as the CLI's ``--threshold``: Batch predict cuts
    its masks there and Evaluate scores them there, at the value Predict's slider showed right on one image."""
    field = QDoubleSpinBox()
    field.setRange(0.01, 0.99)
    field.setSingleStep(0.05)
    field.setDecimals(2)
    field.setValue(0.5)
    field.setToolTip("probability above which a pixel is foreground (Predict's slider shows what a threshold "
                     "gives on one image)")
    return field
