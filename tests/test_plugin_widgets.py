"""The napari widgets with a real viewer under Xvfb (pytest-qt, make_napari_viewer)."""

from __future__ import annotations

import gc
import itertools
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from qtpy.QtCore import Qt, QTimer

from fedmix_engine.checkpoint import save_checkpoint
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.data.synthetic import make_sample
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.model import ModelConfig

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _no_latest_model(monkeypatch):
    """Each test starts a napari session of its own: no model trained or site opened yet."""
    import napari_fedmix.latest_model

    monkeypatch.setattr(napari_fedmix.latest_model, "_LATEST", None)


class EventLoopWatch:
    """A 10 ms timer's ticks on the event loop, and CPython's full garbage collections meanwhile.

    A full collection stops every thread for about 0.25 s in a napari process, whichever allocation
    triggers it; it is no widget's doing, so a pause is measured without it."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.full_collections: list[list[float]] = []
        self.timer = QTimer()
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def _on_collection(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self.full_collections.append([time.perf_counter(), math.inf])
            else:
                self.full_collections[-1][1] = time.perf_counter()

    def __enter__(self) -> EventLoopWatch:
        gc.callbacks.append(self._on_collection)
        self.timer.start(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.timer.stop()
        gc.callbacks.remove(self._on_collection)

    def longest_pause(self, until: float = math.inf) -> float:
        """The longest time between two ticks (up to ``until``), less any full collection within it."""
        ticks = [t for t in self.ticks if t <= until]
        assert len(ticks) > 10, "the event loop ran too short a time to measure"
        return max(after - before - sum(max(0.0, min(end, after) - max(start, before))
                                        for start, end in self.full_collections)
                   for before, after in itertools.pairwise(ticks))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"scan-{i}.tif"
        tifffile.imwrite(path, rng.integers(0, 255, (40, 48), dtype=np.uint8))
        paths.append(path)
    return paths


def _annotating(make_napari_viewer, qtbot, site: Path, images: list[Path]):
    """A viewer and an annotate widget on a new one-class site holding ``images``, the first one shown."""
    from napari_fedmix.annotate_widget import AnnotateWidget

    viewer = make_napari_viewer()
    widget = AnnotateWidget(viewer)
    qtbot.addWidget(widget)
    widget.create_site(site, ["lesion"])
    assert _imported(qtbot, widget, widget.import_images(images)) == []
    widget.image_list.setCurrentRow(0)
    return viewer, widget


def _imported(qtbot, widget, worker) -> list[str] | None:
    """Wait for the annotate widget's import worker to finish; the problems it reported (None: cancelled)."""
    assert worker is widget.import_worker
    qtbot.waitUntil(lambda: widget.import_worker is None, timeout=60_000)
    return None if widget.last_import is None else widget.last_import.problems


def _tiny_checkpoint(folder: Path) -> Path:
    """An untrained width-4 pair saved as ``folder/m.safetensors``, trained-size 32: enough to predict with."""
    return save_checkpoint(folder / "m.safetensors", init_pair(ModelConfig(base_width=4), 0), ModelConfig(base_width=4),
                           {"image_size": 32})


def _threads_loading_models(monkeypatch) -> list:
    """The thread of every model load from now on (``Predictor.from_checkpoint``): a widget must load its model
    in its worker, never on napari's GUI thread."""
    import threading

    from fedmix_engine.predict import Predictor

    threads: list[threading.Thread] = []
    load = Predictor.from_checkpoint.__func__
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(
        lambda cls, *args, **kwargs: threads.append(threading.current_thread()) or load(cls, *args, **kwargs)))
    return threads


def _predict_widget(viewer, qtbot, checkpoint: Path):
    """A Predict widget in ``viewer`` with ``checkpoint`` chosen."""
    from napari_fedmix.predict_widget import PredictWidget

    widget = PredictWidget(viewer)
    qtbot.addWidget(widget)
    widget.checkpoint.setText(str(checkpoint))
    return widget


def test_annotate_mask_boxes_and_tag_are_saved_and_shown_again(make_napari_viewer, qtbot, tmp_path, images):
    from napari_fedmix.annotate_widget import BOX_LAYER, MASK_LAYER, AnnotateWidget

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 1
    viewer.layers[MASK_LAYER].data = mask
    viewer.layers[BOX_LAYER].add_rectangles([np.array([[2, 3], [12, 25]]), np.array([[20, 10], [60, 30]])])
    widget.tag_boxes["lesion"].setCheckState(Qt.CheckState.Checked)
    widget.next_image()  # autosave on switch
    assert widget.current_id == "scan-1"

    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), mask)
        boxes = [(b.class_name, b.y0, b.x0, b.y1, b.x1) for b in store.boxes("scan-0")]
        assert boxes == [("lesion", 2, 3, 12, 25), ("lesion", 20, 10, 40, 30)]  # the second clipped to the image
        assert store.tags("scan-0") == {"lesion": True}
        assert store.record("scan-1").supervision == "none"
    assert "1 mask" in widget.summary.text()

    reopened = AnnotateWidget(viewer)
    qtbot.addWidget(reopened)
    reopened.open_site(tmp_path / "site")
    reopened.image_list.setCurrentRow(0)
    np.testing.assert_array_equal(viewer.layers[MASK_LAYER].data, mask)
    assert len(viewer.layers[BOX_LAYER].data) == 2
    assert reopened.tag_boxes["lesion"].checkState() == Qt.CheckState.Checked
    assert len([lyr for lyr in viewer.layers if lyr.name == MASK_LAYER]) == 1, "layers are reused, not duplicated"


def test_annotate_shows_a_calibrated_image_in_mm_and_keeps_its_annotations_in_pixels(make_napari_viewer, qtbot,
                                                                                    tmp_path):
    """A site image with a pixel spacing (a DICOM scan's) was shown in pixels: napari measured nothing in mm, and
    Predict on it gave no area. The layers now take the spacing as their scale; what is drawn stays in pixels."""
    from napari_fedmix.annotate_widget import BOX_LAYER, IMAGE_LAYER, MASK_LAYER, AnnotateWidget
    from napari_fedmix.layer_records import layer_spacing
    from napari_fedmix.predict_widget import PRED_LAYER

    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        store.add_image(np.full((40, 48), 160, np.uint8), "calibrated", spacing=(0.5, 0.25))
        store.add_image(np.full((40, 48), 160, np.uint8), "plain")
    viewer = make_napari_viewer()
    widget = AnnotateWidget(viewer)
    qtbot.addWidget(widget)
    widget.open_site(tmp_path / "site")
    widget.show_image("calibrated")
    for name in (IMAGE_LAYER, MASK_LAYER, BOX_LAYER):
        assert layer_spacing(viewer.layers[name]) == (0.5, 0.25), name
    mask = np.zeros((40, 48), np.uint8)
    mask[4:12, 8:20] = 1
    viewer.layers[MASK_LAYER].data = mask
    viewer.layers[BOX_LAYER].add_rectangles([np.array([[2, 3], [12, 25]])])  # data coordinates: pixels
    widget.show_image("plain")  # saves the calibrated image's edits
    for name in (IMAGE_LAYER, MASK_LAYER, BOX_LAYER):
        assert layer_spacing(viewer.layers[name]) is None and tuple(viewer.layers[name].scale) == (1.0, 1.0), name
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("calibrated"), mask)
        assert [(b.y0, b.x0, b.y1, b.x1) for b in store.boxes("calibrated")] == [(2, 3, 12, 25)]

    from model_helpers import all_lesion_checkpoint  # Predict on the shown image: the lesion's area in mm²

    widget.show_image("calibrated")
    predict = _predict_widget(viewer, qtbot, all_lesion_checkpoint(tmp_path / "all.safetensors"))
    viewer.layers.selection.active = viewer.layers[IMAGE_LAYER]
    assert predict.predict_active() is not None
    qtbot.waitUntil(lambda: PRED_LAYER in viewer.layers and "mm²" in predict.status.text(), timeout=60_000)
    assert f"of the image ({40 * 48 * 0.5 * 0.25:.1f} mm²)" in predict.status.text(), predict.status.text()


def _drawn_glyph(box) -> str:
    """What a check box's indicator shows, read from its pixels as napari's theme draws them: "empty", "–"
    (a bar a few rows high) or "✓" (ink over most rows)."""
    shot = box.grab().toImage()
    side = min(shot.height(), 20)  # the indicator: a square at the left; the class name is further right
    inner = np.array([[shot.pixel(x, y) & 0xFFFFFF for x in range(3, side - 2)] for y in range(3, side - 3)])
    colours, counts = np.unique(inner, return_counts=True)
    ink_rows = int(((inner != colours[counts.argmax()]).sum(axis=1) >= 3).sum())
    return "empty" if ink_rows == 0 else ("–" if ink_rows <= side // 4 else "✓")


def test_a_tag_box_shows_what_the_legend_says_and_a_click_steps_present_absent_unknown(make_napari_viewer, qtbot,
                                                                                       tmp_path, images):
    """The legend said "– absent, empty = unknown", but the boxes drew an untagged image's tag as – and an
    absent one as an empty box: a clinician read every untagged image (boxed lesions too) as tagged
    absent, and one who set – to say "absent" saved nothing. Each state is now drawn as the legend says,
    read back from the pixels napari's theme paints, and saved as the tag it shows."""
    from qtpy.QtCore import QPoint

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    viewer.window.add_dock_widget(widget, name="Annotate site")  # drawn in napari's theme, as a clinician sees it
    legend = dict((meaning, glyph) for glyph, meaning in
                  re.findall(r"(✓|–|empty)(?: =)? (present|absent|not tagged)", widget.tag_legend.text()))
    assert set(legend) == {"present", "absent", "not tagged"}, widget.tag_legend.text()
    box = widget.tag_boxes["lesion"]
    assert box.tag() is None and _drawn_glyph(box) == legend["not tagged"], "an untagged image looks untouched"
    for expected in (True, False, None):  # one click each: present first, then absent, then not tagged again
        qtbot.mouseClick(box, Qt.MouseButton.LeftButton, pos=QPoint(8, box.height() // 2))  # on the indicator
        shown = {True: "present", False: "absent", None: "not tagged"}[box.tag()]
        assert box.tag() is expected and _drawn_glyph(box) == legend[shown], (expected, _drawn_glyph(box))
        assert widget.save() == []
        with SiteStore.open(tmp_path / "site", readonly=True) as store:
            assert store.tags("scan-0").get("lesion") is expected
    widget.tag_and_next(present=False)  # Alt+A: all absent, drawn as the legend's absent
    widget.previous_image()
    assert box.tag() is False and _drawn_glyph(box) == legend["absent"] == "–"


def test_a_two_class_sites_boxes_show_their_class_and_a_selected_box_takes_the_class_chosen(make_napari_viewer, qtbot,
                                                                                          tmp_path, images):
    """On a site with two classes every box was drawn alike, its class nowhere on screen, and a box drawn
    with the wrong class could only be deleted and drawn again. Each box now shows its class, and choosing
    a class with boxes selected gives them that class (napari's rule for a layer's current properties).
    The class chosen is also the mask label painted, and a label chosen in napari's controls chooses it:
    nothing on screen said which label was which class, nor tied painting to the class chosen."""
    from napari_fedmix.annotate_widget import BOX_LAYER, MASK_LAYER, AnnotateWidget

    viewer = make_napari_viewer()
    widget = AnnotateWidget(viewer)
    qtbot.addWidget(widget)
    widget.create_site(tmp_path / "site", ["lesion", "cyst"])
    assert _imported(qtbot, widget, widget.import_images(images)) == []
    widget.image_list.setCurrentRow(0)
    boxes = viewer.layers[BOX_LAYER]
    boxes.add_rectangles([np.array([[2, 3], [12, 25]]), np.array([[20, 10], [30, 30]])])  # both "lesion"
    assert boxes.text.visible and list(boxes.text.values) == ["lesion", "lesion"]
    boxes.mode = "select"
    boxes.selected_data = {1}
    widget.draw_class.setCurrentText("cyst")  # the second box was a cyst
    assert list(boxes.text.values) == ["lesion", "cyst"]
    for selected, shown in (({0}, "lesion"), ({1}, "cyst"), ({0, 1}, "cyst")):  # the class of what is selected
        boxes.selected_data = selected  # (two classes: the choice stays), as napari's controls show its colours
        assert widget.draw_class.currentText() == shown and list(boxes.text.values) == ["lesion", "cyst"]
    boxes.selected_data = set()
    mask = viewer.layers[MASK_LAYER]
    colour_2 = "#{:02x}{:02x}{:02x}".format(*(round(255 * float(c)) for c in np.ravel(mask.colormap.map(2))[:3]))
    assert not widget.label_note.isHidden() and widget.label_note.text().startswith("mask labels: ")
    assert f'<span style="color: {colour_2}">■</span> 2 cyst' in widget.label_note.text(), widget.label_note.text()
    mask.new_colormap(seed=7)  # napari's shuffle: the swatches follow
    shuffled = "#{:02x}{:02x}{:02x}".format(*(round(255 * float(c)) for c in np.ravel(mask.colormap.map(2))[:3]))
    assert shuffled != colour_2 and f'<span style="color: {shuffled}">■</span> 2 cyst' in widget.label_note.text()
    assert mask.selected_label == 2, "cyst is painted as label 2 once chosen"
    widget.draw_class.setCurrentText("lesion")
    assert mask.selected_label == 1
    boxes.selected_data = {1}
    mask.selected_label = 2  # chosen in napari's own label control: the class to draw follows …
    assert widget.draw_class.currentText() == "cyst" and list(boxes.text.values) == ["lesion", "cyst"]
    mask.selected_label = 1  # … and a selected box keeps its class: the label was chosen for painting
    assert widget.draw_class.currentText() == "lesion" and list(boxes.text.values) == ["lesion", "cyst"]
    widget.draw_class.setCurrentText("cyst")
    boxes.selected_data = set()
    painted = np.zeros((40, 48), np.uint8)
    painted[30:35, 30:40] = 2
    mask.data = painted  # napari names the class of the label under the cursor
    hovered = mask.get_status((32, 35), view_direction=None, dims_displayed=[0, 1], world=True)["value"]
    assert "class: cyst" in hovered, hovered
    widget.next_image()  # saved on the way
    assert viewer.layers[MASK_LAYER].selected_label == 2
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert [(b.class_name, b.y0, b.x0) for b in store.boxes("scan-0")] == [("lesion", 2, 3), ("cyst", 20, 10)]
        np.testing.assert_array_equal(store.read_mask("scan-0"), painted)
    boxes.add_rectangles([np.array([[5, 5], [15, 15]])])  # a new box: the class chosen
    widget.draw_class.setCurrentText("lesion")  # nothing selected: only new boxes change class
    widget.previous_image()
    assert list(viewer.layers[BOX_LAYER].text.values) == ["lesion", "cyst"]
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert [b.class_name for b in store.boxes("scan-1")] == ["cyst"]
    # a one-class site's boxes need no label: all are its class
    widget.create_site(tmp_path / "one-class", ["lesion"])
    assert _imported(qtbot, widget, widget.import_images(images[:1])) == []
    widget.image_list.setCurrentRow(0)
    assert not viewer.layers[BOX_LAYER].text.visible and widget.label_note.isHidden()
    assert widget.draw_class.currentText() == "lesion" and viewer.layers[MASK_LAYER].selected_label == 1


def test_annotate_save_keeps_the_view_and_another_site_shows_its_first_image(make_napari_viewer, qtbot, tmp_path,
                                                                              images):
    from napari_fedmix.annotate_widget import IMAGE_LAYER, MASK_LAYER

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari ≥ 0.9 : before
    camera.zoom = 4.0  # zoomed in to draw
    shown = viewer.layers[IMAGE_LAYER].data
    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 1
    viewer.layers[MASK_LAYER].data = mask
    widget._autosave()
    assert "1 mask" in widget.summary.text(), "saved"
    assert camera.zoom == 4.0, "an autosave must not reset the view"
    assert viewer.layers[IMAGE_LAYER].data is shown, "nor re-read the shown image"

    other = tmp_path / "other"
    with SiteStore.create(other, ["lesion"]) as store:
        store.add_image(np.full((20, 30), 7, np.uint8), "first")
    widget.open_site(other)  # row 0 was selected in the old site too
    assert widget.current_id == "first" and viewer.layers[IMAGE_LAYER].data.shape == (20, 30)


def test_annotate_a_site_that_fails_to_open_leaves_the_open_one_editable(make_napari_viewer, qtbot, tmp_path,
                                                                          images):
    from napari_fedmix.annotate_widget import MASK_LAYER

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    (tmp_path / "not-a-site").mkdir()
    with pytest.raises(InputError, match="not-a-site"):
        widget.open_site(tmp_path / "not-a-site")
    with pytest.raises(InputError, match="a site already exists here"):
        widget.create_site(tmp_path / "site", ["lesion"])
    assert widget.current_id == "scan-0" and str(tmp_path / "site") in widget.site_label.text()
    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 1
    viewer.layers[MASK_LAYER].data = mask  # an edit after the failed attempts is still saved
    assert widget.save() == []
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), mask)


def test_annotate_opens_a_site_it_cannot_write_to_look_at_with_nothing_editable(make_napari_viewer, qtbot,
                                                                                  tmp_path, images):
    """A site on a read-only share or file system (an archive copy, a colleague's export) could not even be
    looked at: Open site said the folder must be writable. It opens read-only now: its images, masks,
    boxes and tags are shown; the layers, the tag boxes and the import and save controls are off, Alt+P
    tags nothing, and the site is said to be read-only. A writable site opened next is editable again."""
    from disk_helpers import fill_disk_leaving, remounted_read_only, small_disk
    from napari_fedmix.annotate_widget import BOX_LAYER, MASK_LAYER, AnnotateWidget

    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 1
    with small_disk(tmp_path / "disk", 16 * 2**20) as disk:
        with SiteStore.create(disk / "site", ["lesion"]) as store:
            for path in images:
                store.add_image(path)
            store.set_mask("scan-0", mask)
            store.add_box("scan-1", "lesion", 2, 3, 12, 25)
            store.set_tag("scan-2", "lesion", True)
        viewer = make_napari_viewer()
        widget = AnnotateWidget(viewer)
        qtbot.addWidget(widget)
        with remounted_read_only(disk):
            widget.open_site(disk / "site")
            assert widget.store.readonly and "read-only: this folder cannot be written here" in \
                widget.site_label.text()
            assert widget.image_list.count() == 3 and widget.current_id == "scan-0"
            np.testing.assert_array_equal(viewer.layers[MASK_LAYER].data, mask)
            assert not viewer.layers[MASK_LAYER].editable and not viewer.layers[BOX_LAYER].editable
            assert not widget.tag_boxes["lesion"].isEnabled() and not widget.draw_class.isEnabled()
            assert not any(button.isEnabled() for button in widget._adding_buttons)
            widget.next_image()
            assert widget.current_id == "scan-1" and len(viewer.layers[BOX_LAYER].data) == 1
            widget.next_image()
            assert widget.tag_boxes["lesion"].checkState() == Qt.CheckState.Checked
            widget.previous_image()
            widget.tag_and_next(present=False)  # Alt+A on a read-only site
            assert widget.current_id == "scan-1" and widget.unsaved is None
            # an archive copy is exported (to a writable folder); the controls that write stay off after it
            worker = widget.export_site(tmp_path / "export")
            assert widget.cancel_import.text() == "Cancel export"
            qtbot.waitUntil(lambda: worker is not widget.import_worker, timeout=60_000)
            assert widget.last_export is not None and widget.last_export.masks == 1
            assert not any(button.isEnabled() for button in widget._adding_buttons)
        with SiteStore.open(disk / "site", readonly=True) as store:
            assert store.tags("scan-1") == {} and len(store.boxes("scan-1")) == 1, "nothing was written"
        # opened writable, then its disk full: Remove image… says why it could not remove, and removes nothing
        import napari.utils.notifications
        from qtpy.QtWidgets import QMessageBox

        warned: list[str] = []
        widget.open_site(disk / "site")
        assert not widget.store.readonly
        fill_disk_leaving(disk / "filler", 0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(napari.utils.notifications, "show_warning", warned.append)
            patch.setattr(QMessageBox, "question", lambda *_a, **_k: QMessageBox.StandardButton.Yes)
            widget._confirm_remove()
        assert warned and "No space left on device" in warned[-1], warned
        assert widget.image_list.count() == 3 and widget.current_id == "scan-0"
        (disk / "filler").unlink()
        with SiteStore.open(disk / "site", readonly=True) as store:
            assert len(store) == 3
    widget.create_site(tmp_path / "writable", ["lesion"])  # the next site is editable again
    assert not widget.store.readonly and widget.draw_class.isEnabled()
    assert "read-only" not in widget.site_label.text()
    assert all(button.isEnabled() for button in widget._adding_buttons)


def test_annotate_says_when_the_site_lies_on_a_network_share(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Clinicians at several workstations may open one site on a file server: SQLite's locks there are only as
    good as the share's, so the widget says to annotate it from one workstation at a time."""
    from fedmix_engine.data import network_share
    from napari_fedmix.annotate_widget import AnnotateWidget

    share = (tmp_path / "share").resolve()
    share.mkdir()
    (tmp_path / "mounts").write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {share} nfs4 rw 0 0\n")
    monkeypatch.setattr(network_share, "MOUNT_TABLE", tmp_path / "mounts")
    widget = AnnotateWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    for site, shared in ((share / "site", True), (tmp_path / "local", False)):
        widget.create_site(site, ["lesion"])
        assert widget.site_label.text().startswith(f"site: {site.name} ({site})")
        assert ("on a network share: annotate it from one workstation at a time" in widget.site_label.text()) \
            is shared


def test_annotate_edits_that_cannot_be_written_stay_on_screen_until_saved(make_napari_viewer, qtbot, tmp_path,
                                                                          images, monkeypatch):
    import errno

    from napari_fedmix.annotate_widget import MASK_LAYER

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 1
    viewer.layers[MASK_LAYER].data = mask
    real_set_mask = SiteStore.set_mask

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SiteStore, "set_mask", disk_full)
    widget.next_image()  # the switch saves first; the save fails
    assert widget.current_id == "scan-0" and widget.image_list.currentRow() == 0, "stays on the unsaved image"
    np.testing.assert_array_equal(viewer.layers[MASK_LAYER].data, mask)
    assert "edits to 'scan-0' not saved (OSError: [Errno 28] No space left" in widget.save_status.text()
    (tmp_path / "other").mkdir()
    SiteStore.create(tmp_path / "other", ["lesion"]).close()
    with pytest.raises(InputError, match=r"not saved .* the site stays open"):
        widget.open_site(tmp_path / "other")
    assert str(tmp_path / "site") in widget.site_label.text()

    monkeypatch.setattr(SiteStore, "set_mask", real_set_mask)  # space freed
    widget._autosave()
    assert widget.save_status.text() == "" and widget.unsaved is None
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), mask)
    widget.next_image()
    assert widget.current_id == "scan-1"


