"""Evaluate model: how good is this model on my labelled images? ``fedmix-engine evaluate`` in napari,
for a clinician handed the federation's model: per class Dice, IoU and HD95 (in mm where the images
have a pixel spacing) over a site's fully labelled images, the mean figure simulate and Train
report, and optionally every image's scores as CSV. The engine does the work (``evaluation``)."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from qtpy.QtWidgets import (
    QAbstractScrollArea,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from fedmix_engine.errors import InputError, error_line
from napari_fedmix.form_fields import CHECKPOINT_FILES, chosen_checkpoint, path_row, preferred_device, threshold_field
from napari_fedmix.latest_model import latest_model
from napari_fedmix.panel_closing import PanelClosing
from napari_fedmix.workers import make_worker, until_stopped

if TYPE_CHECKING:
    import napari
    from napari.qt.threading import WorkerBase

# the table's rows, one column per class: it stays readable in a narrow dock ("with the class": a
# cyst column's count of images holding a cyst, not of images with a lesion)
METRICS = ("images", "with the class", "Dice mean ± std", "IoU mean", "HD95 px (median)", "HD95 mm (median)")


class EvaluateWidget(QWidget):
    """A model's scores on a labelled site folder, per class, in a table."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.checkpoint, self.site, self.scores_file = QLineEdit(), QLineEdit(), QLineEdit()
        self.checkpoint.setPlaceholderText("SITE/models/global.safetensors")
        latest_model().follow(self.checkpoint)
        # no default: the default site is the one trained on, and its scores would flatter the model
        self.site.setPlaceholderText("a site folder with masks the model was not trained on")
        self.scores_file.setPlaceholderText("optional: every image's scores, e.g. scores.csv")
        self.threshold = threshold_field()  # the operating point a clinic chose on Predict's slider, measured
        self.run_button, self.stop_button = QPushButton("Evaluate"), QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.stop_button.clicked.connect(self.stop)
        self.progress = QProgressBar()
        self.table = QTableWidget(len(METRICS), 0)
        self.table.setVerticalHeaderLabels(METRICS)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSizeAdjustPolicy(QAbstractScrollArea.SizeAdjustPolicy.AdjustToContents)  # no empty rows
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Maximum)
        self.status = QLabel("")
        self.status.setWordWrap(True)  # the result names the model and says how HD95 was measured: 4 lines
        self.status.setMinimumHeight(4 * self.status.fontMetrics().lineSpacing())
        self.worker = None
        self._closing = PanelClosing(self, on_closed=self.stop)  # its ✕: no scoring left running unseen
        self.stop_requested = threading.Event()  # Stop: the running worker's, set
        self.done = (0, 0)
        form = QFormLayout(self)
        form.addRow("model", path_row(self.checkpoint, self, "Model checkpoint", files=CHECKPOINT_FILES))
        form.addRow("labelled site", path_row(self.site, self, "Labelled site folder", folder=True))
        form.addRow("scores CSV", self.scores_file)
        form.addRow("threshold", self.threshold)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.table)
        form.addRow(self.status)

    def run(self) -> WorkerBase | None:
        """Score the model on the site in a worker, which also loads the model (a reference-width pair is
        140 MB, from a share perhaps); the table and status show the result. Bad input (no model, a corrupt
        one, a site without full ground truth, classes in another order) is said in the status line."""
        from fedmix_engine.atomic import check_writable_file
        from fedmix_engine.evaluation import iter_score_site, left_out_note, own_model_note
        from fedmix_engine.predict import Predictor

        try:
            if not (site := self.site.text().strip()):
                raise InputError("labelled site", "choose a site folder whose images have masks")
            scores = check_writable_file(self.scores_file.text().strip()) if self.scores_file.text().strip() else None
            model, device = chosen_checkpoint(self.checkpoint), preferred_device()
        except InputError as exc:
            self.status.setText(error_line(exc))
            return None
        self.table.setColumnCount(0)
        self.done = (0, 0)
        self.status.setText(f"evaluating {Path(model).name} on {site}…")
        threshold = round(self.threshold.value(), 2)

        def scoring():  # in the worker: the model is loaded, the site's records read and the scores written there
            predictor = Predictor.from_checkpoint(model, device)
            rows = yield from iter_score_site(predictor, site, threshold)
            return _Scored(rows, f"{Path(model).name} ({predictor.describe()})", threshold,
                           left_out_note(site, len({row.image for row in rows})), own_model_note(model, site),
                           _saved_scores(scores, rows, threshold) if scores else "")

        self.stop_requested = threading.Event()
        self.worker = make_worker(until_stopped, scoring(), self.stop_requested, on_error=self._on_error)
        self.worker.yielded.connect(self._on_image)
        self.worker.returned.connect(self._show)
        self.worker.finished.connect(self._finished)
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.worker.start()
        return self.worker

    def stop(self) -> None:
        """Stop after the current image; the worker then lets go of the model and the site."""
        if self.worker is not None:
            self.stop_requested.set()

    def _on_image(self, step: tuple[int, int]) -> None:
        self.done = step
        self.progress.setRange(0, step[1])
        self.progress.setValue(step[0])

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(error_line(exc))

    def _finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    def _show(self, scored: _Scored | None) -> None:
        """The table and status of a finished evaluation; of a stopped one (None), only why there is none."""
        from fedmix_engine.evaluation import mean_image_dice, summarise

        if scored is None:
            self.status.setText(f"stopped after {self.done[0]} of {self.done[1]} images: no scores (they would "
                                "not be the site's)")
            return
        rows, threshold = scored.rows, scored.threshold

        summary = summarise(rows)
        self.table.setColumnCount(len(summary))
        self.table.setHorizontalHeaderLabels([c.label for c in summary])
        for column, c in enumerate(summary):
            cells = (str(c.images), str(c.lesion_images), f"{c.dice_mean:.3f} ± {c.dice_std:.3f}",
                     f"{c.iou_mean:.3f}", _number(c.hd95_median, 1), _number(c.hd95_mm_median, 2))
            for row, text in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(text))
        images = len({row.image for row in rows})
        calibrated = max((c.with_spacing for c in summary), default=0)
        in_mm = (f"HD95 in mm from {calibrated} of {images} images (those with a pixel spacing)" if calibrated
                 else "no image has a pixel spacing: HD95 in pixels only")
        reported = ("as simulate and Train report" if threshold == 0.5
                    else f"masks at probability > {threshold:g}; simulate and Train report at 0.5")
        left = f" ({scored.left_out})" if scored.left_out else ""
        notes = [f"{images} image(s) with full ground truth{left}; mean Dice over images {mean_image_dice(rows):.3f} "
                 f"({reported})", f"{in_mm}; undefined where one mask is empty", f"model: {scored.model}"]
        if scored.saved:
            notes.append(scored.saved)
        self.status.setText("\n".join(notes + ([f"note: {scored.own}"] if scored.own else [])))


class _Scored(NamedTuple):
    """What the worker found: the rows to show, and the notes made beside them (off the GUI thread)."""

    rows: list  # ImageScore per image and class
    model: str  # the checkpoint evaluated and its device (the field may have changed since)
    threshold: float  # where the masks were cut
    left_out: str | None  # how many of the site's images had no full ground truth
    own: str | None  # that the model is the scored site's own
    saved: str  # where every image's scores were written, or why not, or ""


def _saved_scores(path: Path, rows: list, threshold: float) -> str:
    """Every image's scores written to ``path`` (in the worker: a CSV on a share can take seconds), said in
    the status line, as is a failure to write them (the table still shows)."""
    from fedmix_engine.evaluation import write_scores

    try:
        write_scores(path, rows, threshold)
        return f"every image's scores: {path}"
    except OSError as exc:
        return f"scores not saved: {path}: {exc.strerror or exc}"


def _number(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"
