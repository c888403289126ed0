"""Prediction overlays for the active image, and batch prediction of whole folders (both call the engine)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from fedmix_engine.errors import InputError, error_line
from napari_fedmix.form_fields import (
    CHECKPOINT_FILES,
    chosen_checkpoint,
    path_row,
    preferred_device,
    threshold_field,
)
from napari_fedmix.latest_model import latest_model
from napari_fedmix.layer_records import image_layer_pixels, label_features, layer_spacing
from napari_fedmix.panel_closing import PanelClosing
from napari_fedmix.workers import make_worker, until_stopped

if TYPE_CHECKING:
    import napari
    from napari.qt.threading import WorkerBase

    from fedmix_engine.predict import BatchRow, Predictor

PROB_LAYER, PRED_LAYER = "FedMix probability", "FedMix prediction"
DISAGREE_LAYER = "FedMix networks disagree"  # |p¹ − p²|: what FedMix's agreement rule sees, per pixel


def predictable_files_filter() -> str:
    """The file dialog's filter for batch input: images and videos, and every file (DICOM exports often
    have no suffix)."""
    from fedmix_engine.data.imageio import PREDICTABLE_SUFFIXES

    patterns = " ".join(f"*{suffix}" for suffix in PREDICTABLE_SUFFIXES)
    return f"Images and videos ({patterns});;All files (*)"


class PredictWidget(QWidget):
    """Run the model on the active image into one reused pair of layers; threshold with a slider."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("SITE/models/global.safetensors")
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(1, 99)
        self.threshold.setValue(50)
        self.threshold.valueChanged.connect(self._apply_threshold)
        self.threshold_value = QLabel()  # the slider alone did not say which threshold a mask was made at
        self.threshold.valueChanged.connect(lambda value: self.threshold_value.setText(f"{value / 100:.2f}"))
        self.threshold_value.setText(f"{self.threshold.value() / 100:.2f}")
        self.button = QPushButton("Predict active image")
        self.button.clicked.connect(self.predict_active)
        self.show_disagreement = QCheckBox("also show where the pair's two networks disagree")
        self.to_mask = QPushButton("Use the prediction as the mask, to correct")
        self.to_mask.clicked.connect(self.use_as_mask)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.worker = None  # a running stack prediction
        self.stop_requested = threading.Event()  # Stop: the running stack's, set
        self._closing = PanelClosing(self, on_closed=self.stop)  # its ✕: no prediction left running unseen
        self.status = QLabel("")
        self.status.setWordWrap(True)  # the result names the model: three lines in a narrow dock, not clipped
        self.status.setMinimumHeight(3 * self.status.fontMetrics().lineSpacing())
        self._probability: np.ndarray | None = None
        # the model loaded last, with (checkpoint, device, the file's identity); replaced whole, as a worker sets it
        self._loaded: tuple[tuple, Predictor] | None = None
        self._geometry: dict = {"scale": (1.0, 1.0), "translate": (0.0, 0.0)}  # the predicted layer's, all axes
        self._status_tail = ""  # after the foreground in the status line: the disagreement and the model
        self._spacing: tuple[float, float] | None = None  # the predicted layer's pixel spacing in mm
        self._source: tuple[str, object] | None = None  # the predicted layer's name and data
        self._classes: list[str] = []  # the predicted classes' names, label k = class k
        latest_model().follow(self.checkpoint)
        form = QFormLayout(self)
        form.addRow("model", path_row(self.checkpoint, self, "Model checkpoint", files=CHECKPOINT_FILES))
        slider = QHBoxLayout()
        slider.addWidget(self.threshold)
        slider.addWidget(self.threshold_value)
        form.addRow("threshold", slider)
        form.addRow(self.show_disagreement)
        buttons = QHBoxLayout()
        buttons.addWidget(self.button)
        buttons.addWidget(self.stop_button)
        form.addRow(buttons)
        form.addRow(self.to_mask)
        form.addRow(self.status)

    def predictor(self) -> Predictor:
        """The chosen model on the preferred device (see ``_load``)."""
        return self._load(chosen_checkpoint(self.checkpoint), preferred_device())

    def _load(self, checkpoint: str, device: str) -> Predictor:
        """``checkpoint`` loaded once while its file stays the same: each round of a federation (and training
        again) writes the site's model anew at the same path, and the next prediction takes it. Called in the
        prediction's worker: a reference-width pair is 140 MB, perhaps on a share."""
        from fedmix_engine.predict import Predictor

        key = (checkpoint, device, _file_identity(checkpoint))
        if (loaded := self._loaded) is not None and loaded[0] == key:
            return loaded[1]
        predictor = Predictor.from_checkpoint(checkpoint, device)
        self._loaded = (key, predictor)
        return predictor

    def predict_active(self) -> WorkerBase | None:
        """Start prediction in a worker; returns the worker (tests wait on it). A stack (a cine loop, a
        volume's slices) is predicted frame by frame with progress, and Stop ends it between batches."""
        from fedmix_engine.checkpoint import checkpoint_model
        from fedmix_engine.data.imageio import validate_image
        from fedmix_engine.predict import stack_frames
        from fedmix_engine.steps import labelled

        layer = self._image_layer()
        if layer is None:
            self.status.setText("no image layer to predict")
            return None
        where, rgb = f"layer '{layer.name}'", bool(getattr(layer, "rgb", False))
        try:  # a wrong shape or NaNs in a 2-D image: said here, not in a worker
            data = image_layer_pixels(layer, lazy=True)  # a stack is read a batch at a time while predicting
            stack = data.ndim > (3 if rgb else 2)
            if stack:
                frames, _ = stack_frames(data, rgb, where)
            else:
                data = validate_image(np.asarray(data), where)
            checkpoint, device = chosen_checkpoint(self.checkpoint), preferred_device()
            if stack:  # from the checkpoint's header: its weights are loaded in the worker
                _check_overlays_fit(frames.shape[:3], checkpoint_model(checkpoint).num_classes, where)
        except InputError as exc:
            self.status.setText(error_line(exc))
            return None
        # the overlays sit on the image's pixels: same scale and offset (pixel spacing from a reader)
        geometry = {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}
        spacing = layer_spacing(layer)  # mm, for the lesion's area
        source = (layer.name, layer.data)
        disagreement = self.show_disagreement.isChecked()
        self.status.setText(f"predicting {layer.name}…")
        if stack:
            def maps():
                predictor = self._load(checkpoint, device)
                colour = predictor.sees_in_grey(frames[0])  # by its first frame, as batch predict judges a stack
                probability = yield from labelled(predictor.iter_stack_probabilities(data, rgb, where), "frame")
                if not disagreement:
                    return probability, None, colour, predictor
                return probability, (yield from labelled(predictor.iter_stack_disagreement(data, rgb, where),
                                                         "networks' disagreement: frame")), colour, predictor

            self.stop_requested = threading.Event()
            worker = make_worker(until_stopped, maps(), self.stop_requested, on_error=self._on_error)
            worker.yielded.connect(lambda step: self.status.setText(
                f"predicting {layer.name}: {step[0]} {step[1]} of {step[2]}"))
            worker.finished.connect(self._stack_finished)
            self.stop_button.setEnabled(True)
            self.button.setEnabled(False)  # one stack at a time: a second would race the first for the overlays
            self.worker = worker
        else:
            def maps():
                predictor = self._load(checkpoint, device)
                return (predictor.probabilities(data, where), predictor.disagreement(data, where) if disagreement
                        else None, predictor.sees_in_grey(data), predictor)

            worker = make_worker(maps, on_error=self._on_error)

        def shown(result: tuple | None) -> None:
            if result is None:  # a stopped stack: its frames so far were let go in the worker
                self.status.setText(f"stopped: {layer.name} was not predicted (overlays unchanged)")
            else:
                self._show(*result, geometry, source, spacing, Path(checkpoint).name)

        worker.returned.connect(shown)
        worker.start()
        return worker

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(error_line(exc))

    def _stack_finished(self) -> None:
        self.stop_button.setEnabled(False)
        self.button.setEnabled(True)
        self.worker = None

    def stop(self) -> None:
        """Stop a running stack prediction after its current batch of frames."""
        if self.worker is not None:
            self.stop_requested.set()

    def _image_layer(self):
        """The active image layer, else the top one; never this widget's own probability overlay."""
        images = [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Image" and lyr.name != PROB_LAYER]
        active = self.viewer.layers.selection.active
        return active if active in images else (images[-1] if images else None)

    def _show(self, probability: np.ndarray, disagreement: np.ndarray | None, colour_as_grey: bool,
              predictor: Predictor, geometry: dict, source: tuple[str, object], spacing: tuple[float, float] | None,
              model_file: str) -> None:
        """The overlays and status of a prediction made by ``predictor`` (loaded from ``model_file``)."""
        self._probability, self._geometry, self._source = probability, geometry, source
        self._spacing = spacing
        self._classes = predictor.class_names()
        # added, not laid over: magma's black (no lesion) leaves the scan as it was, undimmed
        self._overlay(PROB_LAYER, probability.max(axis=0), self.viewer.add_image, colormap="magma", opacity=0.5,
                      contrast_limits=(0, 1), blending="additive")
        disagree = ""
        if disagreement is not None:
            self._overlay(DISAGREE_LAYER, disagreement.max(axis=0), self.viewer.add_image, colormap="viridis",
                          opacity=0.5, contrast_limits=(0, 1), blending="additive")
            differ = float((disagreement > 0.5).any(axis=0).mean())
            disagree = f"; the two networks differ by more than 0.5 on {differ:.1%} of it"
        elif DISAGREE_LAYER in self.viewer.layers:  # an earlier image's: it would not fit this prediction
            self.viewer.layers.remove(DISAGREE_LAYER)
        model = f"{model_file} ({predictor.describe()})"
        seen = "image" if probability.ndim == 3 else "stack"  # K×H×W, or a stack's K×…×H×W
        note = (f"; in colour, but the model is grey: it saw only the {seen}'s brightness (luma), so what its colour "
                "shows, such as Doppler flow, played no part") if colour_as_grey else ""
        self._status_tail = f"{disagree}; model: {model}{note}"
        self._apply_threshold()

    def _apply_threshold(self) -> None:
        """The mask at the slider's threshold, and the status line's foreground (in mm² too when the
        image layer is calibrated in a length: the lesion's size; a stack's per frame), which follows the slider."""
        if self._probability is None:
            return
        from fedmix_engine.predict import probabilities_to_labels

        labels = probabilities_to_labels(self._probability, self.threshold.value() / 100)
        self._overlay(PRED_LAYER, labels, self.viewer.add_labels, opacity=0.5)
        self.viewer.layers[PRED_LAYER].features = label_features(self._classes)
        foreground = labels > 0
        pixel_mm2 = self._spacing[0] * self._spacing[1] if self._spacing is not None else None
        frames = 1 if labels.ndim == 2 else len(labels)  # a stack's area: per frame, averaged (as summary.csv)

        def mm2(pixels: np.ndarray) -> str:
            return f" {int(pixels.sum()) * pixel_mm2 / frames:.1f} mm²" if pixel_mm2 is not None else ""

        shares = [f"{name} {float((labels == k).mean()):.1%}{mm2(labels == k)}"
                  for k, name in enumerate(self._classes, 1)]
        each_frame = " per frame, averaged" if frames > 1 else ""
        details = [mm2(foreground).strip() + each_frame] if pixel_mm2 is not None else []
        if len(shares) > 1:  # which class is how much of it
            details.append(" · ".join(shares))
        said = f" ({'; '.join(details)})" if details else ""
        self.status.setText(f"foreground {float(foreground.mean()):.1%} of the "
                            f"{'image' if labels.ndim == 2 else 'stack'}{said}{self._status_tail}")

    def _overlay(self, name: str, data: np.ndarray, add, **style) -> None:
        """Put ``data`` in the reused overlay ``name`` at the predicted image's geometry; a layer of
        another dimensionality (a 2-D image's overlay, now a stack's) is replaced, not reshaped."""
        layers = self.viewer.layers
        if name in layers and layers[name].ndim == data.ndim:
            layers[name].data = data
            self._place(layers[name])
            return
        if name in layers:
            layers.remove(name)
        add(data, name=name, **style, **self._geometry)

    def use_as_mask(self) -> bool:
        """Copy the thresholded prediction into the annotate widget's mask layer, so that a clinician
        corrects it instead of drawing from nothing; the annotate widget saves it like a drawn mask.

        Refused (with the reason in the status line) unless the prediction is of the image the annotate
        widget shows, that image is unchanged since, and its mask layer is empty: nothing drawn is replaced."""
        from napari_fedmix.annotate_widget import CLASSES_KEY, IMAGE_LAYER, MASK_LAYER

        layers = self.viewer.layers
        if self._source is None or PRED_LAYER not in layers:
            reason = "predict the image first"
        elif self._source[0] != IMAGE_LAYER or MASK_LAYER not in layers:
            reason = f"predict the annotate widget's image ('{IMAGE_LAYER}'), then use it as its mask"
        elif layers[IMAGE_LAYER].data is not self._source[1]:
            reason = "the annotate widget shows another image since this prediction; predict again"
        elif len(classes := layers[MASK_LAYER].metadata.get(CLASSES_KEY, [])) != len(self._probability):
            reason = (f"the model predicts {len(self._probability)} class(es), the site has {len(classes)} "
                      f"({', '.join(classes)}): its labels would not mean the site's classes; choose this "
                      "site's model")
        elif np.asarray(layers[MASK_LAYER].data).any():
            reason = f"'{MASK_LAYER}' already holds labels; clear them first, so that nothing drawn is replaced"
        else:
            layers[MASK_LAYER].data = np.asarray(layers[PRED_LAYER].data, dtype=np.uint8).copy()
            layers.selection.active = layers[MASK_LAYER]
            self.status.setText(f"the prediction is now '{MASK_LAYER}': correct it there; it is saved like a "
                                "drawn mask")
            return True
        self.status.setText(reason)
        return False

    def _place(self, overlay) -> None:
        overlay.scale, overlay.translate = self._geometry["scale"], self._geometry["translate"]


def _file_identity(path: str) -> tuple[int, int, int] | None:
    """What tells a file written anew at the same path (an atomic write is a new file): its inode, size
    and modification time; None when it cannot be read (loading it then says why)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


def _check_overlays_fit(frames: tuple[int, int, int], classes: int, where: str) -> None:
    """Refuse a stack whose overlays would not fit in the memory that is free: the probabilities (float32
    per class, kept for the threshold slider), their maximum shown as a layer, and the labels."""
    _check_memory(int(np.prod(frames)) * (4 * classes + 4 + 1), where, "its prediction overlays",
                  "predict it with Batch predict (Layers › Segment › FedMix), which writes its masks frame by "
                  "frame, or open a shorter clip")


def _check_memory(need: int, where: str | Path, what: str, instead: str) -> None:
    """Refuse to make ``need`` bytes of layers when they exceed 80 % of the free memory: past that, the
    system kills napari, and unsaved labels with it."""
    import psutil

    free = psutil.virtual_memory().available
    if need > 0.8 * free:
        raise InputError(where, f"{what} would take {_memory_size(need)} and {_memory_size(free)} are free: {instead}")


def _memory_size(size: float) -> str:
    unit, scale = next(((u, f) for u, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if size >= f), ("B", 1))
    return f"{size / scale:.1f} {unit}"


@dataclass(frozen=True)
class _BatchStarted:
    """The worker's first item, once the batch is made (its output folder held, its files counted)."""

    total: int  # files in the batch


@dataclass(frozen=True)
class _BatchEnded:
    """The worker's last item, made after its summary.csv was written: what the finished line says, and the
    masks to open. Made in the worker, as the folder's walk and the masks' reading can take seconds on a
    share; only the layers are added on the GUI thread."""

    kept: int  # masks kept from the stopped batch being continued
    notes: list[str]  # what a finished batch tells its user although it succeeded
    masks: list[tuple[str, np.ndarray]]  # the written masks and their layer names, when they are to be opened
    unopened: str  # why the masks are not opened, or ""


class BatchPredictWidget(QWidget):
    """Predict every image of a folder (or one image, stack or video file) into mask TIFFs and a CSV;
    odd files are skipped and listed."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.input, self.checkpoint, self.output = QLineEdit(), QLineEdit(), QLineEdit()
        self.checkpoint.setPlaceholderText("SITE/models/global.safetensors")
        latest_model().follow(self.checkpoint)
        self._suggested_output = ""
        self.input.textChanged.connect(self._suggest_output)
        self.threshold = threshold_field()  # the CLI's --threshold: the one a clinician chose on Predict's slider
        self.recursive = QCheckBox("include sub-folders (a PACS export's patient and series folders)")
        self.resume = QCheckBox("continue the stopped batch in this output folder (keep the masks it wrote)")
        self.open_results = QCheckBox("open the masks as one stack when done")
        self.dicom_seg = QCheckBox("also write DICOM images' masks as DICOM SEG (for the PACS)")
        self.run_button, self.cancel_button = QPushButton("Run"), QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)  # the output folder and a note: lines in a narrow dock, not a wider one
        self.skipped = QListWidget()
        self.worker = None
        self._closing = PanelClosing(self, on_closed=self.cancel)  # its ✕: no batch left running unseen
        self.rows: list = []
        self.total, self.error = 0, None
        self.started, self.ended = False, None  # the worker's _BatchStarted came; its _BatchEnded, when it came
        self.stop_requested = threading.Event()
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("images", path_row(self.input, self, "Images: a folder, or one image, stack or video file",
                                        folder=True, files=predictable_files_filter()))
        form.addRow("model", path_row(self.checkpoint, self, "Model checkpoint", files=CHECKPOINT_FILES))
        form.addRow("output folder", path_row(self.output, self, "Output folder", folder=True))
        form.addRow("threshold", self.threshold)
        layout.addLayout(form)
        layout.addWidget(self.recursive)
        layout.addWidget(self.resume)
        layout.addWidget(self.open_results)
        layout.addWidget(self.dicom_seg)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("skipped files:"))
        layout.addWidget(self.skipped)

    def run(self) -> WorkerBase | None:
        """Check the form here (a missing folder, a wrong threshold or no model are said at once), then load
        the model, list the files and predict in a worker: on a network share the listing of a PACS export
        took napari's window away for seconds. The worker's first item says the batch is made; its last,
        after the batch's summary.csv, what the finished line says and the masks to open."""
        from fedmix_engine.predict import (
            FrameStep,
            Predictor,
            batch_notes,
            check_batch,
            earlier_masks,
            iter_predict_folder,
            unread_subfolders,
        )

        try:
            if not (self.input.text() and self.output.text()):
                raise InputError("images", "choose the images (a folder, or one file) and an output folder")
            source, out = self.input.text(), Path(self.output.text())
            recursive, resume = self.recursive.isChecked(), self.resume.isChecked()
            dicom_seg, threshold = self.dicom_seg.isChecked(), round(self.threshold.value(), 2)
            check_batch(source, threshold, out, recursive)  # stops at the first image: quick on a share too
            checkpoint, device = chosen_checkpoint(self.checkpoint), preferred_device()
        except InputError as exc:
            self.status.setText(error_line(exc))
            return None

        stop = self.stop_requested = threading.Event()  # Cancel: the worker stops and closes the batch itself
        open_results = self.open_results.isChecked()

        def rows():
            predictor = Predictor.from_checkpoint(checkpoint, device)
            if stop.is_set():
                return  # cancelled while the model loaded: nothing written
            unread = [] if recursive else unread_subfolders(source, out)  # the output folder is left out anyway
            device_note = [predictor.plan.note] if predictor.plan.gpu_not_used else []  # as predict's CLI says
            batch = iter_predict_folder(predictor, source, out, threshold, dicom_seg=dicom_seg,  # makes the folder
                                        frame_steps=True, recursive=recursive, resume=resume)
            done: list[BatchRow] = []
            yield _BatchStarted(batch.total)
            # stopped between two files, or two batches of a stack's frames: the summary lists the rest as not run
            for item in until_stopped(batch, stop):
                if not isinstance(item, FrameStep):
                    done.append(item[2])
                yield item
            notes = device_note + batch_notes(done, unread, earlier_masks(out, done))
            masks, unopened = _read_masks(done, out) if open_results else ([], "")
            yield _BatchEnded(batch.kept, notes, masks, unopened)

        self.rows, self.total, self.error, self.started, self.ended = [], 0, None, False, None
        self.skipped.clear()
        self.progress.setRange(0, 0)  # busy until the files are counted
        self.status.setText("loading the model and listing the files…")
        self.worker = make_worker(rows, on_error=self._on_error)
        self.worker.yielded.connect(self._on_row)
        self.worker.finished.connect(lambda: self._on_finished(out))
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.worker.start()
        return self.worker

    def _suggest_output(self, images: str) -> None:
        """``<images>-masks`` beside the images folder (or file), unless an output folder was chosen."""
        if self.output.text() not in ("", self._suggested_output):
            return
        source = Path(images.strip())
        self._suggested_output = str(source.parent / f"{source.stem}-masks") if images.strip() else ""
        self.output.setText(self._suggested_output)

    def cancel(self) -> None:
        """Stop after the current image (a stack: its current frames); the worker then closes the batch, so
        its summary.csv is written off the GUI thread too."""
        if self.worker is not None:
            self.status.setText("stopping after the current image (a stack: its current frames)…")
            self.stop_requested.set()

    def _on_row(self, item) -> None:
        from fedmix_engine.predict import FrameStep

        if isinstance(item, _BatchEnded):
            self.ended = item
            return
        if isinstance(item, _BatchStarted):
            self.started, self.total = True, item.total
            self.progress.setRange(0, self.total)
            self.progress.setValue(0)
            self.status.setText(f"0/{self.total}: predicting…")
            return
        if isinstance(item, FrameStep):  # a stack's frames: Cancel stops between two batches of them
            of = f" of {item.frames}" if item.frames else ""
            self.status.setText(f"{len(self.rows) + 1}/{self.total}: {item.file.name}, frame {item.done}{of}")
            return
        done, self.total, row = item
        self.rows.append(row)
        self.progress.setRange(0, self.total)
        self.progress.setValue(done)
        self.status.setText(f"{done}/{self.total}: {row.file}")
        if row.failed:  # a file that is no image to predict (a report, a DICOMDIR) is counted, not listed
            self.skipped.addItem(f"{row.file}: {row.status}")
        elif row.seg_file.startswith("not written"):
            self.skipped.addItem(f"{row.file}: mask written, DICOM SEG {row.seg_file}")

    def _on_error(self, exc: Exception) -> None:
        self.error = exc
        self.status.setText(error_line(exc))

    def _on_finished(self, out: Path) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None
        if not self.started:  # refused before its first file (a corrupt model, another batch's folder): said
            self.progress.setRange(0, 1)
            if self.error is None:  # cancelled while the model loaded
                self.status.setText("stopped before the first file: nothing written")
            return
        written = [r for r in self.rows if r.status == "ok"]
        skipped = sum(r.failed for r in self.rows)
        others = sum(r.status != "ok" and not r.failed for r in self.rows)
        said = self.status.text()  # an error's line
        if self.error is None and self.ended is not None:
            stopped = f"stopped after {len(self.rows)} of {self.total} files; " if len(self.rows) < self.total else ""
            kept = f" ({self.ended.kept} kept from the earlier batch)" if self.ended.kept else ""
            not_images = f"; {others} other file(s) not images" if others else ""
            said = (f"{stopped}{len(written)} mask(s) written to {out}{kept} (summary.csv); "
                    f"{skipped} skipped{not_images}")
            if self.ended.masks:
                self._open_masks(self.ended.masks)
            if self.ended.unopened:
                said += f"; masks not opened: {self.ended.unopened}"
            said += "".join(f". Note: {note}" for note in self.ended.notes)
        self.status.setText(said)

    def _open_masks(self, masks: list[tuple[str, np.ndarray]]) -> None:
        """The batch's masks as label layers (one stack when they share a shape)."""
        if len({mask.shape for _, mask in masks}) == 1:
            self.viewer.add_labels(np.stack([mask for _, mask in masks]), name="FedMix batch masks")
        else:
            for name, mask in masks:
                self.viewer.add_labels(mask, name=name)


def _read_masks(rows: list[BatchRow], out: Path) -> tuple[list[tuple[str, np.ndarray]], str]:
    """A batch's written masks by layer name, read to be opened; or none, and why (they would not fit in
    the free memory: a long video's mask can outgrow it, and then the masks stay on disk)."""
    import tifffile

    written = [r for r in rows if r.status == "ok"]
    try:
        _check_memory(2 * sum(r.frames * r.height * r.width for r in written), out,
                      "opening this run's masks", "open them from the output folder a few at a time")
    except InputError as exc:
        return [], exc.reason
    return [((out / r.mask_file).stem, tifffile.imread(out / r.mask_file)) for r in written], ""