def _docked_annotate(viewer, qtbot, site: Path | None = None, images: list[Path] = (), row: int = 0):
    """The Annotate panel as napari's Plugins menu opens it (docked, one per menu choice); given a new
    ``site``, it creates it with ``images`` and shows image ``row``."""
    dock, widget = viewer.window.add_plugin_dock_widget("napari-fedmix", "Annotate site")
    if site is not None:
        widget.create_site(site, ["lesion"])
        assert _imported(qtbot, widget, widget.import_images(images)) == []
        widget.image_list.setCurrentRow(row)
    return dock, widget


def _drawn(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A 40×48 mask with one rectangle of label 1, as drawn on the test images."""
    mask = np.zeros((40, 48), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_annotate_closed_and_opened_again_saves_what_was_drawn_in_either(make_napari_viewer, qtbot, tmp_path,
                                                                         images):
    """The panel's close button (✕) takes the panel out of its dock without a close event: what was drawn since
    the last autosave was not saved, and once the panel was opened again it was gone. The new panel took over
    the mask and box layers without hearing of their edits: masks and boxes drawn in it were never saved
    (only tags were), image after image."""
    from napari_fedmix.annotate_widget import BOX_LAYER, MASK_LAYER

    viewer = make_napari_viewer()
    dock, widget = _docked_annotate(viewer, qtbot, tmp_path / "site", images)
    viewer.layers[MASK_LAYER].data = first = _drawn(5, 15, 6, 20)  # drawn; the autosave is 15 s away
    dock.destroyOnClose()  # what the ✕ does
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.read_mask("scan-0") is not None, "drawn before the panel was closed, and not saved"
        np.testing.assert_array_equal(store.read_mask("scan-0"), first)

    _, again = _docked_annotate(viewer, qtbot)
    assert again is not widget
    again.open_site(tmp_path / "site")
    again.image_list.setCurrentRow(2)
    viewer.layers[MASK_LAYER].data = second = _drawn(20, 30, 30, 40)  # the first panel's layers, taken over
    viewer.layers[BOX_LAYER].add_rectangles([np.array([[2, 3], [12, 25]])])
    again.previous_image()  # saves on switching, as always
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.read_mask("scan-2") is not None, "drawn in the panel opened again, and not saved"
        np.testing.assert_array_equal(store.read_mask("scan-2"), second)
        assert [(b.y0, b.x0, b.y1, b.x1) for b in store.boxes("scan-2")] == [(2, 3, 12, 25)]
        np.testing.assert_array_equal(store.read_mask("scan-0"), first)  # the closed panel wrote nothing more
    assert not widget._dirty and not widget._watched, "the closed panel no longer hears the layers' edits"


def test_annotate_closed_gives_back_its_keys(make_napari_viewer, qtbot, tmp_path, images):
    """The panel bound Alt+→, Alt+←, Alt+P and Alt+A on the viewer and kept them once closed: napari
    still called the closed panel on those keys (Alt+P ticked tags on a panel nobody could see, or
    raised as Qt had deleted it), kept the panel alive, and a key the user had bound before was
    gone for good."""
    from napari.utils.key_bindings import coerce_keybinding

    viewer = make_napari_viewer()
    pressed = []
    viewer.bind_key("Alt-P", lambda _v: pressed.append("mine"))  # a user's own binding, from a script
    dock, widget = _docked_annotate(viewer, qtbot, tmp_path / "site", images)
    keys = [coerce_keybinding(k) for k in ("Alt-Right", "Alt-Left", "Alt-P", "Alt-A")]
    assert all(k in viewer.keymap for k in keys)  # the panel's while it is open
    viewer.keymap[keys[2]](viewer)
    assert pressed == [] and widget.current_id == "scan-1"  # the panel's Alt+P (tagged, next), not the user's
    dock.destroyOnClose()  # what the ✕ does
    assert [k for k in keys if k in viewer.keymap] == [keys[2]]
    viewer.keymap[keys[2]](viewer)
    assert pressed == ["mine"]  # given back as it was

    _, again = _docked_annotate(viewer, qtbot)  # opened again: the keys are its own
    again.open_site(tmp_path / "site")
    again.image_list.setCurrentRow(0)
    viewer.keymap[keys[0]](viewer)
    assert again.current_id == "scan-1" and pressed == ["mine"]


def test_annotate_edits_are_saved_when_napari_closes(make_napari_viewer, qtbot, tmp_path, images):
    """Closing napari sends no close event to its docked panels: the last edits (up to the 15 s autosave)
    were lost."""
    from napari_fedmix.annotate_widget import MASK_LAYER

    viewer = make_napari_viewer()
    _, widget = _docked_annotate(viewer, qtbot, tmp_path / "site", images, row=1)
    viewer.layers[MASK_LAYER].data = drawn = _drawn(5, 15, 6, 20)
    widget.tag_boxes["lesion"].setCheckState(Qt.CheckState.Checked)
    viewer.close()
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.read_mask("scan-1") is not None and store.tags("scan-1") == {"lesion": True}
        np.testing.assert_array_equal(store.read_mask("scan-1"), drawn)


def test_annotate_layers_deleted_by_hand_keep_their_edits_and_come_back(make_napari_viewer, qtbot, tmp_path, images):
    """Deleting the mask or box layer (napari's way to declutter) made every save raise KeyError: the
    autosave each 15 s, and the switch to another image, which then could not be left."""
    from napari_fedmix.annotate_widget import BOX_LAYER, MASK_LAYER

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    viewer.layers[MASK_LAYER].data = drawn = _drawn(5, 15, 6, 20)
    viewer.layers[BOX_LAYER].add_rectangles([np.array([[2, 3], [12, 25]])])
    viewer.layers.remove(MASK_LAYER)
    viewer.layers.remove(BOX_LAYER)
    widget.next_image()
    assert widget.current_id == "scan-1" and MASK_LAYER in viewer.layers and BOX_LAYER in viewer.layers
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), drawn)
        assert [(b.y0, b.x0, b.y1, b.x1) for b in store.boxes("scan-0")] == [(2, 3, 12, 25)]
    viewer.layers[MASK_LAYER].data = drawn  # the layers made again are watched like the first
    widget.previous_image()
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-1"), drawn)


def test_annotate_new_site_can_hold_colour_images(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """New site… made every site grey: a dermatology clinic working in napari alone could not keep the colour
    of its photos (only the command line's --channels 3 could). It now asks which images the site holds."""
    from qtpy.QtWidgets import QFileDialog, QInputDialog

    from napari_fedmix.annotate_widget import AnnotateWidget

    widget = AnnotateWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path / "derm"))
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("melanoma, naevus", True))
    asked = []

    def choose(parent, title, label, items, current=0, editable=True):
        asked.append(items)
        return next(item for item in items if item.startswith("colour")), True

    monkeypatch.setattr(QInputDialog, "getItem", choose)
    widget._choose_new_site()
    assert widget.store is not None and widget.store.config.channels == 3
    assert widget.store.config.classes == ("melanoma", "naevus") and asked[0][0].startswith("grey")


def test_annotate_import_says_which_photos_other_tools_show_turned(make_napari_viewer, qtbot, tmp_path,
                                                                   monkeypatch):
    """A phone photo with an EXIF orientation is shown as stored in napari and turned in every photo viewer:
    the command line's import said so, napari's said nothing."""
    import napari.utils.notifications
    from PIL import Image

    from napari_fedmix.annotate_widget import AnnotateWidget

    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    exif = Image.Exif()
    exif[0x0112] = 8
    photo = tmp_path / "lesion.jpg"
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(photo, exif=exif)
    widget = AnnotateWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.create_site(tmp_path / "site", ["lesion"])
    assert _imported(qtbot, widget, widget.import_images([photo])) == []
    assert said and said[-1].startswith("1 photo(s) with an EXIF orientation") and str(photo) in said[-1]
    shown = widget.viewer.layers["FedMix image"]  # 30 px high: napari would guess three grey planes
    assert shown.rgb and shown.ndim == 2 and shown.data.shape == (30, 40, 3)


def test_annotate_finishes_a_removal_a_kill_left_half_done_when_it_opens_the_site(make_napari_viewer, qtbot,
                                                                                   tmp_path, rng, monkeypatch):
    """A `site remove` killed after its commit leaves the removed patients' files on disk until the next
    removal; a clinician who only annotates in napari may never make one. Opening the site finishes it."""
    import napari.utils.notifications

    from fedmix_engine.data.site_store import SiteStore
    from kill_helpers import remove_killed
    from napari_fedmix.annotate_widget import AnnotateWidget

    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        for k in range(4):
            store.add_image(rng.integers(0, 256, (20, 24), dtype=np.uint8), f"scan-{k}")
        store.set_mask("scan-2", np.pad(np.ones((4, 4), np.uint8), ((2, 14), (2, 18))))
    remove_killed(tmp_path / "site", ["scan-1", "scan-2"], killed_at=1)
    left = sorted(p.name for p in (tmp_path / "site").glob("*/scan-*.tif"))
    assert left == ["scan-0.tif", "scan-1.tif", "scan-2.tif", "scan-2.tif", "scan-3.tif"], "killed at the first"
    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    widget = AnnotateWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.open_site(tmp_path / "site")
    assert said and said[-1].startswith("finished the removal of 2 image(s) that an interrupted run had taken out "
                                        "of the database but not off the disk (their files are deleted now):\n"
                                        "  scan-1\n  scan-2\n"), said
    assert widget.store.pending_removals() == [] and widget.store.problems() == []
    assert sorted(p.name for p in (tmp_path / "site").glob("*/scan-*.tif")) == ["scan-0.tif", "scan-3.tif"]
    assert [widget.image_list.item(i).text().split()[0] for i in range(widget.image_list.count())] == [
        "scan-0", "scan-3"]
    said.clear()
    widget.open_site(tmp_path / "site")
    assert said == [], "nothing left to finish: nothing said"


def test_annotate_import_says_which_images_copy_an_image_of_the_site(make_napari_viewer, qtbot, tmp_path, rng,
                                                                     monkeypatch):
    """Two files of one scan under two names: napari's import added both and said nothing."""
    import imageio.v3 as iio
    import napari.utils.notifications

    from napari_fedmix.annotate_widget import AnnotateWidget

    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    scan = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    iio.imwrite(tmp_path / "scan.png", scan)
    iio.imwrite(tmp_path / "scan copy.png", scan)
    widget = AnnotateWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.create_site(tmp_path / "site", ["lesion"])
    assert _imported(qtbot, widget, widget.import_images([tmp_path / "scan.png", tmp_path / "scan copy.png"])) == []
    assert said and said[-1].startswith("1 image(s) with the same pixels as an image of the site")
    assert f"  {tmp_path / 'scan copy.png'} = scan" in said[-1] and len(widget.store) == 2


def test_annotate_import_folder_takes_masks_beside_images_as_masks(make_napari_viewer, qtbot, tmp_path, images,
                                                                   monkeypatch):
    import os

    import napari.utils.notifications

    from napari_fedmix.annotate_widget import MASK_LAYER

    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 255
    tifffile.imwrite(images[0].parent / "scan-0_mask.tif", mask)  # beside scan-0.tif
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", [])
    assert _imported(qtbot, widget, widget.import_folder(images[0].parent)) == []
    assert widget.image_list.count() == 3, "the mask file is not listed as an image"
    assert widget.current_id == "scan-0", "the first image of an empty site is shown once imported"
    assert int(viewer.layers[MASK_LAYER].data.sum()) == 10 * 14
    # Import images… with the whole folder chosen (Ctrl+A): the mask file was imported as an image of its own
    chosen = sorted(images[0].parent.glob("scan-*.tif"))
    assert [p.name for p in chosen] == ["scan-0.tif", "scan-0_mask.tif", "scan-1.tif", "scan-2.tif"]
    assert _imported(qtbot, widget, widget.import_images(chosen)) == []
    assert widget.image_list.count() == 3, "the mask file is not imported as an image"
    assert (widget.last_import.masks, widget.last_import.unchanged) == (0, 1), "taken as scan-0's mask, held already"
    # the clinician corrects scan-0's mask here; the folder, imported again for new cases, does not undo it
    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    viewer.layers[MASK_LAYER].data = _drawn(20, 30, 20, 40)
    widget._dirty = True
    assert widget.save() == []
    os.utime(images[0].parent / "scan-0_mask.tif", (1e9, 1e9))  # written long before the correction
    assert _imported(qtbot, widget, widget.import_folder(images[0].parent)) == []
    np.testing.assert_array_equal(viewer.layers[MASK_LAYER].data, _drawn(20, 30, 20, 40))
    assert said and said[-1].startswith("kept 1 annotation(s) the site changed after their files were written")
    assert f"{images[0].parent / 'scan-0_mask.tif'}: the mask of 'scan-0', changed in the site by " in said[-1]


def test_annotate_import_folder_with_masks_in_a_folder_of_their_own(make_napari_viewer, qtbot, tmp_path, images):
    """ISIC and Kvasir-SEG keep their masks in a separate folder; the GUI could only import masks beside images."""
    masks = tmp_path / "GroundTruth"
    masks.mkdir()
    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 6:20] = 255
    tifffile.imwrite(masks / "scan-1_segmentation.tif", mask)
    _viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", [])
    assert _imported(qtbot, widget, widget.import_folder(images[0].parent, masks)) == []
    assert widget.last_import.masks == 1
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert int(store.read_mask("scan-1").sum()) == 10 * 14


