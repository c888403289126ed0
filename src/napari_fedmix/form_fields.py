"""The fields the Predict, Batch predict and Evaluate widgets share: a path with its browse buttons, and
the model they run (the checkpoint chosen, on the device Preferences › FedMix names)."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget

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
    """Preferences › FedMix › device: for prediction as for training (auto, cpu or cuda)."""
    from napari_fedmix.settings import plugin_defaults

    return plugin_defaults()["device"]


def chosen_checkpoint(field: QLineEdit) -> str:
    if not (path := field.text().strip()):
        raise InputError("model", "choose a checkpoint (.safetensors) first; training, or opening a site that "
                                  "has a model, fills it in")
    return path
