"""Annotate a site: browse its images, draw masks and boxes, set tags; everything saved to the SiteStore.

The widget only moves data between layers and the store. Saving happens on image switch, on a
timer while edits are pending, and on demand; each save is the store's crash-safe transaction.
Imports run in a worker, one image per step, so a large folder shows progress and can be cancelled.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.errors import InputError, error_line
from napari_fedmix.latest_model import latest_model
from napari_fedmix.layer_records import (
    boxes_to_shapes,
    image_layer_pixels,
    label_features,
    layer_spacing,
    save_annotations,
)
from napari_fedmix.panel_closing import PanelClosing
from napari_fedmix.pending_edits import pending_edits
from napari_fedmix.tag_box import LEGEND as TAG_LEGEND
from napari_fedmix.tag_box import TagBox
from napari_fedmix.workers import make_worker, until_stopped

if TYPE_CHECKING:
    import napari
    from napari.qt.threading import WorkerBase

IMAGE_LAYER, MASK_LAYER, BOX_LAYER = "FedMix image", "FedMix mask", "FedMix boxes"
CLASSES_KEY = "fedmix_classes"  # the mask layer's metadata: the site's class names, for other widgets
# what New site… asks: colour photos trained as grey would lose what a dermatologist reads a lesion by
GREY_SITE = "grey (1 channel: ultrasound, X-ray, CT, MRI, OCT; colour images are trained as grey)"
COLOUR_SITE = "colour (3 channels: dermoscopy, endoscopy, photographs)"
AUTOSAVE_MS = 15_000
WATCH_MS = 2_000  # how often the panel looks for another program's writes to the site


class AnnotateWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.store: SiteStore | None = None
        self.current_id: str | None = None
        self._dirty = False
        self._loading = False
        self.unsaved: str | None = None  # why the shown image's edits could not be written (disk full …)
        # the layers listened to (their edits mark the image unsaved), each with what was connected, undone on
        # closing; weak: a layer deleted from the viewer is not kept alive by the panel
        self._watched: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._shown: tuple = ()  # the mask and box layers of the image shown: its edits are saved from them
        self._stamp: tuple = ()  # its annotations in the store when shown or last saved (SiteStore.annotation_stamp)
        self._others_version: int | None = None  # SiteStore.writes_by_others when the panel last looked

        self.site_label = QLabel("no site open")
        self.site_label.setWordWrap(True)
        open_button, new_button = QPushButton("Open site…"), QPushButton("New site…")
        open_button.clicked.connect(self._choose_site)
        new_button.clicked.connect(self._choose_new_site)
        export_button = QPushButton("Export…")
        export_button.setToolTip("Write the site's masks, boxes and tags (and its images, if you want them) to a "
                                 "new or empty folder, as an import reads them: for an archive, a research "
                                 "partner or another tool")
        export_button.clicked.connect(self._choose_export)
        import_files, import_folder = QPushButton("Import images…"), QPushButton("Import folder…")
        import_files.clicked.connect(self._choose_images)
        import_folder.clicked.connect(self._choose_folder)
        import_table = QPushButton("Import annotations…")
        import_table.setToolTip("Boxes (image,class,y0,x0,y1,x1, or x_min,y_min,x_max,y_max, or x,y,width,height) "
                                "or tags (image,class,present, or a column per class) of the images the site "
                                "holds, from a CSV table; or masks and boxes from an annotation tool's COCO file "
                                "(.json)")
        import_table.clicked.connect(self._choose_table)
        add_shown = QPushButton("Add the image on screen")
        add_shown.setToolTip("Add the active image layer to the site; for a stack (a cine loop, a volume) the "
                             "frame the sliders show")
        add_shown.clicked.connect(lambda: self._guard(self.add_shown_image))
        # idle while importing; off for a site opened read-only (with Remove image…, below)
        self._site_buttons = [open_button, new_button, export_button, import_files, import_folder, import_table,
                              add_shown]
        self._adding_buttons = [import_files, import_folder, import_table, add_shown]
        self.import_bar = QProgressBar()
        self.cancel_import = QPushButton("Cancel import")
        self.cancel_import.clicked.connect(self.stop_import)
        self.import_worker = None
        self.import_stop_requested = threading.Event()  # Cancel: the running import's (or export's), set
        self.last_import = None  # the last finished import's ImportReport (None if it was cancelled)
        self.last_export = None  # the last finished export's ExportReport
        self.image_list = QListWidget()
        self.image_list.currentRowChanged.connect(self._on_row)
        prev_button, next_button = QPushButton("◀ previous"), QPushButton("next ▶")
        prev_button.clicked.connect(self.previous_image)
        next_button.clicked.connect(self.next_image)
        self.draw_class = QComboBox()
        self.draw_class.currentTextChanged.connect(self._set_draw_class)
        self.tag_boxes: dict[str, TagBox] = {}
        self.tags_row = QVBoxLayout()
        save_button = QPushButton("Save now")
        save_button.clicked.connect(lambda: self.save(force=True))  # the clinician's choice: the screen wins
        remove_button = QPushButton("Remove image…")
        remove_button.setToolTip("Take the image shown out of the site, with its mask, boxes and tags: a patient "
                                 "who withdrew consent, a scan imported by mistake, a file corrected since import")
        remove_button.clicked.connect(self._confirm_remove)
        self._site_buttons.append(remove_button)
        self._adding_buttons.append(remove_button)
        self._editing_controls = [self.draw_class, save_button]  # with the tag boxes: off for a read-only site
        self.summary = QLabel("")
        self.save_status = QLabel("")
        self.save_status.setWordWrap(True)
        self.save_status.setStyleSheet("color: #ff6b6b")

        layout = QVBoxLayout(self)
        layout.addWidget(self.site_label)
        layout.addLayout(_row(open_button, new_button, export_button))
        layout.addLayout(_row(import_files, import_folder))
        layout.addLayout(_row(import_table, add_shown))
        layout.addLayout(_row(self.import_bar, self.cancel_import))
        self._show_import(False)
        layout.addWidget(self.image_list)
        layout.addLayout(_row(prev_button, next_button))
        layout.addLayout(_row(QLabel("class to draw:"), self.draw_class))
        self.label_note = QLabel("")  # which mask label is which class, on a site with more than one
        layout.addWidget(self.label_note)
        self.tag_legend = QLabel(f"image-level tags ({TAG_LEGEND});\n"
                                 "Alt+P: the class to draw present, Alt+A: all absent, then the next image")
        layout.addWidget(self.tag_legend)
        layout.addLayout(self.tags_row)
        layout.addLayout(_row(save_button, remove_button))
        layout.addWidget(self.summary)
        layout.addWidget(self.save_status)

        # napari sends a docked panel no close event, for its ✕ or for napari closing: saved then too
        self._closing = PanelClosing(self, on_closed=self._shut_down, on_window_closing=self.save)
        self.timer = QTimer(self)
        self.timer.timeout.connect(self._autosave)
        self.timer.start(AUTOSAVE_MS)
        pending_edits().save_requested.connect(self._save_before_training)  # gone with the panel
        self.watch = QTimer(self)
        self.watch.timeout.connect(self.follow_other_programs)
        self.watch.start(WATCH_MS)
        self._keys = _ViewerKeys(self.viewer, {
            "Alt-Right": lambda _v: self.next_image(),
            "Alt-Left": lambda _v: self.previous_image(),
            "Alt-P": lambda _v: self.tag_and_next(present=True),
            "Alt-A": lambda _v: self.tag_and_next(present=False),
        })
        from napari_fedmix.settings import plugin_defaults

        default_site = plugin_defaults()["default_site_folder"]
        if default_site and (Path(default_site) / "site.json").exists():
            self._guard(lambda: self.open_site(default_site))

    # ------------------------------------------------------------------ site
    def open_site(self, path: str | Path) -> None:
        self._switch_to(_open_for_annotating(Path(path)))

    def create_site(self, path: str | Path, classes: list[str], channels: int = 1) -> None:
        self._switch_to(SiteStore.create(path, classes, channels=channels))

    def _switch_to(self, store: SiteStore) -> None:
        """Leave the open site only once the new one has opened: a folder that is not a site (or an
        existing site given as new) must not leave the widget on a closed store, unable to save."""
        self.save()
        if self.unsaved:
            store.close()
            raise InputError("site", f"{self.unsaved}; the site stays open until they are saved")
        if self.store is not None:
            self.store.close()
        self.store = store
        latest_model().announce_site(store.root)  # Predict starts with this site's newest model
        self._after_site_change()

    def _after_site_change(self) -> None:
        assert self.store is not None
        from fedmix_engine.data.network_share import ADVICE, is_network_path

        shared = f"; {ADVICE}" if is_network_path(self.store.root) else ""
        viewing = (" — read-only: this folder cannot be written here, so its annotations are shown and "
                   "nothing can be changed" if self.store.readonly else "")
        self.site_label.setText(f"site: {self.store.config.name} ({self.store.root}){viewing}{shared}")
        for control in [*self._adding_buttons, *self._editing_controls]:
            control.setEnabled(not self.store.readonly)
        with self._own_changes():  # the new site's classes: no edit to the boxes on screen
            self.draw_class.clear()
            self.draw_class.addItems(list(self.store.config.classes))
        classes = self.store.config.classes
        self._describe_labels()
        for box in self.tag_boxes.values():
            box.setParent(None)
        self.tag_boxes = {}
        for name in classes:
            box = TagBox(name)
            box.stateChanged.connect(self._mark_dirty)
            box.setEnabled(not self.store.readonly)
            self.tag_boxes[name] = box
            self.tags_row.addWidget(box)
        self.current_id = None
        if not self.store.readonly:
            from fedmix_engine.data.removal import finish_interrupted

            if finished := finish_interrupted(self.store):
                from napari.utils.notifications import show_info

                show_info("\n".join(finished.lines()))
        self._others_version = self.store.writes_by_others()  # per connection: counted from this site's opening
        with self._own_changes():
            self.image_list.clear()  # no row carried over from the other site: row 0 below shows this site's first
        self.refresh_list()
        if self.image_list.count():
            self.image_list.setCurrentRow(0)

    def import_images(self, paths: list[str | Path]) -> WorkerBase:
        """Add image files in a worker; returns the worker (problems, each naming its file, are shown)."""
        from fedmix_engine.data.importer import import_files_steps

        return self._start_import(import_files_steps(self._open_store(), paths))

    def add_shown_image(self) -> str:
        """Add the image the active layer shows to the site and show it for labelling: for a stack (a
        cine loop, a volume) the frame the sliders are on, so a loop opened in napari is labelled one
        frame at a time. Its id is the layer's name (and frame); its origin names the layer's file."""
        from fedmix_engine.data.site_store import image_id_from_path

        store = self._open_store()
        layer = self.viewer.layers.selection.active
        if layer is None or layer.__class__.__name__ != "Image":
            raise InputError("layer", "select the image layer to add (a loop shows the frame to add)")
        if layer.name == IMAGE_LAYER:
            raise InputError("layer", f"'{IMAGE_LAYER}' is already this site's image")
        from napari_fedmix.predict_widget import PROB_LAYER

        if layer.name == PROB_LAYER:
            raise InputError("layer", f"'{PROB_LAYER}' is a prediction overlay, not an image; select the image")
        leading = layer.ndim - 2  # axes before the 2-D frame (napari does not count an RGB layer's channels)
        position = layer.world_to_data(self.viewer.dims.point)[:leading]
        index = tuple(int(np.clip(round(p), 0, n - 1)) for p, n in zip(position, layer.data.shape, strict=False))
        frame = image_layer_pixels(layer, index)
        suffix = "-frame" + "-".join(str(i) for i in index) if leading else ""
        image_id = image_id_from_path(layer.name) + suffix
        path = getattr(layer.source, "path", None)
        origin = (f"napari layer '{layer.name}'" + (f" ({path})" if path else "")
                  + (f", frame {index[0] if leading == 1 else index}" if leading else ""))
        store.add_image(frame, image_id=image_id, origin=origin, spacing=layer_spacing(layer))
        self.refresh_list()
        self.image_list.setCurrentRow(store.image_ids().index(image_id))
        if twins := store.same_pixels(image_id):  # a still stretch of a loop, a layer added twice
            from napari.utils.notifications import show_info

            show_info(f"'{image_id}' has the same pixels as '{twins[0]}' of the site: both train, and annotations "
                      "that disagree contradict each other (Remove image… takes one out)")
        return image_id

    # ------------------------------------------------------------------ browsing
    def refresh_list(self) -> None:
        if self.store is None:
            return
        row = self.image_list.currentRow()
        with self._own_changes():  # the shown image stays as it is: no re-read, and the view keeps its zoom
            self.image_list.clear()
            for rec in self.store.records():  # in import order: another program's imports come after
                self.image_list.addItem(f"{rec.id}  —  {rec.supervision}")
            if 0 <= row < self.image_list.count():
                self.image_list.setCurrentRow(row)
        c = self.store.summary()
        self.summary.setText(f"{c['images']} images: {c['mask']} mask · {c['box']} box · {c['tag']} tag · "
                             f"{c['none']} unlabelled")

    def show_image(self, image_id: str) -> None:
        assert self.store is not None
        self.save()
        if self.unsaved:  # showing another image would replace the edits that could not be written
            self._select_shown()
            _notify([f"{self.unsaved}; staying on this image until they are saved"])
            return
        with self._own_changes():
            image = self.store.read_image(image_id)
            mask = self.store.read_mask(image_id)
            height, width = image.shape[:2]
            # rgb said, not guessed: napari takes an H×W×3 image of a side ≤ 30 px for three grey planes
            image_layer = self._layer(IMAGE_LAYER, lambda: self.viewer.add_image(image, name=IMAGE_LAYER,
                                                                                 rgb=image.ndim == 3),
                                      image, rgb=image.ndim == 3)
            labels = mask if mask is not None else np.zeros((height, width), np.uint8)
            mask_layer = self._layer(MASK_LAYER, lambda: self.viewer.add_labels(labels, name=MASK_LAYER, opacity=0.5),
                                     labels)
            mask_layer.metadata[CLASSES_KEY] = list(self.store.config.classes)  # label k = class k (1-based)
            mask_layer.features = label_features(self.store.config.classes)
            self._describe_labels()
            self._paint_class_to_draw(mask_layer)
            rectangles, classes = boxes_to_shapes(self.store.boxes(image_id))
            shapes = self._shapes_layer()
            shapes.data = []
            if rectangles:
                shapes.add_rectangles(rectangles)
            # also when there are none: napari keeps the rows of the boxes its data no longer holds, and a box
            # drawn next took the class of the previous image's first box
            shapes.features = {"class": np.array(classes, dtype=object)}
            if self.draw_class.currentText():  # not the last box's class, napari's default: the one chosen
                shapes.feature_defaults["class"] = self.draw_class.currentText()
            mask_layer.editable = shapes.editable = not self.store.readonly  # after the data: a reset may set it
            # the image's pixel spacing as the layers' scale: napari measures in mm, Predict gives the lesion's
            # area; the data (mask pixels, box corners) stays in pixels, as the site keeps it
            units, scale = _calibration(self.store.spacing(image_id))
            for layer in (image_layer, mask_layer, shapes):
                layer.units, layer.scale = units, scale
            tags = self.store.tags(image_id)
            for name, box in self.tag_boxes.items():
                box.set_tag(tags.get(name))
            shown_before, self.current_id = self.current_id, image_id
            # held, not looked up by name when saving: a layer deleted or renamed by hand (or napari closing,
            # which empties the layer list first) keeps what was drawn in it, to be saved
            self._shown = (mask_layer, shapes)
            self._stamp = self.store.annotation_stamp(image_id)  # to tell another program's writes from ours
            if image_id != shown_before:  # the same image shown anew (after an import) keeps the clinician's zoom
                self.viewer.reset_view()
                self.save_status.setText("")  # nothing held (unsaved edits keep the image): a note of the last one
            self.viewer.layers.selection.active = self.viewer.layers[MASK_LAYER]
        self._dirty = False

    def next_image(self) -> None:
        self.image_list.setCurrentRow(min(self.image_list.currentRow() + 1, self.image_list.count() - 1))

    def previous_image(self) -> None:
        self.image_list.setCurrentRow(max(self.image_list.currentRow() - 1, 0))

    def tag_and_next(self, present: bool) -> None:
        """One key per image for a site that tags (tags are the cheap label FedMix is for): Alt+P marks
        the class to draw present (a one-class site's only class), Alt+A every class
        absent; the image is saved and the next one shown. Other classes' tags are left as they are."""
        if self.store is None or self.current_id is None:
            return
        if self.store.readonly:
            _notify([f"{self.store.root}: opened read-only, so nothing is tagged; Alt+→ shows the next image"])
            return
        for name in [self.draw_class.currentText()] if present else list(self.tag_boxes):
            self.tag_boxes[name].set_tag(present)
        if not self.save() and self.unsaved is None:  # a problem keeps the image on screen to be seen
            self.next_image()

    # ------------------------------------------------------------------ saving
    def save(self, force: bool = False) -> list[str]:
        """Write the current image's mask, boxes and tags to the store; returns problems. Annotations another
        program wrote to the image since it was shown are not saved over unless ``force`` (Save now)."""
        if self.store is None or self.current_id is None or not self._dirty or self.store.readonly:
            return []  # read-only: the controls that edit are off; a layer made editable by hand saves nothing
        if self.current_id not in self.store.image_ids():
            return self._lost_shown()
        if not force and self.store.annotation_stamp(self.current_id) != self._stamp:
            return self._hold_edits(f"'{self.current_id}' was changed by another program since it was shown (an "
                                    "import in a terminal, a second napari); your edits are kept on screen, not "
                                    "saved", "Save now replaces its annotations with yours.")
        mask_layer, shapes = self._shown
        tags = {name: box.tag() for name, box in self.tag_boxes.items()}
        try:
            problems = save_annotations(self.store, self.current_id, np.asarray(mask_layer.data),
                                        list(shapes.data), list(shapes.features["class"]) if len(shapes.data) else [],
                                        tags)
        except (OSError, sqlite3.Error) as exc:  # disk full, share gone, read-only: keep the edits on screen
            return self._hold_edits(f"edits to '{self.current_id}' not saved "
                                    f"({error_line(exc).removeprefix('error: ')})",
                                    "They stay on screen; free space or fix the folder, then press Save now.")
        self.unsaved = None
        self.save_status.setText("")
        self._stamp = self.store.annotation_stamp(self.current_id)
        self._dirty = bool(problems)
        self.refresh_list()
        _notify(problems)
        return problems

    def _hold_edits(self, unsaved: str, advice: str) -> list[str]:
        """Keep the edits on screen, and the image with them, saying why in red (and once as a warning, not at
        every autosave); returns the problem."""
        first = self.unsaved is None
        self.unsaved = unsaved
        self.save_status.setText(f"{unsaved}. {advice}")
        if first:
            _notify([unsaved])
        return [unsaved]

    def follow_other_programs(self) -> None:
        """Show what another program (a terminal's ``site import``, a second napari) wrote to the site: the
        list at once, and the image on screen unless it has edits of its own (their save finds the other
        program's writes and holds them: ``save``). A clinician reading the image would otherwise see, and
        judge by, annotations the site no longer holds."""
        if self.store is None or self.import_worker is not None:  # an import of this panel's: shown when it ends
            return
        shown = self.current_id
        try:
            version = self.store.writes_by_others()
            if version == self._others_version:
                return
            self._others_version = version
            self.refresh_list()
            if shown is not None and shown not in self.store.image_ids():
                self._lost_shown()
                return
            if shown is None or self._dirty or self.unsaved:
                return
            changed = self.store.annotation_stamp(shown) != self._stamp
        except (sqlite3.Error, OSError):  # the folder went away (a share): the next save says so
            return
        if changed:
            self._guard(lambda: self.show_image(shown))  # a damaged file is said, as when it is chosen
            self.save_status.setText(f"'{shown}': its annotations were changed by another program; shown as the "
                                     "site holds them now")

    def _lost_shown(self) -> list[str]:
        """The image on screen was removed from the site by another program (``site remove``, a second napari):
        its edits, if any, can be saved nowhere, and are said to be lost; the image in its place is shown."""
        assert self.store is not None and self.current_id is not None
        gone = self.current_id
        note = (f"'{gone}' was removed from the site by another program"
                + ("; your edits to it are not saved" if self._dirty or self.unsaved else ""))
        self._show_instead(gone)
        self.save_status.setText(note)
        _notify([note])
        return [note]

    def _show_instead(self, gone: str) -> None:
        """Let go of the image ``gone`` (no longer in the site) and show the one now in its row of the list, or
        the last; with no image left the layers are emptied."""
        assert self.store is not None
        row = max(self.image_list.currentRow(), 0)
        self.current_id, self._dirty, self.unsaved, self._shown = None, False, None, ()
        self.refresh_list()
        ids = self.store.image_ids()
        if not ids:
            for name in (IMAGE_LAYER, MASK_LAYER, BOX_LAYER):
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
            return
        self._guard(lambda: self.show_image(ids[min(row, len(ids) - 1)]))
        if self.current_id is not None:
            self._select_shown()

    def _confirm_remove(self) -> None:
        if self.store is None or self.current_id is None:
            return
        record = self.store.record(self.current_id)
        kept = ", ".join(part for part in ("a mask" if record.has_mask else "", f"{record.boxes} box(es)"
                                           if record.boxes else "", f"{len(record.tags)} tag(s)" if record.tags
                                           else "") if part) or "no annotations"
        answer = QMessageBox.question(
            self, "Remove image", f"Remove '{record.id}' from the site {self.store.root}, with its annotations "
            f"({kept})?\n\nThis cannot be undone. Models trained before keep what they learnt from it.")
        if answer == QMessageBox.StandardButton.Yes:
            self._guard(lambda: self.remove_image(record.id))

    def remove_image(self, image_id: str) -> None:
        """Take an image out of the site with its annotations (``fedmix-engine site remove``); when it is the
        one on screen, the next is shown."""
        from fedmix_engine.data.removal import remove_images

        assert self.store is not None
        removal = remove_images(self.store, [image_id])
        if image_id == self.current_id:
            self._show_instead(image_id)
        else:
            self.refresh_list()
            if self.current_id is not None:
                self._select_shown()
        self.save_status.setText("")
        from napari.utils.notifications import show_info

        show_info("\n".join(removal.lines()))

    def _autosave(self) -> None:
        if self._dirty:
            self.save()

    def _save_before_training(self, site: str) -> None:
        """Train is about to read ``site``: the edits on screen go in (an edit held for a conflict stays held)."""
        if self.store is not None and str(self.store.root.resolve()) == site:
            self._autosave()

    def _mark_dirty(self, *_args) -> None:
        if not self._loading:
            self._dirty = True

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _own_changes(self) -> Iterator[None]:
        """The widget's own list and layer changes: they neither switch the image nor count as edits."""
        self._loading = True
        try:
            yield
        finally:
            self._loading = False

    def _layer(self, name: str, create, data: np.ndarray, rgb: bool | None = None):
        if name in self.viewer.layers and (rgb is None or self.viewer.layers[name].rgb == rgb):
            layer = self.viewer.layers[name]
            layer.data = data
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            layer = create()
        if name == MASK_LAYER:
            self._watch(layer, ("events.paint", self._mark_dirty), ("events.data", self._mark_dirty),
                        ("events.selected_label", self._follow_label),
                        ("events.colormap", self._describe_labels))  # colours shuffled in napari's controls
        return layer

    def _shapes_layer(self):
        if BOX_LAYER not in self.viewer.layers:
            layer = self.viewer.add_shapes(name=BOX_LAYER, shape_type="rectangle", edge_color="yellow",
                                           face_color="transparent", edge_width=2,
                                           features={"class": np.array([], dtype=object)},
                                           text={"string": "{class}", "anchor": "upper_left", "color": "yellow",
                                                 "size": 9})
            layer.feature_defaults["class"] = self.draw_class.currentText()
        layer = self.viewer.layers[BOX_LAYER]
        # each box's class over it where there is a choice (a one-class site's boxes are all its class)
        layer.text.visible = self.store is not None and len(self.store.config.classes) > 1
        self._watch(layer, ("events.data", self._mark_dirty), ("events.features", self._mark_dirty),
                    ("selected_data.events.items_changed", self._follow_selection))
        return layer

    def _watch(self, layer, *connections: tuple[str, Callable]) -> None:
        """Hear of a layer's edits: also of one an earlier panel made (closed, then opened again from the
        Plugins menu), whose drawing this panel must save as its own. ``connections``: (the emitter's
        attribute path on the layer, the slot), connected once per layer and undone on closing."""
        if layer not in self._watched:
            for path, slot in connections:
                attrgetter(path)(layer).connect(slot)
            self._watched[layer] = connections

    def _set_draw_class(self, name: str) -> None:
        """The class to draw: the mask label painted, the class of new boxes and, by napari's rule for a
        layer's current properties, of the boxes selected (in select mode): how a box drawn with the wrong
        class is corrected."""
        if name and MASK_LAYER in self.viewer.layers:
            self._paint_class_to_draw(self.viewer.layers[MASK_LAYER])
        if not name or BOX_LAYER not in self.viewer.layers:
            return
        layer = self.viewer.layers[BOX_LAYER]
        if self._loading:
            layer.feature_defaults["class"] = name
        else:
            layer.current_properties = {"class": np.array([name], dtype=object)}
            layer.refresh_text()  # napari refreshes the colours it derives from features, not the text

    def _on_row(self, row: int) -> None:
        if self._loading or self.store is None or row < 0:
            return
        try:
            self.show_image(self.store.image_ids()[row])
        except InputError as exc:  # a stored file damaged on disk: said, and the list back on the image shown
            _notify([str(exc)])
            if self.current_id is not None:
                self._select_shown()

    def _paint_class_to_draw(self, mask_layer) -> None:
        if self.draw_class.currentIndex() >= 0:
            mask_layer.selected_label = self.draw_class.currentIndex() + 1  # label k = class k

    def _follow_label(self, *_args) -> None:
        """A mask label chosen in napari's own controls is the class to draw here too (new boxes, Alt+P);
        the selected boxes keep theirs: that label was chosen for painting."""
        label = self.viewer.layers[MASK_LAYER].selected_label if MASK_LAYER in self.viewer.layers else 0
        if not self._loading and 1 <= label <= self.draw_class.count() and label - 1 != self.draw_class.currentIndex():
            with self._own_changes():
                self.draw_class.setCurrentIndex(label - 1)

    def _describe_labels(self, *_args) -> None:
        """Which mask label is which class, on a site with more than one, each with the colour napari paints
        it (once the mask layer is there)."""
        classes = self.store.config.classes if self.store is not None else []
        layer = next((lyr for lyr in self.viewer.layers if lyr.name == MASK_LAYER), None)

        def swatch(label: int) -> str:
            if layer is None:
                return ""
            red, green, blue = (round(255 * float(c)) for c in np.asarray(layer.colormap.map(label)).ravel()[:3])
            return f'<span style="color: #{red:02x}{green:02x}{blue:02x}">■</span> '

        self.label_note.setText("mask labels: " + " · ".join(f"{swatch(k)}{k} {name}"
                                                             for k, name in enumerate(classes, 1)))
        self.label_note.setVisible(len(classes) > 1)

    def _follow_selection(self, *_args) -> None:
        """Boxes selected that are all of one class show it as the class to draw, as napari's controls show
        a selection's colours; choosing another class then gives it to them."""
        if self._loading or BOX_LAYER not in self.viewer.layers:  # a LayerList has no get()
            return
        layer = self.viewer.layers[BOX_LAYER]
        classes = {layer.features["class"].iloc[i] for i in layer.selected_data}
        if len(classes) == 1 and self.draw_class.findText(name := classes.pop()) >= 0:
            with self._own_changes():
                self.draw_class.setCurrentText(name)

    def _select_shown(self) -> None:
        """Put the list's selection back on the image the layers show (and the edits go to)."""
        assert self.store is not None
        with self._own_changes():
            self.image_list.setCurrentRow(self.store.image_ids().index(self.current_id))

    def _choose_site(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a FedMix site folder")
        if path:
            self._guard(lambda: self.open_site(path))

    def _choose_new_site(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose an empty folder for the new site")
        if not path:
            return
        text, ok = QInputDialog.getText(self, "Classes", "Class names, comma-separated:", text="lesion")
        if not ok:
            return
        kinds = [GREY_SITE, COLOUR_SITE]
        kind, ok = QInputDialog.getItem(self, "Images", "The site's images (fixed once made):", kinds, 0, False)
        if ok:
            channels = 3 if kind == COLOUR_SITE else 1
            self._guard(lambda: self.create_site(path, [c.strip() for c in text.split(",") if c.strip()], channels))

    def _choose_images(self) -> None:
        from fedmix_engine.data.imageio import IMAGE_SUFFIXES

        patterns = " ".join(f"*{suffix}" for suffix in IMAGE_SUFFIXES)
        # "All files": DICOM exports are often named without a suffix
        paths, _ = QFileDialog.getOpenFileNames(self, "Images to import", filter=f"Images ({patterns});;All files (*)")
        if paths:
            self._guard(lambda: self.import_images(paths))

    def import_folder(self, folder: str | Path, masks: str | Path | None = None) -> WorkerBase:
        """Add a folder's images and their masks, in a worker; returns the worker. The masks are in
        ``masks`` (ISIC, Kvasir-SEG: a folder of their own), or else beside the images (``x_mask.png``
        next to ``x.png``, as in BUSI), and are taken as masks rather than as images."""
        from fedmix_engine.data.importer import import_folder_steps

        return self._start_import(import_folder_steps(self._open_store(), folder, masks=masks or folder))

    def import_table(self, path: str | Path) -> WorkerBase:
        """Add a table's boxes or tags (told apart by its header), or a COCO file's masks and boxes, to the
        images the site holds, in a worker; returns the worker. A clinic's tags come as a spreadsheet, a row
        per image and a column per class."""
        from fedmix_engine.data.importer import import_sources_steps, read_annotation_table

        return self._start_import(import_sources_steps(self._open_store(), read_annotation_table(path)))

    def _open_store(self) -> SiteStore:
        if self.store is None:
            raise InputError("site", "open or create a site first")
        if self.import_worker is not None:
            raise InputError("import", "an import is running; wait for it or cancel it")
        return self.store

    def export_site(self, folder: str | Path, images: bool = False, pseudonymise: bool = False) -> WorkerBase:
        """Write the site's annotations (and with ``images`` its images) to ``folder``, new or empty, as
        ``fedmix-engine site export`` does (``pseudonymise``: its ``--pseudonymise``), in a worker (Cancel stops
        it, leaving no folder); returns the worker. The edits on screen are saved first: the export is what the
        site holds."""
        from fedmix_engine.data.export import export_steps

        store = self._open_store()
        self.save()
        self.last_export = None
        return self._start_import(export_steps(store, folder, images, pseudonymise), done=self._on_exported,
                                  what="export")

    def _on_exported(self, report) -> None:
        from napari.utils.notifications import show_info

        self.last_export = report
        if report.problems:  # images left out: a warning, as an import's problems are
            _notify(report.lines())
        else:
            show_info("\n".join(report.lines()))

    def _choose_export(self) -> None:
        if self.store is None:
            return
        folder = QFileDialog.getExistingDirectory(self, "A new (empty) folder for the site's annotations")
        if not folder:
            return
        answer = QMessageBox.question(
            self, "Export", "Also export the site's images (images/<id>.tif)?\n\nWithout them the folder holds "
            "the masks, boxes and tags only.", QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
            | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.No)
        if answer == QMessageBox.StandardButton.Cancel:
            return
        leaves = QMessageBox.question(
            self, "Export: pseudonymise?", "Will this folder leave the clinic (a research partner)?\n\nYes: the "
            "images are named case-001 … in a random order and no source file is named; the key to the site's "
            "images stays in the site's logs/ folder.\nNo: they keep their ids and source files, which may name "
            "the patients.", QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
            | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.No)
        if leaves != QMessageBox.StandardButton.Cancel:
            self._guard(lambda: self.export_site(folder, images=answer == QMessageBox.StandardButton.Yes,
                                                 pseudonymise=leaves == QMessageBox.StandardButton.Yes))

    def _start_import(self, steps, done=None, what: str = "import"):
        """Run an import's (or an export's) steps in a worker, with the progress bar and Cancel."""
        self.last_import = None
        self.cancel_import.setText(f"Cancel {what}")
        self.import_stop_requested = threading.Event()
        # a cancelled run's steps are closed in the worker (an export removes its unfinished folder there)
        worker = make_worker(until_stopped, steps, self.import_stop_requested,
                             on_error=lambda exc: _notify([error_line(exc)]))
        worker.yielded.connect(self._on_import_step)
        shown = done or self._on_imported
        worker.returned.connect(lambda report: None if report is None else shown(report))  # None: cancelled
        worker.finished.connect(self._on_import_finished)
        self.import_worker = worker
        self.import_bar.setRange(0, 0)  # busy until the first step says how many
        self._show_import(True)
        worker.start()
        return worker

    def stop_import(self) -> None:
        """Stop after the current image: every image stored so far is whole; importing again adds the rest."""
        if self.import_worker is not None:
            self.import_stop_requested.set()

    def _on_import_step(self, step) -> None:
        self.import_bar.setRange(0, step.total)
        self.import_bar.setValue(step.done)
        self.import_bar.setFormat(f"{step.stage} %v/%m")

    def _on_imported(self, report) -> None:
        self.last_import = report
        counts = [] if report.read_images else report.lines()[:1]  # a table: what it gave, said either way
        # corrections made here that the files would have undone; photos other tools show turned; copies of
        # images held; colour lost
        notes = [*report.kept_lines(shown=10), *report.turned_lines(shown=10), *report.copy_lines(shown=10),
                 *report.colour_lines()]
        if (counts or notes) and not report.problems:
            from napari.utils.notifications import show_info

            show_info("\n".join([*counts, *notes]))
        _notify([*counts, *notes, *report.problem_lines(shown=10)] if report.problems else [])

    def _on_import_finished(self) -> None:
        self.import_worker = None
        self._show_import(False)
        self.refresh_list()
        if self.current_id is None and self.image_list.count():
            self.image_list.setCurrentRow(0)
        elif self.current_id is not None and not self._dirty:
            # the import may have annotated the shown image: a screen left as it was would save its old,
            # empty mask over the imported one at the next edit (edits of its own are kept, to be saved)
            self.show_image(self.current_id)

    def _show_import(self, running: bool) -> None:
        self.import_bar.setVisible(running)
        self.cancel_import.setVisible(running)
        writable = self.store is not None and not self.store.readonly  # a read-only site exports, nothing more
        for button in self._site_buttons:
            button.setEnabled(not running and (writable or button not in self._adding_buttons))

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of images to import")
        if path:
            masks = QFileDialog.getExistingDirectory(self, "Folder of their masks (Cancel: masks beside the "
                                                           "images, like x_mask.png, or none)", path)
            self._guard(lambda: self.import_folder(path, masks or None))

    def _choose_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Table of boxes or tags, or a COCO file",
                                              filter="Tables and COCO files (*.csv *.tsv *.txt *.json);;All files (*)")
        if path:
            self._guard(lambda: self.import_table(path))

    def _guard(self, action) -> None:
        """Run a button's action; bad input, and a folder that cannot be written or read (a full disk, a share
        gone, a file system turned read-only), are said in a warning rather than raised in Qt's slot."""
        try:
            action()
        except InputError as exc:
            _notify([str(exc)])
        except (OSError, sqlite3.Error) as exc:
            _notify([error_line(exc).removeprefix("error: ")])

    def _shut_down(self) -> None:
        """Save, and write nothing after: the site closes, the layers are let go, the timer stops."""
        self.stop_import()
        self.save(force=True)  # closing: the edits on screen would be lost, another program's can be written again
        if self.unsaved:  # e.g. a full disk: said (save did) and kept on screen; nothing more can be done here
            _notify([f"{self.unsaved}, and the panel is closed: they are not saved"])
        self.timer.stop()
        self.watch.stop()
        self._keys.give_back()
        for layer, connections in list(self._watched.items()):
            for path, slot in connections:  # exactly what _watch connected
                with contextlib.suppress(TypeError, ValueError, RuntimeError):
                    attrgetter(path)(layer).disconnect(slot)
        self._watched = weakref.WeakKeyDictionary()
        self._shown = ()
        if self.store is not None:
            self.store.close()
            self.store, self.current_id = None, None


class _ViewerKeys:
    """The panel's keys on the viewer, given back when it closes: napari keeps a viewer binding (and
    the panel it calls) until it is unbound, and a key the user had bound before is restored."""

    def __init__(self, viewer: napari.Viewer, bindings: dict[str, Callable[[napari.Viewer], None]]):
        self._viewer = viewer
        self._bound = bindings
        self._before = {key: viewer.bind_key(key, action, overwrite=True) for key, action in bindings.items()}

    def give_back(self) -> None:
        from napari.utils.key_bindings import coerce_keybinding

        for key, action in self._bound.items():
            if self._viewer.keymap.get(coerce_keybinding(key)) is action:  # not since taken by another panel
                self._viewer.bind_key(key, self._before[key], overwrite=True)
        self._bound = {}


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    return row


def _notify(problems: list[str]) -> None:
    """One warning with every line given (an import passes its first problems and where the rest are)."""
    if problems:
        from napari.utils.notifications import show_warning

        show_warning("\n".join(problems))


def _open_for_annotating(root: Path) -> SiteStore:
    """The site open for writing, or, in a folder this user cannot write (a read-only share, an archive
    copy), open to be looked at: refusing it said only that the folder must be writable."""
    from fedmix_engine.atomic import write_refused

    try:
        return SiteStore.open(root)
    except InputError:
        if not root.is_dir() or not write_refused(root):
            raise  # not a site, or damaged: the writer's error says which
    return SiteStore.open(root, readonly=True)


def _calibration(spacing: tuple[float, float] | None) -> tuple[tuple[str, str], tuple[float, float]]:
    """The layers' units and scale for an image of this pixel spacing (row, column mm; None: pixels)."""
    return (("mm", "mm"), spacing) if spacing is not None else (("pixel", "pixel"), (1.0, 1.0))