def test_annotate_shows_what_an_import_wrote_to_the_shown_image_and_a_later_save_keeps_it(
        make_napari_viewer, qtbot, tmp_path, images):
    """Masks imported for the images a site holds, while one of them was on screen: the screen kept the old,
    empty mask, and the next edit there (a tag ticked) saved that empty mask over the imported one. The
    shown image is now shown again from the store once an import ends, unless it has edits of its own."""
    masks = tmp_path / "masks"
    masks.mkdir()
    tifffile.imwrite(masks / "scan-0_mask.tif", _drawn(5, 15, 6, 20) * 255)
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    assert widget.current_id == "scan-0" and not viewer.layers["FedMix mask"].data.any()
    assert _imported(qtbot, widget, widget.import_folder(images[0].parent, masks)) == []
    assert widget.last_import.masks == 1
    np.testing.assert_array_equal(viewer.layers["FedMix mask"].data, _drawn(5, 15, 6, 20))
    widget.tag_boxes["lesion"].setCheckState(Qt.CheckState.Checked)
    assert widget.save() == []
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), _drawn(5, 15, 6, 20))
        assert store.tags("scan-0") == {"lesion": True}


def test_annotate_imports_a_table_of_tags_or_boxes_for_the_images_the_site_holds(make_napari_viewer, qtbot, tmp_path,
                                                                                 images, monkeypatch):
    """A clinic's tags come as a spreadsheet (a row per image, a column per class), a radiologist's boxes as a
    table: only the command line could import them. Import annotations tells the two apart by the header, says
    what it gave, and the shown image shows its boxes at once."""
    import napari.utils.notifications

    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    monkeypatch.setattr(napari.utils.notifications, "show_warning", said.append)
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    (tmp_path / "tags.csv").write_text("Image;Lesion;notes\nscan-1.tif;yes;large\nscan-2;no;\n")
    (tmp_path / "boxes.csv").write_text("image,class,y0,x0,y1,x1\nscan-0,lesion,5,6,15,20\nmissing,lesion,1,1,4,4\n")
    assert _imported(qtbot, widget, widget.import_table(tmp_path / "tags.csv")) == [
        f"{tmp_path / 'tags.csv'}: column 'notes' is not a class of the site (lesion): left out"]
    assert said[-1].startswith("masks: 0  boxes: 0  tags: 2\n")
    assert _imported(qtbot, widget, widget.import_table(tmp_path / "boxes.csv")) == [
        f"{tmp_path / 'boxes.csv'}:3: image 'missing' is not in the site"]
    assert said[-1].startswith("masks: 0  boxes: 1  tags: 0\n")
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.tags("scan-1") == {"lesion": True} and store.tags("scan-2") == {"lesion": False}
        assert [(b.y0, b.x0, b.y1, b.x1) for b in store.boxes("scan-0")] == [(5, 6, 15, 20)]
    assert widget.current_id == "scan-0" and len(viewer.layers["FedMix boxes"].data) == 1, "shown at once"
    (tmp_path / "clean.csv").write_text("image,class,present\nscan-0,lesion,present\n")
    assert _imported(qtbot, widget, widget.import_table(tmp_path / "clean.csv")) == []
    assert said[-1] == "masks: 0  boxes: 0  tags: 1"
    with pytest.raises(InputError, match="no tag column"):
        (tmp_path / "bare.csv").write_text("image\nscan-0\n")
        widget.import_table(tmp_path / "bare.csv")

    # an annotation tool's COCO export: the region drawn there is the shown image's mask at once
    import json

    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "scan-0.tif", "height": 40, "width": 48}],
        "categories": [{"id": 1, "name": "lesion"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                         "segmentation": [[6, 5, 20, 5, 20, 15, 6, 15, 3, 10]]}],
    }))
    assert _imported(qtbot, widget, widget.import_table(tmp_path / "coco.json")) == []
    assert said[-1] == "masks: 1  boxes: 0  tags: 0"
    shown = viewer.layers["FedMix mask"].data
    assert widget.current_id == "scan-0" and shown[10, 10] == 1 and shown[30, 40] == 0 and shown.sum() > 100


def test_annotate_does_not_save_over_what_another_program_wrote_to_the_shown_image(make_napari_viewer, qtbot,
                                                                                 tmp_path, images):
    """A terminal's 'site import' (or a second napari) annotated the image on screen: the next edit here saved
    the screen's stale mask, boxes and tags over it. Now such a save is held, the edits stay on screen and
    the image with them, and Save now replaces the other program's annotations with the screen's."""
    _viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    assert widget.current_id == "scan-0"
    with SiteStore.open(tmp_path / "site") as other:  # another program, while napari shows scan-0
        other.set_mask("scan-0", _drawn(5, 15, 6, 20))
    widget.tag_boxes["lesion"].setCheckState(Qt.CheckState.Checked)  # an edit on the stale screen
    problems = widget.save()
    assert problems and "changed by another program since it was shown" in problems[0], problems
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), _drawn(5, 15, 6, 20))
        assert store.tags("scan-0") == {}
    widget.next_image()
    assert widget.current_id == "scan-0", "the edits are not left behind unsaved"
    widget.save(force=True)  # Save now: the screen's annotations, as the clinician chose
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.read_mask("scan-0") is None and store.tags("scan-0") == {"lesion": True}
    widget.tag_boxes["lesion"].set_tag(False)  # its own saves are no conflict
    assert widget.save() == []
    widget.next_image()
    assert widget.current_id == "scan-1"


def test_annotate_shows_what_another_program_wrote_to_the_site_unless_it_has_edits(make_napari_viewer, qtbot,
                                                                                   tmp_path, images):
    """A terminal's 'site import' annotated the site while napari showed it: the list and the image on screen
    kept showing what the site no longer held (an empty mask, 'none') until the clinician moved on, and a
    clinician reads the image by its annotations. The panel now follows another program's writes within a
    few seconds (its own timer); the image's own unsaved edits are never replaced (save holds them)."""
    from napari_fedmix.annotate_widget import WATCH_MS

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    assert widget.current_id == "scan-0" and widget.image_list.item(2).text() == "scan-2  —  none"
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari ≥ 0.9 : before
    camera.zoom *= 3  # the clinician looks closely
    zoom = camera.zoom
    with SiteStore.open(tmp_path / "site") as other:  # another program, while napari shows scan-0
        other.set_mask("scan-0", _drawn(5, 15, 6, 20))
        other.set_tag("scan-2", "lesion", True)
    qtbot.waitUntil(lambda: viewer.layers["FedMix mask"].data.any(), timeout=3 * WATCH_MS)
    np.testing.assert_array_equal(viewer.layers["FedMix mask"].data, _drawn(5, 15, 6, 20))
    assert widget.image_list.item(2).text() == "scan-2  —  tag" and widget.image_list.currentRow() == 0
    assert "changed by another program" in widget.save_status.text()
    assert camera.zoom == pytest.approx(zoom), "the same image shown anew keeps the view"
    assert widget.save() == [], "nothing to save: the screen is what the site holds"
    widget.tag_boxes["lesion"].setCheckState(Qt.CheckState.Checked)  # the clinician's own edit …
    with SiteStore.open(tmp_path / "site") as other:  # … and another write to the image
        other.set_mask("scan-0", _drawn(1, 4, 1, 4))
    qtbot.wait(2 * WATCH_MS)
    assert widget.tag_boxes["lesion"].checkState() == Qt.CheckState.Checked, "an edit is never replaced"
    np.testing.assert_array_equal(viewer.layers["FedMix mask"].data, _drawn(5, 15, 6, 20))
    assert widget.save(force=True) == []  # Save now: the clinician's screen
    widget.next_image()
    assert widget.current_id == "scan-1" and widget.save_status.text() == "", "a note of the image it left"


def test_annotate_removes_the_image_shown_when_asked_and_follows_a_removal_by_another_program(
        make_napari_viewer, qtbot, tmp_path, images, monkeypatch) -> None:
    """A patient who withdrew consent, a scan imported by mistake: the panel could not take an image out of the
    site. Remove image… asks, then removes the image with its annotations and shows the next. An image removed
    by another program (``site remove`` in a terminal) while it is shown stayed on screen, and every autosave of
    its edits raised "no image with id"; the panel now says so and shows the image in its place."""
    import napari.utils.notifications
    from qtpy.QtWidgets import QMessageBox, QPushButton

    from napari_fedmix.annotate_widget import WATCH_MS

    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    monkeypatch.setattr(napari.utils.notifications, "show_warning", said.append)
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    viewer.layers["FedMix mask"].data = _drawn(5, 15, 6, 20)
    widget._dirty = True
    assert widget.save() == []
    [remove] = [b for b in widget.findChildren(QPushButton) if b.text() == "Remove image…"]
    asked: list[str] = []
    answer = QMessageBox.StandardButton.No

    def question(_parent, _title, text):
        asked.append(text)
        return answer

    monkeypatch.setattr(QMessageBox, "question", question)
    remove.click()
    assert asked and asked[0].startswith(f"Remove 'scan-0' from the site {tmp_path / 'site'}, with its annotations "
                                         "(a mask)?")
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.image_ids() == ["scan-0", "scan-1", "scan-2"], "No removes nothing"
    answer = QMessageBox.StandardButton.Yes
    remove.click()
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.image_ids() == ["scan-1", "scan-2"]
    assert not (tmp_path / "site" / "masks" / "scan-0.tif").exists()
    assert widget.current_id == "scan-1" and widget.image_list.currentRow() == 0
    assert [widget.image_list.item(i).text() for i in range(2)] == ["scan-1  —  none", "scan-2  —  none"]
    assert not viewer.layers["FedMix mask"].data.any(), "scan-1's (empty) mask, not scan-0's"
    assert said[-1].startswith("removed 1 image(s) with their annotations (masks: 1  boxes: 0  tags: 0):")

    widget.tag_boxes["lesion"].setCheckState(Qt.CheckState.Checked)  # an edit, while a terminal removes it
    with SiteStore.open(tmp_path / "site") as other:
        other.remove_image("scan-1")
    qtbot.waitUntil(lambda: widget.current_id == "scan-2", timeout=3 * WATCH_MS)
    assert widget.save_status.text() == ("'scan-1' was removed from the site by another program; your edits to it "
                                         "are not saved")
    assert widget.image_list.count() == 1 and widget.save() == []
    np.testing.assert_array_equal(viewer.layers["FedMix image"].data, tifffile.imread(images[2]))

    widget.remove_image("scan-2")  # the last one: nothing left to show
    assert widget.current_id is None and widget.image_list.count() == 0
    assert "FedMix image" not in viewer.layers and "FedMix mask" not in viewer.layers
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert len(store) == 0


def test_annotate_exports_the_site_with_the_edits_on_screen_as_import_reads_it(make_napari_viewer, qtbot, tmp_path,
                                                                                images, monkeypatch) -> None:
    """The clinic's annotations could not leave the site from napari. Export… writes them (and the images, if
    asked) as ``site export`` does, the edits on screen saved first; a folder holding files is refused."""
    import napari.utils.notifications
    from qtpy.QtWidgets import QFileDialog, QMessageBox

    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    monkeypatch.setattr(napari.utils.notifications, "show_warning", said.append)
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    viewer.layers["FedMix mask"].data = _drawn(5, 15, 6, 20)  # drawn, not saved yet
    widget._dirty = True
    out = tmp_path / "export"
    out.mkdir()  # as the folder dialog's "new folder" leaves it
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *_a, **_k: str(out))
    asked: list[str] = []  # the images: yes; pseudonymise: no (the folder stays in the clinic)

    def answer(_parent, title, *_a, **_k):
        asked.append(title)
        return QMessageBox.StandardButton.No if "pseudonymise" in title else QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", answer)
    widget._choose_export()
    assert asked == ["Export", "Export: pseudonymise?"]
    assert widget.import_worker is not None, "runs beside the viewer, with the progress bar and Cancel"
    qtbot.waitUntil(lambda: widget.import_worker is None, timeout=60_000)
    assert widget.last_export is not None and said[-1].startswith(f"exported to {out}: images: 3  masks: 1  ")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["scan-0.tif", "scan-1.tif", "scan-2.tif"]
    widget.export_site(tmp_path / "leaves", images=True, pseudonymise=True)  # for a partner: case-001 …
    qtbot.waitUntil(lambda: widget.import_worker is None, timeout=60_000)
    assert sorted(p.name for p in (tmp_path / "leaves" / "images").iterdir()) == \
        ["case-001.tif", "case-002.tif", "case-003.tif"]
    assert "pseudonymised: images named case-…" in said[-1] and widget.last_export.key.is_file()
    np.testing.assert_array_equal(tifffile.imread(out / "masks" / "scan-0_mask.tif"), _drawn(5, 15, 6, 20))
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        widget.export_site(out)

    # Cancel after the first image: no folder that looks whole, nothing half-written left beside it. Cancel is
    # asked from the worker's thread as the first image is done: a slot connected after the export had started
    # could miss its steps, and an export of three images could end before a Cancel from the GUI thread
    from fedmix_engine.data import export

    steps_of = export.export_steps

    def cancelled_after_the_first_image(*args, **kwargs):
        steps = steps_of(*args, **kwargs)
        try:
            first = next(steps)
            widget.stop_import()  # what Cancel does, minus the label text (widgets belong to the GUI thread)
            yield first
            return (yield from steps)  # the report, as the export's own steps return it
        finally:
            steps.close()

    monkeypatch.setattr(export, "export_steps", cancelled_after_the_first_image)
    import shutil
    import threading

    removed_in: list[threading.Thread] = []  # the unfinished folder: removed in the worker (a site's images: slow)
    remove = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *args, **kwargs: (
        removed_in.append(threading.current_thread()) if ".stopped.partial" in str(path) else None,
        remove(path, *args, **kwargs))[1])
    widget.export_site(tmp_path / "stopped", images=True)
    qtbot.waitUntil(lambda: widget.import_worker is None, timeout=60_000)
    assert widget.last_export is None
    assert sorted(p.name for p in tmp_path.iterdir() if "stopped" in p.name) == []
    assert removed_in and threading.main_thread() not in removed_in, removed_in


def test_annotate_import_warns_with_the_first_problems_and_the_log_of_all(make_napari_viewer, qtbot, tmp_path,
                                                                          images, monkeypatch):
    """The warning showed 10 problems and "… and N more", and the others were lost; it now names the log
    in the site's logs/ folder that keeps them all."""
    import napari.utils.notifications

    warnings: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", warnings.append)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(14):  # masks of images this folder does not hold
        tifffile.imwrite(masks / f"other-{i:02d}_mask.tif", np.zeros((40, 48), np.uint8))
    _viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", [])
    problems = _imported(qtbot, widget, widget.import_folder(images[0].parent, masks))
    assert len(problems) == 14
    log = widget.last_import.problems_file
    assert log.parent == tmp_path / "site" / "logs" and log.read_text().splitlines() == problems
    assert len(warnings) == 1
    shown = warnings[0].splitlines()
    assert shown[:10] == problems[:10] and shown[10:] == [f"… and 4 more; all 14 are listed in {log}"]


def test_annotate_says_which_stored_image_is_damaged_and_stays_on_the_image_shown(make_napari_viewer, qtbot,
                                                                                  tmp_path, images, monkeypatch):
    """A site image damaged on disk (a failing disk, a sync tool) raised from the list's selection slot:
    napari's error pop-up with a traceback, and the list showed the damaged image selected while the layers
    (and the edits) were still the previous image's. Now a warning names the file, and the list goes back
    to the image shown, whose edits keep going to it."""
    import napari.utils.notifications

    warnings: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", warnings.append)
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images[:2])
    shown = widget.current_id
    other = next(i for i in widget.store.image_ids() if i != shown)
    damaged = tmp_path / "site" / "images" / f"{other}.tif"
    damaged.write_bytes(b"II*\x00 torn")
    with qtbot.capture_exceptions() as raised:
        widget.image_list.setCurrentRow(1)
    assert raised == [], "said, not raised into napari's error pop-up"
    assert len(warnings) == 1 and warnings[0].startswith(f"{damaged}: unreadable or corrupt image file"), warnings
    assert widget.current_id == shown and widget.image_list.currentRow() == 0
    from napari_fedmix.annotate_widget import MASK_LAYER

    mask = np.zeros((40, 48), np.uint8)
    mask[5:15, 5:15] = 1
    viewer.layers[MASK_LAYER].data = mask
    widget._dirty = True
    assert widget.save() == []
    assert widget.store.record(shown).has_mask and not widget.store.record(other).has_mask


def test_annotate_import_runs_beside_the_event_loop_and_a_cancelled_one_keeps_whole_images(
        make_napari_viewer, qtbot, tmp_path, monkeypatch):
    import threading

    real_add = SiteStore.add_image
    threads: set[int] = set()

    def slow_disk(self, source, *args, **kwargs):  # a network share: 20 ms per image
        threads.add(threading.get_ident())
        time.sleep(0.02)
        return real_add(self, source, *args, **kwargs)

    monkeypatch.setattr(SiteStore, "add_image", slow_disk)
    rng = np.random.default_rng(1)
    folder = tmp_path / "busi"
    folder.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 5:30] = 255
    for i in range(60):
        tifffile.imwrite(folder / f"case{i:02d}.tif", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        tifffile.imwrite(folder / f"case{i:02d}_mask.tif", mask)
    _viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", [])

    steps: list = []
    with EventLoopWatch() as loop:
        worker = widget.import_folder(folder)
        worker.yielded.connect(lambda step: steps.append((time.perf_counter(), step)))
        with pytest.raises(InputError, match="an import is running"):
            widget.import_folder(folder)  # one import at a time
        assert not widget.import_bar.isHidden() and not any(b.isEnabled() for b in widget._site_buttons)
        qtbot.waitUntil(lambda: len(steps) >= 20, timeout=60_000)
        widget.stop_import()
        assert _imported(qtbot, widget, worker) is None, "a cancelled import reports nothing"
    kept = widget.image_list.count()
    assert 20 <= kept < 60 and steps[-1][1].stage == "images", "stopped during the images, not after"
    assert widget.import_bar.isHidden() and all(b.isEnabled() for b in widget._site_buttons)
    assert threads and threading.get_ident() not in threads, "images are added in a worker thread"
    pause = loop.longest_pause(until=steps[-1][0])  # while importing (then the first image is shown)
    assert pause < 0.2, f"event loop blocked for {pause * 1000:.0f} ms"
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert all(store.read_image(i).shape == (64, 64) for i in store.image_ids()), "every kept image is whole"

    worker = widget.import_folder(folder)
    assert _imported(qtbot, widget, worker) == []
    report = widget.last_import
    assert (report.images_added, report.images_already_present, report.masks) == (60 - kept, kept, 60)
    assert widget.image_list.count() == 60 and widget.import_bar.format() == "masks %v/%m"


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    out = tmp_path / "sample"
    make_sample(out, sites=1, images=8, eval_images=2, size=32, supervision=["box"])
    return out / "site-a"


def _clients_made(train) -> list:
    """Every FederationClient the Train panel ``train`` makes from now on (a Start's join, a Check)."""
    clients: list = []
    make = train._client
    train._client = lambda *args, **kwargs: clients.append(make(*args, **kwargs)) or clients[-1]
    return clients


def _start_local(widget, site: Path, rounds: int) -> None:
    widget.site.setText(str(site))
    widget.device.setCurrentText("cpu")
    widget.rounds.setValue(rounds)
    widget.width_spin.setValue(4)
    widget.size.setValue(32)
    widget.start()


def test_train_runs_with_the_fields_as_they_were_at_start(make_napari_viewer, qtbot, sample, monkeypatch) -> None:
    """The worker read the panel's fields (rounds, width, image size, validation site, server, token) from its
    own thread when it began, not at Start: Qt widgets belong to the GUI thread, and a field changed in that
    moment changed the run. Start now reads them, and the worker takes that copy."""
    import threading

    from fedmix_engine.checkpoint import load_checkpoint
    from fedmix_engine.data.site_store import SiteStore
    from napari_fedmix.train_widget import TrainWidget

    edited = threading.Event()
    open_store = SiteStore.open.__func__

    def opened_after_the_edit(cls, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            assert edited.wait(30), "the test did not edit the fields"
        return open_store(cls, *args, **kwargs)

    monkeypatch.setattr(SiteStore, "open", classmethod(opened_after_the_edit))
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    _start_local(train, sample, rounds=1)  # width 4, images at 32 px
    train.rounds.setValue(3)
    train.width_spin.setValue(8)
    train.size.setValue(48)
    edited.set()
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    _, model, meta = load_checkpoint(sample / "models" / "local" / "final.safetensors")
    assert (model.base_width, meta["image_size"], meta["round"]) == (4, 32, 1), (model, meta)
    assert train.round_bar.maximum() == 1


def test_local_training_offers_a_network_an_installed_package_offers(make_napari_viewer, qtbot, sample,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """The commands and a federation could train a network from an installed package; napari's local
    Train built the U-Net whatever was installed. Its network row shows only when there is a choice."""
    from fedmix_engine.checkpoint import load_checkpoint
    from fedmix_engine.model import config as model_config
    from model_package_helpers import install_network_package
    from napari_fedmix.train_widget import TrainWidget

    monkeypatch.setattr(model_config, "_REGISTRY", {"unet": model_config._unet})  # whatever a test registered
    viewer = make_napari_viewer()
    plain = TrainWidget(viewer)
    qtbot.addWidget(plain)
    assert not plain.network.isVisibleTo(plain), "the U-Net alone: no row to choose from"
    install_network_package(tmp_path, monkeypatch)
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    assert train.network.isVisibleTo(train)
    assert [train.network.itemText(k) for k in range(train.network.count())] == [
        "unet", "broken", "not-a-builder", "tiny-conv"]
    train.network.setCurrentText("tiny-conv")
    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    pair, config, _ = load_checkpoint(sample / "models" / "local" / "final.safetensors")
    assert config.name == "tiny-conv" and "net1.body.0.weight" in pair, train.status.text()
    train.network.setCurrentText("broken")  # its package's import fails: said, nothing trained
    train.continue_local.setChecked(False)
    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
    assert "network 'broken' of fedmix-tinynet 0.1" in train.status.text(), train.status.text()
    assert load_checkpoint(sample / "models" / "local" / "final.safetensors")[1].name == "tiny-conv"


def test_local_training_on_two_classes_says_each_class_validation_dice(make_napari_viewer, qtbot,
                                                                        tmp_path: Path) -> None:
    """The validation Dice of a lesion-and-cyst site was one line in the plot, the classes averaged: a model
    that found the lesions and none of the cysts looked half good, and its figure was not written anywhere."""
    from fedmix_engine.evaluation import EvalSet, evaluate
    from fedmix_engine.predict import Predictor
    from napari_fedmix.train_widget import TrainWidget

    make_sample(tmp_path / "fed", sites=1, images=6, eval_images=2, size=32, classes=2)
    site, validation = tmp_path / "fed" / "site-a", tmp_path / "fed" / "eval" / "site-a" / "val"
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    train.validation.setText(str(validation))
    _start_local(train, site, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    scores = evaluate(Predictor.from_checkpoint(site / "models" / "local" / "final.safetensors", "cpu"),
                      EvalSet.from_store(validation, 32, 2, 1))
    lesion, cyst = scores["dice_per_class"]["lesion"], scores["dice_per_class"]["cyst"]
    assert (f"; validation Dice {scores['dice']:.3f} (lesion {lesion:.3f} · cyst {cyst:.3f})\n"
            in train.status.text()), train.status.text()


def _set_to_join(widget, site: Path, url: str, token: str) -> None:
    """The Train widget's federation fields, filled as a clinician would (CPU, not started)."""
    widget.site.setText(str(site))
    widget.mode.setCurrentIndex(1)
    widget.server.setText(url)
    widget.token.setText(token)
    widget.device.setCurrentText("cpu")


def test_train_widget_joins_a_real_server_and_plots_the_held_out_dice_it_sends(make_napari_viewer, qtbot, sample,
                                                                             tmp_path):
    """The widget scored each closed round's model itself, after downloading it again, and kept the figure to
    itself; the client now scores every model it receives (round 0's too) and the server gets the scores.
    The token comes from the admin's token file, as 'join --token-file' reads it (a clinician had to open the
    file and copy its line by hand): here as Windows PowerShell writes it, UTF-16 with CRLF."""
    from federation_helpers import TINY_SETTINGS, make_tokens, running_server
    from napari_fedmix.train_widget import TrainWidget

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    token_file = tmp_path / "site-a.token"
    train.load_token_file(token_file)
    assert train.status.text() == f"error: {token_file}: token file not found (the admin's 'fedmix-engine token " \
        "add' prints the token)"
    token_file.write_bytes(f"{token}\r\n".encode("utf-16"))
    token_file.chmod(0o644)
    train.load_token_file(token_file)
    assert train.token.text() == token
    assert train.status.text() == f"warning: {token_file}: other users of this machine can read this site's token " \
        f"(mode 644); chmod 600 {token_file}"
    token_file.chmod(0o600)
    train.token.setText("")
    train.load_token_file(token_file)
    assert train.token.text() == token and train.status.text() == f"token read from {token_file}"
    with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "2", *TINY_SETTINGS]) as server:
        _set_to_join(train, sample, server.url, train.token.text())
        train.validation.setText(str(sample.parent / "eval" / "site-a" / "val"))
        train.start()
        qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
        evaluations = server.status()["evaluations"]
    assert "federation finished after 2 rounds" in train.status.text(), train.status.text()
    plotted = train.history["validation Dice"]
    assert [r for r, _ in plotted] == [0, 1, 2]
    assert [dice for _, dice in plotted] == [e["sites"]["site-a"]["dice"] for e in evaluations]
    assert train.round_bar.value() == 2 and len(train.history["weight"]) == 2
    assert (sample / "models" / "global.safetensors").is_file()


def test_a_runtime_error_in_a_generator_worker_reaches_the_widget_and_ends_the_worker(qtbot):
    """superqt drops a RuntimeError raised in a generator worker as if the worker had been deleted: no
    'errored', no 'finished'. torch raises RuntimeErrors (a device mismatch, CUDA out of memory), and so
    did the federation client, so a widget waited for ever, saying 'starting…'."""
    from napari_fedmix.workers import make_worker

    def work():
        yield 1
        raise RuntimeError("Expected all tensors to be on the same device")

    seen: list[Exception] = []
    worker = make_worker(work, on_error=seen.append)
    with qtbot.capture_exceptions() as relayed, qtbot.waitSignal(worker.finished, timeout=10_000):
        worker.start()
    assert [(type(e), str(e)) for e in seen] == [(RuntimeError, "Expected all tensors to be on the same device")]
    assert [type(e[1]) for e in relayed] == [RuntimeError], "unexpected: napari offers its traceback"


def test_train_widget_says_a_servers_refusal_and_a_site_joined_elsewhere_without_a_traceback(
        make_napari_viewer, qtbot, sample, tmp_path):
    """A revoked token, or the site already taking part from a terminal, is the user's to fix, as bad input
    is: the status line says it, with no type name, and napari is not handed a traceback 'for a bug
    report' (it was: FederationError counted as unexpected)."""
    from filelock import FileLock

    from federation_helpers import TINY_SETTINGS, make_tokens, running_server
    from fedmix_engine.federation.client import JOIN_LOCK
    from napari_fedmix.train_widget import TrainWidget

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        _set_to_join(train, sample, server.url, "fmx_revoked")
        with qtbot.capture_exceptions() as relayed:
            train.start()
            qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
        assert train.status.text().startswith("error: the server refused this site's token (unknown or revoked")
        assert relayed == []

        train.token.setText(token)
        (sample / "models").mkdir(exist_ok=True)
        with FileLock(sample / "models" / JOIN_LOCK), qtbot.capture_exceptions() as relayed:  # a join elsewhere
            train.start()
            qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
        assert train.status.text() == f"error: {sample}: another join of this site is running (in a terminal or " \
            "in napari, on this machine or one sharing the folder); one process per site: stop the other first"
        assert relayed == [] and server.status()["uploaded"] == []


def test_train_widget_checks_the_server_token_and_site_without_training(make_napari_viewer, qtbot, sample,
                                                                         tmp_path):
    """join --check in the panel: a clinician tries the server address, the token the admin sent and the site
    before the federation's day, and a wrong one is said in the status line, not found on the day."""
    from federation_helpers import TINY_SETTINGS, make_tokens, running_server
    from napari_fedmix.train_widget import TrainWidget

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a"])["site-a"]
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    assert not train.check_button.isEnabled(), "for a federation only"
    with running_server(state, ["--sites", "1", "--min-sites", "1", "--rounds", "1", *TINY_SETTINGS]) as server:
        _set_to_join(train, sample, server.url, "fmx_revoked")
        assert train.check_button.isEnabled()
        with qtbot.capture_exceptions() as relayed:
            train.check()
            assert not train.start_button.isEnabled() and not train.check_button.isEnabled()
            qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
        assert train.status.text().startswith("error: the server refused this site's token (unknown or revoked")
        assert relayed == [] and train.start_button.isEnabled() and train.check_button.isEnabled()

        train.token.setText(token)
        clients = _clients_made(train)
        train.check()
        qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
        assert len(clients) == 1 and clients[0].http.is_closed, "its connections are not left to the GC"
        said = train.status.text().splitlines()
        assert said[1:3] == ["token: accepted, as site 'site-a'", "federation: fedmix, 1 round; round 1 open"], said
        assert said[-1] == "check passed: Start takes part in the federation"
        assert server.status()["uploaded"] == [] and server.status()["last_round"] == 0, "it did not train"
        # a site that does not fit: what passed (server, token, federation) stays above the error
        from fedmix_engine.data.site_store import SiteStore

        SiteStore.create(tmp_path / "two-classes", ["lesion", "cyst"]).close()
        train.site.setText(str(tmp_path / "two-classes"))
        train.check()
        qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
        failed = train.status.text().splitlines()
        assert failed[:3] == said[:3] and failed[3:] == [
            f"error: {tmp_path / 'two-classes'}: site has 2 class(es) (lesion, cyst) and 1 channel(s); the "
            "federation's model expects 1 and 1"], failed
    train.mode.setCurrentIndex(0)
    assert not train.check_button.isEnabled()


def test_train_start_saves_the_mask_just_drawn_in_annotate_first(make_napari_viewer, qtbot, tmp_path, images):
    """Annotate saves on changing image and every 15 s: a mask drawn and Start pressed at once trained
    without it, the run having read the site before the autosave."""
    from napari_fedmix.annotate_widget import MASK_LAYER
    from napari_fedmix.train_widget import TrainWidget

    viewer, annotate = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    viewer.layers[MASK_LAYER].data = _drawn(5, 15, 6, 20)  # drawn, not yet saved
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.read_mask("scan-0") is None
    _start_local(train, tmp_path / "site" / ".." / "site", rounds=1)  # the same site, spelled otherwise
    with SiteStore.open(tmp_path / "site", readonly=True) as store:  # saved before the run read the site
        np.testing.assert_array_equal(store.read_mask("scan-0"), _drawn(5, 15, 6, 20))
    assert not annotate._dirty and annotate.current_id == "scan-0", "saved where it was drawn, and still shown"
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)


def test_train_one_round_locally_then_predict_adds_two_layers(make_napari_viewer, qtbot, sample):
    from napari_fedmix.predict_widget import PRED_LAYER, PROB_LAYER
    from napari_fedmix.train_widget import TrainWidget

    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    qtbot.addWidget(train)
    train.validation.setText(str(sample / ".." / sample.name))  # the training site itself, spelled otherwise
    _start_local(train, sample, rounds=1)
    assert train.worker is None and "validation site: is the site being trained" in train.status.text()
    assert not (sample / "models").exists(), "refused before training"
    import shutil  # a validation folder holding a copy of a training image: scored on what it trained on

    copy = shutil.copytree(sample.parent / "eval" / "site-a" / "val", sample.parent / "val-with-a-copy")
    with SiteStore.open(sample, readonly=True) as site, SiteStore.open(copy) as store:
        store.add_image(site.read_image(site.image_ids()[0]), image_id="again")
        store.set_tag("again", "lesion", False)
    train.validation.setText(str(copy))
    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
    assert "1 of its images is also in the training site (again = " in train.status.text()
    assert not (sample / "models" / "local" / "final.safetensors").exists(), "refused before training"
    train.validation.setText(str(sample.parent / "eval" / "site-a" / "val"))
    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    checkpoint = sample / "models" / "local" / "final.safetensors"
    assert checkpoint.exists(), train.status.text()
    assert train.round_bar.value() == 1 and "\nfinished; model: " in train.status.text()
    assert "stopped" not in train.status.text()
    assert "CPU requested" in train.status.text(), "the device in use is shown"
    assert "; pseudo-labels kept: " in train.status.text() and " box" in train.status.text(), train.status.text()
    (r, dice), = train.history["validation Dice"]
    assert r == 1 and 0.0 <= dice <= 1.0, "the plot shows the round's validation Dice"
    assert f"; validation Dice {dice:.3f}\n" in train.status.text(), "and the status line its figure"
    assert len(train.history["loss"]) == 1
    assert train.history["weight"] == [], "training alone, the weight would be a flat line at 1"

    with SiteStore.open(sample, readonly=True) as store:
        viewer.add_image(store.read_image(store.image_ids()[0]), name="scan")
    predict = _predict_widget(viewer, qtbot, checkpoint)
    for _ in range(2):  # a second click reuses the same two layers
        before = predict._probability
        assert predict.predict_active() is not None
        # waits for the result itself: a worker this small can finish before a waitSignal would connect
        qtbot.waitUntil(lambda before=before: predict._probability is not before and PRED_LAYER in viewer.layers,
                        timeout=60_000)
    names = [layer.name for layer in viewer.layers]
    assert names.count(PROB_LAYER) == 1 and names.count(PRED_LAYER) == 1
    assert viewer.layers[PROB_LAYER].data.shape == viewer.layers["scan"].data.shape
    # which model made the overlay, as a clinician needs to know before trusting it
    device = predict.predictor().plan.device  # the CPU here; a GPU where there is one
    assert predict.status.text().endswith("of the image; model: final.safetensors (round 1, lesion, trained at "
                                          f"32 px, on {device})"), predict.status.text()
    predict.threshold.setValue(99)
    assert viewer.layers[PRED_LAYER].data.sum() <= (predict._probability.max(0) > 0.5).sum()
    # the status line's foreground follows the slider (it kept the first threshold's figure)
    shown = float((viewer.layers[PRED_LAYER].data > 0).mean())
    assert predict.status.text().startswith(f"foreground {shown:.1%} of the image; model: final.safetensors")


def test_predict_overlays_sit_on_the_image_never_predict_themselves_and_name_a_bad_layer(make_napari_viewer,
                                                                                          qtbot, tmp_path):
    from napari_fedmix.predict_widget import PRED_LAYER, PROB_LAYER

    checkpoint = _tiny_checkpoint(tmp_path)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 255, (40, 48), dtype=np.uint8), name="scan", scale=(0.5, 2.0),
                     translate=(10.0, -5.0))  # pixel spacing and offset, as a reader with metadata sets them
    widget = _predict_widget(viewer, qtbot, checkpoint)

    def predict() -> np.ndarray:
        before = widget._probability
        assert widget.predict_active() is not None
        qtbot.waitUntil(lambda: widget._probability is not before, timeout=60_000)
        return widget._probability

    first = predict()
    for name in (PROB_LAYER, PRED_LAYER):
        assert viewer.layers[name].data.shape == (40, 48)
        np.testing.assert_allclose(viewer.layers[name].scale, (0.5, 2.0))
        np.testing.assert_allclose(viewer.layers[name].translate, (10.0, -5.0))
    viewer.layers.selection.active = viewer.layers[PROB_LAYER]  # the overlay is selected: still predict the scan
    np.testing.assert_allclose(predict(), first)
    viewer.add_image(rng.integers(0, 255, (30, 36), dtype=np.uint8), name="other")  # active, no spacing
    assert predict().shape[-2:] == (30, 36)
    for name in (PROB_LAYER, PRED_LAYER):  # the reused overlays move to the new image's geometry
        np.testing.assert_allclose(viewer.layers[name].scale, (1.0, 1.0))
        np.testing.assert_allclose(viewer.layers[name].translate, (0.0, 0.0))
    viewer.add_image(np.full((40, 48), np.nan, np.float32), name="nan")
    assert widget.predict_active() is None, "refused before a worker starts"
    assert "error: layer 'nan': image contains NaN" in widget.status.text()
    pyramid = [np.zeros((64, 96), np.uint8), np.zeros((32, 48), np.uint8)]  # a whole-slide image's levels
    viewer.add_image(pyramid, name="slide", multiscale=True)
    assert widget.predict_active() is None  # np.asarray of the levels raised a bare ValueError
    assert "error: layer 'slide': a multiscale (pyramid) layer of 64×96 pixels" in widget.status.text()


def test_the_probability_overlay_leaves_the_image_as_it_was_where_the_model_sees_no_lesion(make_napari_viewer,
                                                                                            qtbot, tmp_path):
    """The probability overlay was blended at half opacity over the whole image: where the model saw nothing
    it still painted magma's near-black over half of every pixel, dimming the scan a radiologist reads
    beside the prediction. It is now added to the image (magma's black adds nothing). Read from the
    rendered canvas."""
    from model_helpers import all_lesion_checkpoint, no_lesion_checkpoint
    from napari_fedmix.predict_widget import PRED_LAYER

    viewer = make_napari_viewer(show=True)  # a hidden viewer's canvas renders black
    viewer.add_image(np.full((40, 48), 160, np.uint8), name="scan", contrast_limits=(0, 255))
    before = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    centre = tuple(n // 2 for n in before.shape[:2])
    assert before[centre].min() > 100, "the scan is drawn where the test looks"

    def predicted(checkpoint: Path) -> np.ndarray:
        widget = _predict_widget(viewer, qtbot, checkpoint)
        viewer.layers.selection.active = viewer.layers["scan"]
        assert widget.predict_active() is not None
        qtbot.waitUntil(lambda: widget._probability is not None, timeout=60_000)
        return viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)

    nothing = predicted(no_lesion_checkpoint(tmp_path / "none.safetensors"))
    assert not viewer.layers[PRED_LAYER].data.any()
    assert np.abs(nothing[centre] - before[centre]).max() <= 8, (before[centre], nothing[centre])
    everything = predicted(all_lesion_checkpoint(tmp_path / "all.safetensors"))  # a lesion is coloured
    assert np.ptp(before[centre]) == 0 and np.ptp(everything[centre]) > 40, (before[centre], everything[centre])


def test_a_two_class_prediction_says_each_class_share_and_names_the_class_under_the_cursor(make_napari_viewer,
                                                                                            qtbot, tmp_path):
    """A two-class model's prediction was one foreground figure in two colours, neither named."""
    from model_helpers import all_lesion_checkpoint
    from napari_fedmix.predict_widget import PRED_LAYER

    viewer = make_napari_viewer()
    viewer.add_image(np.full((40, 48), 160, np.uint8), name="scan")
    widget = _predict_widget(viewer, qtbot, all_lesion_checkpoint(tmp_path / "two.safetensors",
                                                                  classes=("lesion", "cyst")))
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: widget._probability is not None, timeout=60_000)
    assert "foreground 100.0% of the image (lesion 100.0% · cyst 0.0%)" in widget.status.text(), widget.status.text()
    hovered = viewer.layers[PRED_LAYER].get_status((20, 20), view_direction=None, dims_displayed=[0, 1],
                                                   world=True)["value"]
    assert "class: lesion" in hovered, hovered
    # a calibrated scan (a DICOM file's 0.5 × 0.25 mm pixels) gives each class's area: a report's figure
    viewer.add_image(np.full((40, 48), 160, np.uint8), name="mr", scale=(0.5, 0.25), units=("mm", "mm"))
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: "240.0 mm²" in widget.status.text(), timeout=60_000)
    assert ("foreground 100.0% of the image (240.0 mm²; lesion 100.0% 240.0 mm² · cyst 0.0% 0.0 mm²)"
            in widget.status.text()), widget.status.text()


def test_a_closed_image_is_let_go_after_its_prediction(make_napari_viewer, qtbot, tmp_path):
    """napari's window keeps every worker it made while it is open, with the function the worker ran and
    the slots connected to it: Predict's closure held the image, its result's slot the layer, after the
    layer was closed; a clinician predicting image after image all day kept every one in memory."""
    import gc
    import weakref

    viewer = make_napari_viewer()
    widget = _predict_widget(viewer, qtbot, _tiny_checkpoint(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 255, (400, 480), dtype=np.uint8)
    image, layer = weakref.ref(pixels), weakref.ref(viewer.add_image(pixels, name="scan"))
    del pixels
    running = [widget.predict_active()]
    qtbot.waitUntil(lambda: widget._source is not None and not running[0].is_running, timeout=60_000)
    qtbot.wait(50)  # the worker's connections are let go once its finished signal has been handled
    viewer.layers.clear()  # the image closed, and the overlays
    widget._source = widget._probability = None  # what the panel keeps of its last prediction
    running.clear()
    gc.collect()
    assert layer() is None and image() is None, "the closed image is still held"


def test_predict_a_stack_frame_by_frame_with_progress_and_stop(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A cine loop or a volume's slices was refused ('3-D stack'); each frame is now predicted, the
    overlays are stacks on the same axes, and Stop ends a long run without touching them."""
    from fedmix_engine.predict import Predictor
    from napari_fedmix.predict_widget import PRED_LAYER, PROB_LAYER

    config = ModelConfig(base_width=4)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", init_pair(config, 0), config, {"image_size": 32})
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    loop = rng.integers(0, 255, (6, 40, 48), dtype=np.uint8)
    viewer.add_image(np.zeros((40, 48), np.uint8), name="2-D first")  # 2-D overlays exist before the stack's
    widget = _predict_widget(viewer, qtbot, checkpoint)
    statuses: list[str] = []  # every status line shown (a slot connected after the worker started missed some)
    show = widget.status.setText
    widget.status.setText = lambda text: statuses.append(text) or show(text)

    def predict(name: str) -> np.ndarray:
        viewer.layers.selection.active = viewer.layers[name]
        before = widget._probability
        worker = widget.predict_active()
        assert worker is not None, widget.status.text()
        qtbot.waitUntil(lambda: widget._probability is not before, timeout=60_000)
        return widget._probability

    predict("2-D first")
    viewer.add_image(loop, name="loop", scale=(1.0, 0.5, 0.5))
    probability = predict("loop")
    reference = Predictor.from_checkpoint(checkpoint, "cpu")
    for t in (0, 5):  # each frame as if it were a 2-D image of its own
        np.testing.assert_allclose(probability[:, t], reference.probabilities(loop[t]), atol=1e-5)
    for name in (PROB_LAYER, PRED_LAYER):
        assert viewer.layers[name].data.shape == (6, 40, 48)
        np.testing.assert_allclose(viewer.layers[name].scale, (1.0, 0.5, 0.5))
    progress = [text for text in statuses if text.startswith("predicting loop: ")]
    assert progress and progress[-1] == "predicting loop: frame 6 of 6", statuses
    assert "of the stack" in widget.status.text()
    # a calibrated loop (a DICOM cine's 0.5 × 0.25 mm pixels): the lesion's area a frame, as summary.csv gives it
    viewer.add_image(loop, name="calibrated loop", scale=(1.0, 0.5, 0.25), units=("pixel", "mm", "mm"))
    predict("calibrated loop")
    per_frame = int((viewer.layers[PRED_LAYER].data > 0).sum()) / 6 * 0.5 * 0.25
    assert f"of the stack ({per_frame:.1f} mm² per frame, averaged)" in widget.status.text(), widget.status.text()

    viewer.add_image(rng.integers(0, 255, (3, 40, 48, 3), dtype=np.uint8), name="colour loop", rgb=True)
    assert predict("colour loop").shape == (1, 3, 40, 48)

    bad = rng.random((4, 40, 48)).astype(np.float32)
    bad[2, 5, 5] = np.nan
    viewer.add_image(bad, name="bad loop")
    viewer.layers.selection.active = viewer.layers["bad loop"]
    widget.predict_active()
    qtbot.waitUntil(lambda: "error" in widget.status.text(), timeout=60_000)
    assert "layer 'bad loop', frame 2: image contains NaN" in widget.status.text()
    assert viewer.layers[PRED_LAYER].data.shape == (3, 40, 48), "the last good prediction stays"

    viewer.add_image(rng.integers(0, 255, (3000, 40, 48), dtype=np.uint8), name="long")
    viewer.layers.selection.active = viewer.layers["long"]
    shown = viewer.layers[PRED_LAYER].data
    import gc
    import weakref

    runs: list[weakref.ref] = []  # the stack's frame loop and its frames so far: let go once stopped
    frames_of = Predictor.iter_stack_probabilities
    monkeypatch.setattr(Predictor, "iter_stack_probabilities", lambda self, *args, **kwargs: (
        run := frames_of(self, *args, **kwargs), runs.append(weakref.ref(run)))[0])
    widget.predict_active()
    assert widget.stop_button.isEnabled() and not widget.button.isEnabled(), "one stack at a time"
    qtbot.waitUntil(lambda: statuses[-1].startswith("predicting long: frame"), timeout=60_000)
    widget.stop()
    qtbot.waitUntil(lambda: widget.status.text().startswith("stopped"), timeout=60_000)
    qtbot.waitUntil(lambda: widget.button.isEnabled() and not widget.stop_button.isEnabled(), timeout=10_000)
    assert viewer.layers[PRED_LAYER].data is shown, "the overlays were left alone"
    gc.collect()
    assert len(runs) == 1 and runs[0]() is None, "the stopped stack's frame loop is still held"


def test_predict_says_when_a_grey_model_saw_a_colour_image_in_grey(make_napari_viewer, qtbot, tmp_path):
    """A Doppler image's flow is colour a grey model never sees (its luma only): the status says so after the
    model, for an image and a colour loop (by its first frame), not for grey shown as RGB or by a colour model."""
    from model_helpers import no_lesion_checkpoint

    viewer = make_napari_viewer()
    grey = np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    doppler = as_rgb.copy()
    doppler[10:20, 10:30] = (200, 30, 40)
    viewer.add_image(doppler, name="doppler", rgb=True)
    viewer.add_image(np.stack([doppler, as_rgb]), name="doppler loop", rgb=True)
    viewer.add_image(as_rgb, name="grey as rgb", rgb=True)
    viewer.add_image(grey, name="grey")
    widget = _predict_widget(viewer, qtbot, no_lesion_checkpoint(tmp_path / "grey.safetensors"))

    def said(name: str) -> str:
        viewer.layers.selection.active = viewer.layers[name]
        widget.predict_active()
        qtbot.waitUntil(lambda: widget._source is not None and widget._source[0] == name, timeout=60_000)
        return widget.status.text()

    model = f"on {widget.predictor().plan.device})"  # the end of the model's description: the CPU here
    note = ("in colour, but the model is grey: it saw only the {}'s brightness (luma), so what its colour shows, "
            "such as Doppler flow, played no part")
    assert said("doppler").endswith(f"{model}; {note.format('image')}"), widget.status.text()
    widget.threshold.setValue(99)  # the status follows the slider, the note stays
    assert widget.status.text().startswith("foreground 0.0% of the image; model:")
    assert widget.status.text().endswith(note.format("image"))
    assert said("doppler loop").endswith(f"{model}; {note.format('stack')}"), widget.status.text()
    assert said("grey as rgb").endswith(model) and said("grey").endswith(model)
    widget.checkpoint.setText(str(no_lesion_checkpoint(tmp_path / "colour.safetensors", in_channels=3)))
    assert said("doppler").endswith(model), "a colour model sees the colour"


def test_predict_shows_where_the_two_networks_disagree_when_asked(make_napari_viewer, qtbot, tmp_path):
    """FedMix trains two networks; where they still differ the prediction rests on the least. With the
    option on, that map is a layer on the image's axes (a stack's frame by frame); off, an earlier one is
    removed, since it would not fit the new prediction."""
    from fedmix_engine.predict import Predictor
    from napari_fedmix.predict_widget import DISAGREE_LAYER, PRED_LAYER

    checkpoint = _tiny_checkpoint(tmp_path)
    reference = Predictor.from_checkpoint(checkpoint, "cpu")
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 48), dtype=np.uint8)
    loop = rng.integers(0, 255, (3, 40, 48), dtype=np.uint8)
    viewer.add_image(image, name="scan", scale=(0.5, 0.5))
    widget = _predict_widget(viewer, qtbot, checkpoint)
    widget.show_disagreement.setChecked(True)
    statuses: list[str] = []  # every status line shown (a slot connected after the worker started missed some)
    show = widget.status.setText
    widget.status.setText = lambda text: statuses.append(text) or show(text)

    def predict(name: str) -> None:
        viewer.layers.selection.active = viewer.layers[name]
        before = widget._probability
        worker = widget.predict_active()
        assert worker is not None, widget.status.text()
        qtbot.waitUntil(lambda: widget._probability is not before, timeout=60_000)

    predict("scan")
    shown = viewer.layers[DISAGREE_LAYER]
    np.testing.assert_allclose(shown.data, reference.disagreement(image).max(axis=0), atol=1e-6)
    np.testing.assert_allclose(shown.scale, (0.5, 0.5))
    differ = float((reference.disagreement(image) > 0.5).mean())
    assert f"the two networks differ by more than 0.5 on {differ:.1%} of it; model: m.safetensors" \
        in widget.status.text()
    viewer.add_image(loop, name="loop")
    predict("loop")
    assert viewer.layers[DISAGREE_LAYER].data.shape == viewer.layers[PRED_LAYER].data.shape == (3, 40, 48)
    np.testing.assert_allclose(viewer.layers[DISAGREE_LAYER].data[2], reference.disagreement(loop[2])[0],
                               atol=1e-6)
    progress = [text for text in statuses if text.startswith("predicting loop: ")]
    assert progress and progress[-1] == "predicting loop: networks' disagreement: frame 3 of 3", statuses
    widget.show_disagreement.setChecked(False)
    predict("scan")
    assert DISAGREE_LAYER not in viewer.layers and "networks differ" not in widget.status.text()


def test_a_prediction_becomes_the_mask_to_correct_but_never_replaces_a_drawn_one(make_napari_viewer, qtbot,
                                                                                  tmp_path, images):
    from napari_fedmix.annotate_widget import MASK_LAYER
    from napari_fedmix.predict_widget import PRED_LAYER, PredictWidget

    viewer, annotate = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    widget = PredictWidget(viewer)
    qtbot.addWidget(widget)
    assert not widget.use_as_mask() and "predict the image first" in widget.status.text()
    widget.threshold.setValue(1)  # an untrained model: call (nearly) everything foreground
    two_classes = ModelConfig(base_width=4, num_classes=2)  # another site's model: lesion and cyst
    widget.checkpoint.setText(str(save_checkpoint(tmp_path / "m2.safetensors", init_pair(two_classes, 0),
                                                  two_classes, {"image_size": 32})))
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: widget._probability is not None, timeout=60_000)
    assert np.array(viewer.layers[PRED_LAYER].data).max() == 2
    assert not widget.use_as_mask()
    assert "the model predicts 2 class(es), the site has 1 (lesion)" in widget.status.text()
    assert not viewer.layers[MASK_LAYER].data.any()

    widget.checkpoint.setText(str(_tiny_checkpoint(tmp_path)))
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: len(widget._probability) == 1, timeout=60_000)
    predicted = np.array(viewer.layers[PRED_LAYER].data)
    assert predicted.any()

    assert widget.use_as_mask(), widget.status.text()
    np.testing.assert_array_equal(viewer.layers[MASK_LAYER].data, predicted)
    assert annotate.save() == []
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_mask("scan-0"), predicted)  # saved like a drawn mask

    assert not widget.use_as_mask() and "already holds labels" in widget.status.text()
    annotate.next_image()  # scan-1, empty mask: the prediction is of scan-0
    assert not widget.use_as_mask() and "shows another image" in widget.status.text()
    assert not viewer.layers[MASK_LAYER].data.any()


def test_local_training_can_continue_its_last_run(make_napari_viewer, qtbot, sample):
    from napari_fedmix.train_widget import TrainWidget

    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    train.continue_local.setChecked(True)
    _start_local(train, sample, rounds=1)  # nothing to continue yet
    assert train.worker is None and "no earlier local run to continue" in train.status.text()
    train.continue_local.setChecked(False)
    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    metrics = sample / "models" / "local" / "metrics.jsonl"
    first = metrics.read_text().splitlines()
    assert len(first) == 1, train.status.text()
    train.continue_local.setChecked(True)
    _start_local(train, sample, rounds=2)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    lines = metrics.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == first[0], "round 1 kept, rounds 2 and 3 added"
    assert train.round_bar.maximum() == 3 and train.round_bar.value() == 3 and "error" not in train.status.text()


def test_a_site_with_nothing_labelled_is_told_so_and_its_federated_round_shows_no_loss(make_napari_viewer, qtbot,
                                                                                       tmp_path):
    """A site whose images are not labelled yet trains on nothing. Training it alone ran its rounds and saved
    the random initial model: refused now, saying why. In a federation it may take part: its round said
    'loss 0.000' and the plot drew a loss of 0, a perfect fit; it shows no loss."""
    from federation_helpers import TINY_SETTINGS, make_tokens, running_server
    from fedmix_engine.data.site_store import SiteStore
    from napari_fedmix.train_widget import TrainWidget

    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        store.add_image(np.zeros((32, 32), np.uint8), "unlabelled")
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    _start_local(train, tmp_path / "site", rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    assert train.status.text().startswith(f"error: {tmp_path / 'site'}: no image has a mask, a box or a tag"), \
        train.status.text()
    assert not (tmp_path / "site" / "models" / "local").exists()

    token = make_tokens(tmp_path / "state", ["site"])["site"]
    with running_server(tmp_path / "state", ["--sites", "1", "--min-sites", "1", "--rounds", "1",
                                             *TINY_SETTINGS]) as server:
        _set_to_join(train, tmp_path / "site", server.url, token)
        train.start()
        qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    assert "federation finished after 1 rounds" in train.status.text(), train.status.text()
    assert train.history["loss"] == [] and train.history["samples used (hundreds)"] == [(1, 0.0)]
    assert train.history["weight"] == [(1, 0.0)]


def test_closing_the_train_panel_stops_its_training(make_napari_viewer, qtbot, sample):
    """napari's ✕ on the panel took it away and left its worker training, unseen and with no Stop button:
    a join went on holding the site's lock, so the panel opened again could not join ('another join of
    this site is running')."""
    viewer = make_napari_viewer()
    dock, train = viewer.window.add_plugin_dock_widget("napari-fedmix", "Train & federate")
    _start_local(train, sample, rounds=500)
    qtbot.waitUntil(lambda: train.round_bar.value() >= 1, timeout=60_000)
    worker = train.worker
    dock.destroyOnClose()  # what the ✕ does
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert train.round_bar.value() < 500


def test_stop_interrupts_within_one_batch_and_the_event_loop_stays_responsive(make_napari_viewer, qtbot, sample):
    from napari_fedmix.train_widget import TrainWidget

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget)
    batches: list[int] = []
    with EventLoopWatch() as loop:
        _start_local(widget, sample, rounds=200)
        widget.worker.yielded.connect(lambda e: batches.append(1) if getattr(e, "stage", "") == "train" else None)
        qtbot.waitUntil(lambda: len(batches) >= 12, timeout=120_000)
        at_stop = len(batches)
        widget.stop()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert len(batches) - at_stop <= 1, "Stop must take effect after the current batch"
    assert "\nstopped; model: " in widget.status.text()
    assert widget.start_button.isEnabled()
    pause = loop.longest_pause()
    assert pause < 0.2, f"event loop blocked for {pause * 1000:.0f} ms"


def test_start_right_after_stop_continues_the_local_run(make_napari_viewer, qtbot, sample):
    """Stop made the worker quit, which left the run suspended at its last event, holding its folder's lock
    until garbage collection: continuing it at once was refused as 'another run is writing to this folder'."""
    from fedmix_engine.run_snapshot import snapshot_round
    from napari_fedmix.train_widget import LOCAL_RUN, TrainWidget

    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    _start_local(train, sample, rounds=50)
    qtbot.waitUntil(lambda: train.round_bar.value() >= 1, timeout=120_000)
    train.stop()
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    assert "\nstopped; model: " in train.status.text()
    done = snapshot_round(sample / LOCAL_RUN)
    assert done is not None and done < 50
    train.continue_local.setChecked(True)
    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    assert "error" not in train.status.text() and "\nfinished; model: " in train.status.text(), train.status.text()
    assert train.round_bar.value() == done + 1 == snapshot_round(sample / LOCAL_RUN)


def test_stop_ends_a_federation_that_waits_for_other_sites_at_once_and_frees_the_site(make_napari_viewer, qtbot,
                                                                                     sample, tmp_path):
    """Stop asks the worker to quit, which a generator sees only when it next yields; waiting for the other
    sites (minutes, or until a deadline hours away) yielded nothing, so Stop, and closing napari, which
    waits for its workers, did nothing until the round closed. The site's join lock must go with it."""
    from filelock import FileLock

    from federation_helpers import TINY_SETTINGS, make_tokens, running_server
    from fedmix_engine.federation.client import JOIN_LOCK
    from napari_fedmix.train_widget import TrainWidget

    state = tmp_path / "state"
    token = make_tokens(state, ["site-a", "site-b"])["site-a"]
    train = TrainWidget(make_napari_viewer())
    qtbot.addWidget(train)
    with running_server(state, ["--sites", "2", "--min-sites", "2", "--rounds", "2", *TINY_SETTINGS]) as server:
        _set_to_join(train, sample, server.url, token)
        clients = _clients_made(train)
        train.start()
        qtbot.waitUntil(lambda: "waiting for the other sites" in train.status.text(), timeout=120_000)
        time.sleep(2)  # well into the wait
        stopped_at = time.monotonic()
        train.stop()
        qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
        took = time.monotonic() - stopped_at
        assert server.status()["uploaded"] == ["site-a"]
        assert len(clients) == 1 and clients[0].http.is_closed, "its connections are not left to the GC"
    assert took < 5, f"Stop took {took:.1f} s while waiting for the other sites"
    assert "\nstopped; model: " in train.status.text()
    with FileLock(sample / "models" / JOIN_LOCK).acquire(timeout=0):
        pass  # the site is free for the next join

    train.start()  # the server is gone: the client retries with a growing back-off (up to an hour)
    qtbot.waitUntil(lambda: "the server does not answer (ConnectError" in train.status.text(), timeout=10_000)
    qtbot.wait(8000)  # past the 0.5, 1, 2 and 4 s retries: into an 8 s pause
    assert re.search(r"\); trying again in 8 s \(for [78] s; gives up after 60 min\)$", train.status.text()), \
        train.status.text()
    stopped_at = time.monotonic()
    train.stop()
    qtbot.waitUntil(lambda: train.worker is None, timeout=60_000)
    took = time.monotonic() - stopped_at
    assert took < 2, f"Stop took {took:.1f} s while the server was unreachable"


def test_batch_predict_writes_masks_and_csv_and_lists_the_corrupt_file(make_napari_viewer, qtbot, tmp_path, images):
    from napari_fedmix.predict_widget import BatchPredictWidget

    (images[0].parent / "broken.tif").write_bytes(b"II*\x00 not really")
    checkpoint = _tiny_checkpoint(tmp_path)
    viewer = make_napari_viewer()
    widget = BatchPredictWidget(viewer)
    qtbot.addWidget(widget)
    widget.input.setText(str(images[0].parent))
    widget.checkpoint.setText(str(checkpoint))
    widget.output.setText(str(tmp_path / "out"))
    widget.open_results.setChecked(True)
    (tmp_path / "out").mkdir()
    tifffile.imwrite(tmp_path / "out" / "earlier_mask.tif", np.zeros((10, 10), np.uint8))  # not this run's
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)  # finished (a signal could be missed)
    assert len(list((tmp_path / "out").glob("scan-*_mask.tif"))) == 3
    csv_text = (tmp_path / "out" / "summary.csv").read_text()
    assert "broken.tif" in csv_text and "unreadable or corrupt" in csv_text
    assert widget.skipped.count() >= 1 and "broken.tif" in widget.skipped.item(0).text()
    assert "FedMix batch masks" in viewer.layers and viewer.layers["FedMix batch masks"].data.shape == (3, 40, 48)


def test_predict_takes_the_model_written_again_at_the_same_path(make_napari_viewer, qtbot, tmp_path, images,
                                                                monkeypatch):
    """Predict kept the model it loaded first for as long as the field named the same file. Each round of a
    federation writes SITE/models/global.safetensors again, and training again rewrites models/local: the
    clinician's next prediction silently came from the old weights. It loads them in its worker, not on
    napari's GUI thread (a reference-width pair is 140 MB)."""
    import threading

    from model_helpers import constant_checkpoint
    from napari_fedmix.predict_widget import PROB_LAYER

    loaded_in = _threads_loading_models(monkeypatch)
    viewer = make_napari_viewer()
    viewer.add_image(tifffile.imread(images[0]), name="scan")
    model = tmp_path / "models" / "global.safetensors"
    constant_checkpoint(model, 1.0, 32, ("lesion",))  # probability 0.73 everywhere
    predict = _predict_widget(viewer, qtbot, model)

    def probability() -> float:
        assert predict.predict_active() is not None
        qtbot.waitUntil(lambda: predict._probability is not None, timeout=60_000)
        value = float(np.median(viewer.layers[PROB_LAYER].data))
        predict._probability = None
        return value

    assert probability() == pytest.approx(0.731, abs=1e-3)
    first = predict.predictor()
    assert predict.predictor() is first, "loaded once while the file stays the same"
    constant_checkpoint(model, -1.0, 32, ("lesion",))  # the next round's model, written over it (0.27 everywhere)
    assert probability() == pytest.approx(0.269, abs=1e-3)
    assert len(loaded_in) == 2 and threading.main_thread() not in loaded_in, loaded_in


def test_predict_shows_its_threshold_and_batch_predict_uses_the_one_chosen(make_napari_viewer, qtbot, tmp_path,
                                                                          images):
    """Predict's slider did not say which threshold it stood at, and Batch predict always cut at 0.5 (the CLI's
    --threshold had no napari twin): a clinician who found 0.8 right on one image could not use it on the folder."""
    import csv
    import json

    from model_helpers import constant_checkpoint
    from napari_fedmix.predict_widget import PRED_LAYER, BatchPredictWidget

    model = constant_checkpoint(tmp_path / "p073.safetensors", 1.0, 32, ("lesion",))  # probability 0.73 everywhere
    viewer = make_napari_viewer()
    viewer.add_image(tifffile.imread(images[0]), name="scan")
    predict = _predict_widget(viewer, qtbot, model)
    assert predict.threshold_value.text() == "0.50"
    assert predict.predict_active() is not None
    qtbot.waitUntil(lambda: predict._probability is not None, timeout=60_000)
    assert viewer.layers[PRED_LAYER].data.all()
    predict.threshold.setValue(80)
    assert predict.threshold_value.text() == "0.80" and not viewer.layers[PRED_LAYER].data.any()

    batch = BatchPredictWidget(viewer)
    qtbot.addWidget(batch)
    batch.input.setText(str(images[0].parent))
    batch.checkpoint.setText(str(model))
    for threshold, foreground in ((0.8, 0.0), (0.5, 1.0)):
        out = tmp_path / f"out-{threshold}"
        batch.output.setText(str(out))
        batch.threshold.setValue(threshold)
        assert batch.run() is not None
        qtbot.waitUntil(lambda: batch.worker is None, timeout=60_000)
        assert json.loads((out / "prediction.json").read_text())["threshold"] == threshold
        with open(out / "summary.csv", newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["file"].startswith("scan-")]
        assert len(rows) == 3 and {float(row["foreground_fraction"]) for row in rows} == {foreground}, rows
        # masks of whole images (no lesion is one): said, as the command line says it
        assert ("Note: 3 of 3 mask(s) cover 99% or more of their image" in batch.status.text()) is (foreground == 1)


def test_batch_predict_cancel_and_errors_are_reported_not_overwritten(make_napari_viewer, qtbot, tmp_path, images,
                                                                     monkeypatch):
    import csv

    from fedmix_engine.predict import NOT_RUN, Predictor
    from napari_fedmix.predict_widget import BatchPredictWidget

    checkpoint = save_checkpoint(tmp_path / "model" / "m.safetensors", init_pair(ModelConfig(base_width=4), 0),
                                 ModelConfig(base_width=4), {"image_size": 32})
    widget = BatchPredictWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.checkpoint.setText(str(checkpoint))

    # a missing input folder is refused before anything starts
    widget.input.setText(str(tmp_path / "no-such-folder"))
    widget.output.setText(str(tmp_path / "out"))
    assert widget.run() is None and "no-such-folder" in widget.status.text()

    # an output folder that cannot be made (a file is in the way) is refused before anything starts
    (tmp_path / "model" / "a-file").write_text("")
    widget.input.setText(str(images[0].parent))
    widget.output.setText(str(tmp_path / "model" / "a-file" / "out"))
    assert widget.run() is None and "error: " in widget.status.text()
    assert "a-file: is a file where a folder" in widget.status.text()

    # an error inside the run stays on screen (not replaced by the finished line)
    real_mask = Predictor.mask

    def disk_full(self, image, threshold=0.5, where="image"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Predictor, "mask", disk_full)
    widget.output.setText(str(tmp_path / "out"))
    with qtbot.capture_exceptions() as relayed:  # napari also relays a worker's error to its notifications
        assert widget.run() is not None
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)  # the run has finished
    assert widget.status.text() == "error: OSError: [Errno 28] No space left on device"
    assert [type(e[1]) for e in relayed] == [OSError] and isinstance(widget.error, OSError)
    assert widget.run_button.isEnabled()

    # Cancel while the first image is predicted (from the worker's thread, so it cannot arrive late)

    def mask_then_cancel(self, image, threshold=0.5, where="image"):
        widget.stop_requested.set()  # what Cancel does, minus the label text (widgets belong to the GUI thread)
        return real_mask(self, image, threshold, where)

    monkeypatch.setattr(Predictor, "mask", mask_then_cancel)
    widget.output.setText(str(tmp_path / "out"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith("stopped after 1 of 3 files; 1 mask(s) written")
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        statuses = [row["status"] for row in csv.DictReader(handle)]
    assert statuses == ["ok", NOT_RUN, NOT_RUN]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.tif")) == ["scan-0_mask.tif"]


def test_batch_predict_loads_the_model_and_lists_the_files_off_the_gui_thread(make_napari_viewer, qtbot, tmp_path,
                                                                             images, monkeypatch):
    """Batch predict loaded the model and listed the folder (a header read per suffix-less file) on napari's GUI
    thread: on a network share a PACS export's listing froze the window before the first image was predicted."""
    import threading

    from fedmix_engine import predict

    widget = _batch_widget(make_napari_viewer(), qtbot, images[0].parent, tmp_path / "out")
    loaded_in = _threads_loading_models(monkeypatch)
    listed_in: list[threading.Thread] = []
    listing = predict.batch_files

    def listing_files(*args, **kwargs):
        listed_in.append(threading.current_thread())
        return listing(*args, **kwargs)

    monkeypatch.setattr(predict, "batch_files", listing_files)
    assert widget.run() is not None
    assert widget.status.text() == "loading the model and listing the files…" and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert loaded_in and listed_in, "the model was loaded and the files listed"
    assert threading.main_thread() not in loaded_in + listed_in, (loaded_in, listed_in)
    assert widget.status.text().startswith(f"3 mask(s) written to {tmp_path / 'out'}"), widget.status.text()
    assert widget.progress.maximum() == widget.progress.value() == widget.total == 4  # and the model file there

    # a corrupt model is refused in the worker: said in the status line, no output folder made, Run usable again
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((8).to_bytes(8, "little") + b"{not js}")
    widget.checkpoint.setText(str(broken))
    widget.output.setText(str(tmp_path / "out-2"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(f"error: {broken}: "), widget.status.text()
    assert not (tmp_path / "out-2").exists()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled() and not widget.started


def test_batch_predict_ends_off_the_gui_thread_and_a_cancel_while_the_model_loads_writes_nothing(
        make_napari_viewer, qtbot, tmp_path, images, monkeypatch):
    """A batch's end ran on napari's GUI thread: the summary.csv of every file, the walk of the output folder
    for an earlier batch's masks and, with 'open the masks', the reading of every mask: seconds on a share,
    the window frozen. And a Cancel while the model loaded still made the output folder, with a summary
    of files "not run"."""
    import threading

    import tifffile as tiff

    from fedmix_engine import predict

    widget = _batch_widget(make_napari_viewer(), qtbot, images[0].parent, tmp_path / "out")
    widget.open_results.setChecked(True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old_mask.tif").write_bytes(b"")  # an earlier batch's mask, for an image not in this one
    (tmp_path / "out" / predict.RECORD_FILE).write_text("{}")
    threads: dict[str, set[threading.Thread]] = {"summary": set(), "walk": set(), "read": set()}

    def recorded(name, function):
        return lambda *args, **kwargs: threads[name].add(threading.current_thread()) or function(*args, **kwargs)

    monkeypatch.setattr(predict, "_write_summary", recorded("summary", predict._write_summary))
    monkeypatch.setattr(predict, "earlier_masks", recorded("walk", predict.earlier_masks))
    monkeypatch.setattr(tiff, "imread", recorded("read", tiff.imread))
    shown: list[str] = []
    monkeypatch.setattr(widget.status, "setText", lambda text: shown.append(text))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert shown[-1].startswith(f"3 mask(s) written to {tmp_path / 'out'} (summary.csv); 0 skipped; 1 other file(s) "
                                "not images. Note: 1 mask file(s) in the output folder are not this batch's "
                                "(old_mask.tif)"), shown[-1]  # the other file: the model, beside the images
    layer = widget.viewer.layers["FedMix batch masks"]
    assert layer.data.shape == (3, 40, 48)
    assert all(threads.values()), threads
    assert threading.main_thread() not in set.union(*threads.values()), threads
    assert np.array_equal(layer.data[2], tiff.imread(tmp_path / "out" / "scan-2_mask.tif"))

    # Cancel while the model loads: no output folder made, and said so
    from fedmix_engine.predict import Predictor

    load = Predictor.from_checkpoint.__func__

    def load_then_cancel(cls, *args, **kwargs):
        widget.stop_requested.set()  # what Cancel does, from the worker: it cannot arrive late
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(load_then_cancel))
    widget.output.setText(str(tmp_path / "out-2"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert shown[-1] == "stopped before the first file: nothing written", shown[-1]
    assert not (tmp_path / "out-2").exists()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    # Cancel after the first file: the worker writes the summary of the files not run, not the GUI thread
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(load))
    real_mask = Predictor.mask

    def mask_then_cancel(self, image, threshold=0.5, where="image"):
        widget.stop_requested.set()
        return real_mask(self, image, threshold, where)

    monkeypatch.setattr(Predictor, "mask", mask_then_cancel)
    threads["summary"].clear()
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert shown[-1].startswith("stopped after 2 of 4 files; 1 mask(s) written"), shown[-1]  # the model, a scan
    assert threads["summary"] and threading.main_thread() not in threads["summary"], threads
    assert (tmp_path / "out-2" / predict.SUMMARY_FILE).read_text().count(predict.NOT_RUN) == 2


def _batch_widget(viewer, qtbot, folder: Path, out: Path):
    """The Batch predict widget filled in: ``folder`` into ``out`` with a tiny untrained model."""
    from napari_fedmix.predict_widget import BatchPredictWidget

    checkpoint = _tiny_checkpoint(out.parent)
    widget = BatchPredictWidget(viewer)
    qtbot.addWidget(widget)
    widget.input.setText(str(folder))
    widget.checkpoint.setText(str(checkpoint))
    widget.output.setText(str(out))
    return widget


def test_batch_predict_shows_a_stacks_frames_and_cancel_stops_within_it(make_napari_viewer, qtbot, tmp_path,
                                                                        monkeypatch):
    """A long cine loop was one silent step: no progress until its last frame, and Cancel waited for it."""
    import csv

    import tifffile

    from fedmix_engine.predict import NOT_RUN, Predictor

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "a-loop.tif", rng.integers(0, 255, (8, 40, 48), dtype=np.uint8))
    tifffile.imwrite(folder / "b-scan.tif", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    widget = _batch_widget(make_napari_viewer(), qtbot, folder, tmp_path / "out")
    shown: list[str] = []
    monkeypatch.setattr(widget.status, "setText", lambda text: shown.append(text))
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(
        lambda cls, path, device="auto": Predictor(init_pair(ModelConfig(base_width=4), 0), ModelConfig(base_width=4),
                                                   32, batch_size=2)))  # 8 frames: 4 batches
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    frames = [t for t in shown if "frame" in t]
    assert frames == [f"1/2: a-loop.tif, frame {k} of 8" for k in (2, 4, 6, 8)], shown
    assert shown[-1].startswith(f"2 mask(s) written to {tmp_path / 'out'} (summary.csv); 0 skipped. Note: 2 of 2 "
                                "mask(s) cover 99% or more of their image (a-loop.tif, b-scan.tif)"), shown[-1]

    calls: list[int] = []
    real_logits = Predictor.logits

    def logits_then_cancel(self, batch, network=None):
        calls.append(len(batch))
        widget.stop_requested.set()  # Cancel during the loop's first batch (from the worker: it cannot arrive late)
        return real_logits(self, batch, network)

    monkeypatch.setattr(Predictor, "logits", logits_then_cancel)
    widget.output.setText(str(tmp_path / "out2"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert calls == [2], "stopped after the batch of frames it was predicting, not after the whole loop"
    assert shown[-1].startswith("stopped after 0 of 2 files; 0 mask(s) written")
    with open(tmp_path / "out2" / "summary.csv", newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == [NOT_RUN, NOT_RUN]
    assert not list((tmp_path / "out2").glob("*_mask.tif"))


def test_batch_predict_notes_photos_that_photo_viewers_show_turned(make_napari_viewer, qtbot, tmp_path):
    """As the command line notes them: a photo viewer turns a photo by its EXIF orientation, not its mask."""
    from PIL import Image

    from model_helpers import no_lesion_checkpoint

    folder = tmp_path / "in"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)).save(folder / "side.jpg",
                                                                                                exif=exif)
    tifffile.imwrite(folder / "scan.tif", np.zeros((40, 48), np.uint8))
    widget = _batch_widget(make_napari_viewer(), qtbot, folder, tmp_path / "out")
    widget.checkpoint.setText(str(no_lesion_checkpoint(tmp_path / "none.safetensors")))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text() == (
        f"2 mask(s) written to {tmp_path / 'out'} (summary.csv); 0 skipped. Note: 1 of 2 image(s) are photos with an "
        "EXIF orientation (side.jpg): their masks fit the pixels as stored, as napari shows them, but photo viewers "
        "show these photos turned or mirrored, where a mask laid over them will not fit (summary.csv's "
        "exif_orientation column names them all)")


def test_a_stack_whose_overlays_would_not_fit_in_free_memory_is_refused_before_predicting(make_napari_viewer, qtbot,
                                                                                           tmp_path, monkeypatch):
    """A long video's probability overlays (float32 per class and frame) can outgrow the memory left;
    the system would then kill napari with any unsaved labels. Refused first, pointing to batch predict."""
    from collections import namedtuple

    import psutil

    from napari_fedmix.predict_widget import PRED_LAYER

    viewer = make_napari_viewer()
    loop = viewer.add_image(np.random.default_rng(0).integers(0, 255, (50, 40, 48), dtype=np.uint8), name="loop")
    checkpoint = _tiny_checkpoint(tmp_path)
    widget = _predict_widget(viewer, qtbot, checkpoint)
    viewer.layers.selection.active = loop
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(500_000))  # 50×40×48 px × 9 B = 864 kB needed
    assert widget.predict_active() is None
    assert widget.status.text() == ("error: layer 'loop': its prediction overlays would take 843.8 KiB and 488.3 KiB "
                                    "are free: predict it with Batch predict (Layers › Segment › FedMix), which writes "
                                    "its masks frame by frame, or open a shorter clip")
    assert PRED_LAYER not in viewer.layers
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(2_000_000))
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: PRED_LAYER in viewer.layers, timeout=60_000)
    assert viewer.layers[PRED_LAYER].data.shape == (50, 40, 48)


def test_napari_opens_dicom_through_the_plugin_and_predicts_it_at_its_pixel_spacing(make_napari_viewer, qtbot,
                                                                                    tmp_path):
    """napari has no DICOM reader of its own: File › Open of a .dcm failed before the plugin gave one.
    A cine loop opens as a stack and is predicted frame by frame."""
    import warnings

    from pydicom.data import get_testdata_file

    from fedmix_engine.data.imageio import read_image
    from napari_fedmix.predict_widget import PRED_LAYER

    viewer = make_napari_viewer()
    mr = get_testdata_file("MR_small.dcm")  # windowed MR slice, 0.3125 mm pixels
    [layer] = viewer.open(mr, plugin="napari-fedmix")
    assert layer.name == "MR_small" and not layer.rgb
    np.testing.assert_array_equal(layer.data, read_image(mr))
    np.testing.assert_allclose(layer.scale, (0.3125, 0.3125))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the palette file's own VR oddity
        [colour] = viewer.open(get_testdata_file("examples_palette.dcm"), plugin="napari-fedmix")
    assert colour.rgb and colour.data.shape == (350, 800, 3)
    [loop] = viewer.open(get_testdata_file("examples_ybr_color.dcm"), plugin="napari-fedmix")
    assert loop.rgb and loop.data.shape == (30, 240, 320, 3), "a 30-frame ultrasound cine loop, as a stack"
    with pytest.raises(Exception, match="a DICOM segmentation"):  # napari wraps the reader's InputError
        viewer.open(get_testdata_file("liver_1frame.dcm"), plugin="napari-fedmix")

    checkpoint = _tiny_checkpoint(tmp_path)
    widget = _predict_widget(viewer, qtbot, checkpoint)
    viewer.layers.selection.active = layer
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: PRED_LAYER in viewer.layers, timeout=60_000)
    assert viewer.layers[PRED_LAYER].data.shape == (64, 64)
    np.testing.assert_allclose(viewer.layers[PRED_LAYER].scale, (0.3125, 0.3125))
    # the lesion's size in mm², from the reader's pixel spacing, at whatever threshold the slider is on
    for threshold in (1, 99):
        widget.threshold.setValue(threshold)
        area = int((viewer.layers[PRED_LAYER].data > 0).sum()) * 0.3125 ** 2
        assert f"of the image ({area:.1f} mm²); model:" in widget.status.text(), widget.status.text()
    viewer.layers.selection.active = loop
    assert widget.predict_active() is not None
    qtbot.waitUntil(lambda: viewer.layers[PRED_LAYER].data.shape == (30, 240, 320), timeout=60_000)


def test_annotate_adds_the_frame_on_screen_of_a_loop_opened_in_napari(make_napari_viewer, qtbot, tmp_path,
                                                                      monkeypatch):
    """A cine loop opened in napari could be predicted but not labelled: only files could enter a site.
    The shown frame (where the slider is) is added, named after the layer and frame, and shown for
    labelling; a 2-D layer is added whole; the site's own image layer and a repeat are refused; a frame of
    pixels the site holds under another name is said."""
    import napari.utils.notifications

    from napari_fedmix.annotate_widget import IMAGE_LAYER

    said: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)

    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", [])
    rng = np.random.default_rng(4)
    loop = rng.integers(0, 255, (6, 40, 48), dtype=np.uint8)
    path = tmp_path / "loop.tif"
    tifffile.imwrite(path, loop)
    [layer] = viewer.open(path)
    assert viewer.layers.selection.active is layer and layer.data.shape == (6, 40, 48)
    viewer.dims.set_current_step(0, 4)
    assert widget.add_shown_image() == "loop-frame4" and said == []
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_image("loop-frame4"), loop[4])
        [record] = store.records()
        assert record.source == f"napari layer 'loop' ({path}), frame 4"
        assert store.spacing("loop-frame4") is None  # the layer is in pixels
    assert widget.current_id == "loop-frame4" and viewer.layers[IMAGE_LAYER].data.shape == (40, 48)
    # a layer calibrated in a length (a reader's µm here; the plugin's DICOM reader gives mm) keeps it, in mm
    calibrated = viewer.add_image(loop, name="scan", scale=(1, 300, 250), units=("pixel", "um", "um"))
    viewer.layers.selection.active = calibrated
    assert widget.add_shown_image() == "scan-frame4"  # the slider is still on frame 4
    assert said == ["'scan-frame4' has the same pixels as 'loop-frame4' of the site: both train, and annotations "
                    "that disagree contradict each other (Remove image… takes one out)"]
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert store.spacing("scan-frame4") == pytest.approx((0.3, 0.25))

    colour = viewer.add_image(rng.integers(0, 255, (30, 36, 3), dtype=np.uint8), name="photo", rgb=True)
    viewer.layers.selection.active = colour
    assert widget.add_shown_image() == "photo"
    assert viewer.layers.selection.active is not colour, "the added image is shown for labelling"
    viewer.layers.selection.active = colour
    with pytest.raises(InputError, match="duplicate image id 'photo'"):
        widget.add_shown_image()
    viewer.layers.selection.active = viewer.layers[IMAGE_LAYER]
    with pytest.raises(InputError, match="already this site's image"):
        widget.add_shown_image()
    from napari_fedmix.predict_widget import PROB_LAYER

    viewer.add_image(np.zeros((40, 48), np.float32), name=PROB_LAYER)
    with pytest.raises(InputError, match="a prediction overlay, not an image"):
        widget.add_shown_image()
    viewer.add_image([np.zeros((64, 96), np.uint8), np.zeros((32, 48), np.uint8)], name="slide", multiscale=True)
    with pytest.raises(InputError, match="layer 'slide': a multiscale"):
        widget.add_shown_image()


def test_batch_masks_that_would_not_fit_in_free_memory_stay_on_disk(make_napari_viewer, qtbot, tmp_path,
                                                                   monkeypatch):
    """'Open the masks when done' loaded every mask, a long video's too, whatever the memory left."""
    from collections import namedtuple

    import psutil

    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "loop.tif", np.random.default_rng(0).integers(0, 255, (20, 40, 48), dtype=np.uint8))
    viewer = make_napari_viewer()
    widget = _batch_widget(viewer, qtbot, folder, tmp_path / "out")
    widget.open_results.setChecked(True)
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(50_000))  # the mask: 20×40×48 B, twice
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(
        f"1 mask(s) written to {tmp_path / 'out'} (summary.csv); 0 skipped; masks not opened: opening this run's "
        "masks would take 75.0 KiB and 48.8 KiB are free: open them from the output folder a few at a time. Note: 1 "
        "of 1 mask(s) cover 99% or more"), widget.status.text()  # an untrained pair: the note comes last
    assert "FedMix batch masks" not in viewer.layers and (tmp_path / "out" / "loop_mask.tif").is_file()


def test_a_video_opens_frame_by_frame_its_shown_frame_enters_the_site_and_predict_reads_it_in_batches(
        make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """An MP4 cine loop or endoscopy clip: napari's own reader decoded the whole recording into memory
    first (a 5-minute 1080p one: 54 GB). The plugin's reader decodes a frame when it is shown or read:
    opening and adding the frame on screen decode a few frames, not the video; Predict reads it in
    batches and gives what the same frames decoded at once give."""
    from fedmix_engine.data.video_frames import VideoFrames
    from fedmix_engine.predict import Predictor
    from fedmix_engine.steps import run_steps
    from napari_fedmix.predict_widget import PROB_LAYER
    from video_helpers import write_clip

    decoded_frames: list[int] = []
    real_frame = VideoFrames._frame
    monkeypatch.setattr(VideoFrames, "_frame", lambda self, i: decoded_frames.append(i) or real_frame(self, i))
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", [])
    decoded = write_clip(tmp_path / "clip.mp4", frames=60)
    [layer] = viewer.open(tmp_path / "clip.mp4", plugin="napari-fedmix")
    assert layer.rgb and layer.data.shape == (60, 40, 48, 3) and not isinstance(layer.data, np.ndarray)
    viewer.dims.set_current_step(0, 37)
    assert widget.add_shown_image() == "clip-frame37"
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        np.testing.assert_array_equal(store.read_image("clip-frame37"), decoded[37])
    assert 37 in decoded_frames and len(set(decoded_frames)) <= 6, sorted(set(decoded_frames))

    checkpoint = _tiny_checkpoint(tmp_path)
    predict = _predict_widget(viewer, qtbot, checkpoint)
    viewer.layers.selection.active = layer
    assert predict.predict_active() is not None
    qtbot.waitUntil(lambda: PROB_LAYER in viewer.layers and viewer.layers[PROB_LAYER].data.shape == (60, 40, 48),
                    timeout=60_000)
    expected = run_steps(Predictor.from_checkpoint(checkpoint, "cpu").iter_stack_probabilities(decoded, True))
    np.testing.assert_allclose(viewer.layers[PROB_LAYER].data, expected.max(axis=0), atol=1e-5)


def test_batch_predict_widget_writes_dicom_seg_when_asked_and_lists_a_loop_without_one(make_napari_viewer, qtbot,
                                                                                       tmp_path):
    import shutil
    import warnings

    from pydicom.data import get_testdata_file

    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), folder / "cine.dcm")
    widget = _batch_widget(make_napari_viewer(), qtbot, folder, tmp_path / "out")
    widget.dicom_seg.setChecked(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert widget.run() is not None
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert (tmp_path / "out" / "mr_seg.dcm").is_file() and (tmp_path / "out" / "cine_mask.tif").is_file()
    assert [widget.skipped.item(i).text() for i in range(widget.skipped.count())] == [
        "cine.dcm: mask written, DICOM SEG not written: no DICOM SEG for a 30-frame image without a frame of "
        "reference (a cine loop): highdicom cannot place its frames; the TIFF mask has them"]


def test_napari_opens_a_dicom_study_folder_as_one_volume_per_series(make_napari_viewer, tmp_path):
    """File › Open Folder of a CT series gave nothing napari could read; the plugin stacks its slices
    in patient order, scaled in mm, and a file on its own becomes its own layer."""
    from pydicom.uid import generate_uid

    from dicom_helpers import write_dicom, write_slice

    study = tmp_path / "study"
    study.mkdir()
    series = generate_uid()
    for name, k in (("b", 2), ("c", 0), ("a", 1)):
        write_slice(study / name, 100 + k, 10.0 + 3 * k, instance=k, series=series, SeriesDescription="MR t2")
    write_dicom(study / "us.dcm", np.zeros((24, 32), np.uint8))
    import shutil

    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("rtstruct.dcm"), study / "RS0001.dcm")  # beside the images in a study export
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match=r"1 file\(s\) not opened: .*RS0001\.dcm: not an image \(RTSTRUCT\)"):
        layers = {layer.name: layer for layer in viewer.open(study, plugin="napari-fedmix")}
    assert set(layers) == {"MR t2", "us"}
    assert layers["MR t2"].data.shape == (3, 16, 20) and list(layers["MR t2"].data[:, 0, 0]) == [100, 101, 102]
    np.testing.assert_allclose(layers["MR t2"].scale, (3.0, 0.7, 0.8))
    assert layers["us"].data.shape == (24, 32)


def test_batch_predict_takes_one_video_picked_with_its_file_button(make_napari_viewer, qtbot, tmp_path,
                                                                   monkeypatch):
    """The images field had a folder chooser only, so one recording (a single video) could be predicted
    from the command line but not picked in napari."""
    from qtpy.QtWidgets import QFileDialog, QPushButton

    from napari_fedmix.predict_widget import predictable_files_filter
    from video_helpers import write_clip

    folder = tmp_path / "recordings"
    folder.mkdir()
    write_clip(folder / "colonoscopy.mp4", frames=6)
    tifffile.imwrite(folder / "other.tif", np.zeros((40, 48), np.uint8))  # beside it, not asked for
    widget = _batch_widget(make_napari_viewer(), qtbot, tmp_path / "unset", tmp_path / "out")
    asked: list[str] = []

    def pick(parent, title, filter):  # a modal dialog: answered as a clinician picking the video would
        asked.append(filter)
        return str(folder / "colonoscopy.mp4"), filter

    monkeypatch.setattr(QFileDialog, "getOpenFileName", pick)
    [button] = [button for button in widget.findChildren(QPushButton)
                if button.objectName() == "file…" and button.toolTip().startswith("Images")]
    button.click()
    assert widget.input.text() == str(folder / "colonoscopy.mp4")
    assert asked == [predictable_files_filter()] and "*.mp4" in asked[0] and "All files (*)" in asked[0]
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(f"1 mask(s) written to {tmp_path / 'out'} (summary.csv); 0 skipped. "
                                           "Note: 1 of 1 mask(s) cover 99% or more"), widget.status.text()  # untrained
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["colonoscopy_mask.tif", "prediction.json",
                                                                   "summary.csv"]
    assert tifffile.imread(tmp_path / "out" / "colonoscopy_mask.tif").shape == (6, 40, 48)


def test_batch_predict_includes_sub_folders_when_asked_and_continues_a_batch(make_napari_viewer, qtbot, tmp_path,
                                                                           monkeypatch):
    """A PACS export's images sit in patient and series folders: the widget refused the export's top folder
    ('no image files'); 'include sub-folders' predicts them all, each mask in its folder's copy."""
    export = tmp_path / "export"
    for series in ("p01/s1", "p02/s1"):
        (export / series).mkdir(parents=True)
        tifffile.imwrite(export / series / "us.tif", np.zeros((40, 48), np.uint8))
    (export / "p01" / "DICOMDIR").write_bytes(b"")  # a PACS export's index: no image, and no failure
    viewer = make_napari_viewer()
    widget = _batch_widget(viewer, qtbot, export, tmp_path / "out")
    widget.open_results.setChecked(True)
    assert widget.run() is None
    assert "sub-folders (p01, p02) are not searched" in widget.status.text()
    widget.recursive.setChecked(True)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(f"2 mask(s) written to {tmp_path / 'out'} (summary.csv); 0 skipped; 1 "
                                           "other file(s) not images. Note: 2 of 2 mask(s)"), widget.status.text()
    assert widget.skipped.count() == 0
    for series in ("p01/s1", "p02/s1"):
        assert tifffile.imread(tmp_path / "out" / series / "us_mask.tif").shape == (40, 48)
    assert viewer.layers["FedMix batch masks"].data.shape == (2, 40, 48)
    # run again, continuing: nothing is predicted twice
    widget.resume.setChecked(True)
    widget.open_results.setChecked(False)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(f"2 mask(s) written to {tmp_path / 'out'} (2 kept from the earlier "
                                           "batch) (summary.csv); 0 skipped; 1 other file(s) not images. Note: 2 of "
                                           "2 mask(s) cover"), widget.status.text()  # the kept masks are read too
    # an image at the top as well: without include sub-folders only it is predicted, and the panel says so
    tifffile.imwrite(export / "top.tif", np.zeros((40, 48), np.uint8))
    widget.resume.setChecked(False)
    widget.recursive.setChecked(False)
    widget.output.setText(str(tmp_path / "flat"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(
        f"1 mask(s) written to {tmp_path / 'flat'} (summary.csv); 0 skipped. Note: 2 sub-folder(s) hold images this "
        "batch did not read (p01, p02): --recursive (in napari: include sub-folders) predicts them too. Note: 1 of 1"
    ), widget.status.text()
    # into the recursive batch's folder: its masks of the sub-folders' images are not this batch's, and are named
    widget.output.setText(str(tmp_path / "out"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert ("Note: 2 mask file(s) in the output folder are not this batch's (p01/s1/us_mask.tif, "
            "p02/s1/us_mask.tif): an earlier batch wrote them") in widget.status.text(), widget.status.text()
    # a GPU named in the preferences that this machine lacks: the batch says so, as predict's CLI does
    import torch

    monkeypatch.setattr("napari_fedmix.predict_widget.preferred_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    widget.output.setText(str(tmp_path / "on-gpu"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert ("(summary.csv); 0 skipped. Note: cuda requested but no CUDA GPU is available: using the CPU. Note: "
            in widget.status.text()), widget.status.text()


def test_predict_widgets_start_with_the_model_just_trained_or_the_open_sites_newest(make_napari_viewer, qtbot,
                                                                                     sample, tmp_path):
    """The model field started empty (Batch predict then looked for 'model.safetensors' wherever napari
    was started), so after training a clinician had to find SITE/models/local/final.safetensors."""
    import shutil

    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    from napari_fedmix.annotate_widget import AnnotateWidget
    from napari_fedmix.predict_widget import BatchPredictWidget, PredictWidget
    from napari_fedmix.train_widget import TrainWidget

    viewer = make_napari_viewer()
    annotate, train, predict, batch = (cls(viewer) for cls in (AnnotateWidget, TrainWidget, PredictWidget,
                                                               BatchPredictWidget))
    for widget in (annotate, train, predict, batch):
        qtbot.addWidget(widget)
    annotate.open_site(sample)  # no model yet
    assert predict.checkpoint.text() == batch.checkpoint.text() == ""
    batch.input.setText(str(sample / "images"))
    batch.output.setText(str(tmp_path / "out"))
    assert batch.run() is None and batch.status.text().startswith("error: model: choose a checkpoint (.safetensors)")

    _start_local(train, sample, rounds=1)
    qtbot.waitUntil(lambda: train.worker is None, timeout=120_000)
    trained = str(sample / "models" / "local" / "final.safetensors")
    assert predict.checkpoint.text() == batch.checkpoint.text() == trained

    predict.checkpoint.setText(str(tmp_path / "chosen.safetensors"))  # the user's own choice stays
    doomed = BatchPredictWidget(viewer)  # a closed widget no longer follows (and raises nothing)
    doomed.deleteLater()
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    other = tmp_path / "site-b"
    shutil.copytree(sample, other, ignore=shutil.ignore_patterns("models"))
    (other / "models").mkdir()
    shutil.copy(trained, other / "models" / "global.safetensors")
    annotate.open_site(other)
    assert batch.checkpoint.text() == str(other / "models" / "global.safetensors")
    assert predict.checkpoint.text() == str(tmp_path / "chosen.safetensors")
    late = PredictWidget(viewer)
    qtbot.addWidget(late)
    assert late.checkpoint.text() == str(other / "models" / "global.safetensors")


def test_prediction_runs_on_the_device_the_preferences_name(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Preferences › FedMix › device is 'for training and prediction'; both prediction widgets used 'auto'
    whatever it said (a GPU busy training elsewhere, or too small, could not be avoided)."""
    import napari_fedmix.settings
    from fedmix_engine.predict import Predictor
    from napari_fedmix.predict_widget import PredictWidget

    setting = {"device": "cpu", "default_site_folder": ""}
    monkeypatch.setattr(napari_fedmix.settings, "plugin_defaults", lambda: dict(setting))
    asked: list[str] = []
    real = Predictor.from_checkpoint.__func__

    def recorded(cls, source, device="auto", inference=None):
        asked.append(device)
        return real(cls, source, device, inference)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(recorded))
    viewer = make_napari_viewer()
    predict = PredictWidget(viewer)
    qtbot.addWidget(predict)
    predict.checkpoint.setText(str(_tiny_checkpoint(tmp_path)))
    first = predict.predictor()
    assert first.plan.note == "CPU requested" and predict.predictor() is first, "loaded once per model and device"
    setting["device"] = "auto"  # changed in the preferences: the next prediction follows
    assert predict.predictor() is not first and asked == ["cpu", "auto"]
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "scan.tif", np.zeros((40, 48), np.uint8))
    batch = _batch_widget(viewer, qtbot, folder, tmp_path / "out")
    setting["device"] = "cpu"
    assert batch.run() is not None
    qtbot.waitUntil(lambda: batch.worker is None, timeout=60_000)
    assert asked[-1] == "cpu" and (tmp_path / "out" / "scan_mask.tif").is_file()


def test_train_offers_each_device_the_preferences_can_name(make_napari_viewer, qtbot, monkeypatch):
    """Preferences › FedMix › device and the Train panel's device list are one list: a device the
    preferences name but the panel lacks was silently replaced by the panel's first entry ('auto'). The
    Apple GPU (mps) is in both."""
    import yaml

    import napari_fedmix
    import napari_fedmix.settings
    from napari_fedmix.train_widget import TrainWidget

    manifest = yaml.safe_load((Path(napari_fedmix.__file__).parent / "napari.yaml").read_text())
    offered = manifest["contributions"]["configurations"]["training"]["properties"]["device"]["enum"]
    viewer = make_napari_viewer()
    for device in offered:
        monkeypatch.setattr(napari_fedmix.settings, "plugin_defaults",
                            lambda device=device: {"device": device, "default_site_folder": ""})
        train = TrainWidget(viewer)
        qtbot.addWidget(train)
        assert [train.device.itemText(k) for k in range(train.device.count())] == offered
        assert train.device.currentText() == device
    assert "mps" in offered


def test_predict_starts_with_the_default_sites_model_without_annotate_open(make_napari_viewer, qtbot, tmp_path,
                                                                           monkeypatch):
    import napari_fedmix.settings
    from napari_fedmix.predict_widget import PredictWidget

    site = tmp_path / "site"
    (site / "models").mkdir(parents=True)
    model = _tiny_checkpoint(tmp_path)
    (site / "models" / "global.safetensors").write_bytes(model.read_bytes())
    monkeypatch.setattr(napari_fedmix.settings, "plugin_defaults",
                        lambda: {"device": "auto", "default_site_folder": str(site)})
    predict = PredictWidget(make_napari_viewer())
    qtbot.addWidget(predict)
    assert predict.checkpoint.text() == str(site / "models" / "global.safetensors")


def test_batch_predict_suggests_an_output_folder_beside_the_images(make_napari_viewer, qtbot, tmp_path):
    """Run refused until an output folder was typed; a folder beside the images is what most would pick."""
    from napari_fedmix.predict_widget import BatchPredictWidget

    widget = BatchPredictWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    folder = tmp_path / "scans"
    folder.mkdir()
    tifffile.imwrite(folder / "scan.tif", np.zeros((40, 48), np.uint8))
    widget.checkpoint.setText(str(_tiny_checkpoint(tmp_path)))
    widget.input.setText(str(folder))
    assert widget.output.text() == str(tmp_path / "scans-masks")
    widget.input.setText(str(folder / "scan.tif"))  # the suggestion follows the images...
    assert widget.output.text() == str(folder / "scan-masks")
    widget.input.setText(str(folder))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert (tmp_path / "scans-masks" / "scan_mask.tif").is_file()
    widget.output.setText(str(tmp_path / "mine"))  # ...until the user chooses one
    widget.input.setText(str(tmp_path))
    assert widget.output.text() == str(tmp_path / "mine")


def test_tagging_takes_one_key_per_image(make_napari_viewer, qtbot, tmp_path, images):
    """Tags are the cheap label FedMix is built on, yet each took a click on a tri-state box and a click on
    'next'. Alt+A (every class absent) and Alt+P (the box class present) save and move on."""
    viewer, widget = _annotating(make_napari_viewer, qtbot, tmp_path / "site", images)
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key.Key_A, Qt.KeyboardModifier.AltModifier)
    assert widget.current_id == "scan-1"
    qtbot.keyClick(canvas, Qt.Key.Key_P, Qt.KeyboardModifier.AltModifier)
    assert widget.current_id == "scan-2"
    viewer.layers["FedMix mask"].data[5:10, 5:10] = 1  # the last image gets a mask, and is tagged too
    viewer.layers["FedMix mask"].refresh()
    widget._mark_dirty()
    qtbot.keyClick(canvas, Qt.Key.Key_P, Qt.KeyboardModifier.AltModifier)
    assert widget.current_id == "scan-2", "the last image stays on screen"
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert [store.tags(i) for i in ("scan-0", "scan-1", "scan-2")] == [{"lesion": False}, {"lesion": True},
                                                                           {"lesion": True}]
        assert [r.supervision for r in store.records()] == ["tag", "tag", "mask"]
    assert widget.summary.text() == "3 images: 1 mask · 0 box · 2 tag · 0 unlabelled"


def test_evaluate_loads_the_model_in_its_worker_and_says_when_it_is_corrupt(make_napari_viewer, qtbot, tmp_path,
                                                                         monkeypatch):
    """Evaluate loaded the model (140 MB at the reference width, from a share perhaps) on napari's GUI thread
    before its worker started. It loads it in the worker now; a corrupt model is said in the status line."""
    import threading

    from napari_fedmix.evaluate_widget import EvaluateWidget

    site = tmp_path / "site"
    with SiteStore.create(site, ["lesion"]) as store:
        store.add_image(np.full((40, 48), 90, np.uint8), "img0")
        mask = np.zeros((40, 48), np.uint8)
        mask[5:20, 8:30] = 1
        store.set_mask("img0", mask)
    loaded_in = _threads_loading_models(monkeypatch)
    widget = EvaluateWidget(make_napari_viewer())
    qtbot.addWidget(widget)
    widget.site.setText(str(site))
    widget.checkpoint.setText(str(_tiny_checkpoint(tmp_path)))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert len(loaded_in) == 1 and loaded_in[0] is not threading.main_thread()
    assert "model: m.safetensors (" in widget.status.text() and widget.table.columnCount() == 1
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 4)
    widget.checkpoint.setText(str(broken))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith(f"error: {broken}: "), widget.status.text()
    assert widget.run_button.isEnabled() and not widget.stop_button.isEnabled()


def test_evaluate_widget_scores_a_model_on_a_labelled_site_as_the_command_line_does(make_napari_viewer, qtbot,
                                                                                    tmp_path, monkeypatch):
    """A clinician handed the federation's model asks how good it is on their own labelled images: the
    answer was only on the command line. Per class Dice, IoU and HD95 (mm where the images have a pixel
    spacing), the mean figure, every image's scores as CSV; bad input and Stop are said in the status."""
    from fedmix_engine.evaluation import score_site, summarise
    from fedmix_engine.predict import Predictor
    from model_helpers import all_lesion_checkpoint
    from napari_fedmix.evaluate_widget import EvaluateWidget

    site = tmp_path / "site"
    with SiteStore.create(site, ["lesion"]) as store:
        for k in range(4):
            store.add_image(np.full((40, 48), 30 + 40 * k, np.uint8), f"img{k}", spacing=(0.5, 0.25) if k % 2 else None)
            mask = np.zeros((40, 48), np.uint8)
            mask[5 + k:20, 8:30 - k] = 1
            store.set_mask(f"img{k}", mask)
        store.add_image(np.zeros((40, 48), np.uint8), "boxed")  # no mask to score against: left out, and said
        store.add_box("boxed", "lesion", 5, 5, 20, 20)
    model = all_lesion_checkpoint(tmp_path / "m.safetensors")  # HD95 defined on every image
    import napari_fedmix.settings

    monkeypatch.setattr(napari_fedmix.settings, "plugin_defaults",
                        lambda: {"device": "cpu", "default_site_folder": str(site)})
    viewer = make_napari_viewer()
    widget = EvaluateWidget(viewer)
    qtbot.addWidget(widget)
    widget.checkpoint.setText(str(model))

    assert widget.site.text() == ""  # never the default (training) site: its scores would flatter the model
    assert widget.run() is None and "labelled site: choose a site folder" in widget.status.text()
    widget.site.setText(str(site))
    widget.scores_file.setText(str(tmp_path))
    assert widget.run() is None and f"{tmp_path}: is a folder" in widget.status.text()

    widget.scores_file.setText(str(tmp_path / "scores.csv"))
    import threading

    from fedmix_engine import evaluation

    written_in: list[threading.Thread] = []  # the CSV is written in the worker (on a share it takes seconds)
    write = evaluation.write_scores
    monkeypatch.setattr(evaluation, "write_scores",
                        lambda *args, **kwargs: written_in.append(threading.current_thread()) or write(*args, **kwargs))
    assert widget.run() is not None
    widget.checkpoint.setText(str(tmp_path / "chosen-meanwhile.safetensors"))  # the result names what was run
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert written_in and threading.main_thread() not in written_in, written_in
    [expected] = summarise(score_site(Predictor.from_checkpoint(model, "cpu"), site))
    assert widget.table.columnCount() == 1 and widget.table.horizontalHeaderItem(0).text() == "lesion"
    cells = [widget.table.item(row, 0).text() for row in range(widget.table.rowCount())]
    assert cells == ["4", "4", f"{expected.dice_mean:.3f} ± {expected.dice_std:.3f}", f"{expected.iou_mean:.3f}",
                     f"{expected.hd95_median:.1f}", f"{expected.hd95_mm_median:.2f}"]
    assert widget.table.verticalHeaderItem(1).text() == "with the class"  # a cyst column's count is of cysts
    assert ("4 image(s) with full ground truth (1 of its 5 images left out: a box, a tag of a present class or no "
            "label gives no mask to score against); mean Dice over images") in widget.status.text()
    assert "(as simulate and Train report)" in widget.status.text() and widget.threshold.value() == 0.5
    assert "HD95 in mm from 2 of 4 images" in widget.status.text() and "m.safetensors (" in widget.status.text()
    assert (tmp_path / "scores.csv").read_text().count("\n") == 5 and widget.progress.value() == 4
    # evaluating again with the same scores file keeps the first one's scores: a new name is asked for
    widget.checkpoint.setText(str(model))
    assert widget.run() is None and widget.worker is None
    assert f"{tmp_path / 'scores.csv'}: exists already, and is kept: give another name" in widget.status.text()
    assert "flatter" not in widget.status.text()
    # the site's own model, scored on the images it trained on: said
    widget.checkpoint.setText(str(all_lesion_checkpoint(site / "models" / "global.safetensors")))
    widget.scores_file.setText("")
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert f"note: {site}: the model is this site's own" in widget.status.text()
    widget.checkpoint.setText(str(model))

    # at the threshold a clinic chose: 0.8, above this model's 0.73 everywhere, leaves every mask empty
    from model_helpers import constant_checkpoint

    p073 = constant_checkpoint(tmp_path / "p073.safetensors", 1.0, 32, ("lesion",))
    widget.checkpoint.setText(str(p073))
    widget.threshold.setValue(0.8)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    [cut] = summarise(score_site(Predictor.from_checkpoint(p073, "cpu"), site, threshold=0.8))
    assert cut.dice_mean == 0.0 != expected.dice_mean  # every truth here holds a lesion
    assert widget.table.item(2, 0).text() == f"{cut.dice_mean:.3f} ± {cut.dice_std:.3f}"
    assert "(masks at probability > 0.8; simulate and Train report at 0.5)" in widget.status.text()
    widget.threshold.setValue(0.5)
    widget.checkpoint.setText(str(model))

    # a site with no full ground truth is named; Stop leaves no half table
    with SiteStore.create(tmp_path / "weak", ["lesion"]) as store:
        store.add_image(np.zeros((40, 48), np.uint8), "unlabelled")
    widget.site.setText(str(tmp_path / "weak"))
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "no image with full ground truth" in widget.status.text() and widget.table.columnCount() == 0
    widget.site.setText(str(site))
    import gc
    import weakref

    loaded: list[weakref.ref] = []  # the stopped evaluation's model: let go (superqt kept an aborted worker's run)
    load = Predictor.from_checkpoint.__func__
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(
        lambda cls, *args, **kwargs: (p := load(cls, *args, **kwargs), loaded.append(weakref.ref(p)))[0]))
    score_images = evaluation.iter_score_site

    def stopped_after_the_first_image(*args, **kwargs):
        steps = score_images(*args, **kwargs)
        yield next(steps)
        widget.stop_requested.set()  # what Stop does, from the worker: 4 images could be scored before a click
        return (yield from steps)

    monkeypatch.setattr(evaluation, "iter_score_site", stopped_after_the_first_image)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.status.text().startswith("stopped after") and widget.table.columnCount() == 0
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None, "the stopped evaluation still holds its model"
