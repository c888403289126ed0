"""Screenshots of every widget for docs/plugin.md, taken from a real napari window.

Usage (no screen needed): xvfb-run -a -s "-screen 0 1920x1440x24" .venv/bin/python docs/make_screenshots.py
[NAME.png ...]: with names, only those files are written (the others would change for nothing: each
shot holds a training run's figures).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "images"


def _shot(viewer):
    """The whole window once the canvas has been drawn at its current size (docks resize it; a grab
    before the redraw stretches the last frame drawn at the old size)."""
    from qtpy.QtWidgets import QApplication

    for _ in range(3):
        QApplication.processEvents()
        viewer.reset_view()
        viewer.window._qt_viewer.canvas.native.update()
        time.sleep(0.1)
    QApplication.processEvents()
    return viewer.screenshot(canvas_only=False, flash=False)


def main(only: set[str]) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from fedmix_engine.data.synthetic import make_sample
    from napari_fedmix.annotate_widget import AnnotateWidget
    from napari_fedmix.evaluate_widget import EvaluateWidget
    from napari_fedmix.predict_widget import BatchPredictWidget, PredictWidget
    from napari_fedmix.train_widget import TrainWidget

    work = Path(tempfile.mkdtemp())
    make_sample(work / "fed", sites=1, images=24, eval_images=2, size=128, mix=[0.6, 0.2, 0.2], seed=3)
    site = work / "fed" / "site-a"

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    shots = {}

    annotate = AnnotateWidget(viewer)
    annotate_dock = viewer.window.add_dock_widget(annotate, name="Annotate site", area="right")
    annotate.open_site(site)
    box_row = next(i for i, rec in enumerate(annotate.store.records()) if rec.supervision == "box")
    annotate.image_list.setCurrentRow(box_row)
    QApplication.processEvents()
    shots["plugin-annotate.png"] = _shot(viewer)

    train = TrainWidget(viewer)
    dock = viewer.window.add_dock_widget(train, name="Train & federate", area="right")
    train.site.setText(str(site))
    # a real local run through the widget's own worker: the status line and plot are what a user sees
    train.rounds.setValue(15)
    train.width_spin.setValue(8)
    train.device.setCurrentText("cpu")
    train.start()
    while train.worker is not None:
        QApplication.processEvents()
        time.sleep(0.05)
    QApplication.processEvents()
    checkpoint = train.last_checkpoint
    shots["plugin-train.png"] = _shot(viewer)
    viewer.window.remove_dock_widget(dock)

    predict = PredictWidget(viewer)
    dock = viewer.window.add_dock_widget(predict, name="Predict", area="right")
    predict.checkpoint.setText(str(checkpoint))
    viewer.layers.selection.active = viewer.layers["FedMix image"]
    predict.predict_active()  # the widget's own path: a worker, then the overlays
    while predict._probability is None:
        QApplication.processEvents()
        time.sleep(0.05)
    QApplication.processEvents()
    shots["plugin-predict.png"] = _shot(viewer)
    viewer.window.remove_dock_widget(dock)

    batch = BatchPredictWidget(viewer)
    batch_dock = viewer.window.add_dock_widget(batch, name="Batch predict", area="right")
    batch.input.setText(str(site / "images"))
    batch.checkpoint.setText(str(checkpoint))
    batch.output.setText(str(work / "batch-out"))
    QApplication.processEvents()
    shots["plugin-batch.png"] = _shot(viewer)

    evaluate = EvaluateWidget(viewer)  # on its own: its table needs the dock's height
    for other in (annotate_dock, batch_dock):
        viewer.window.remove_dock_widget(other)
    dock = viewer.window.add_dock_widget(evaluate, name="Evaluate model", area="right")
    evaluate.checkpoint.setText(str(checkpoint))
    evaluate.site.setText(str(work / "fed" / "eval" / "site-a" / "test"))
    evaluate.run()
    while evaluate.worker is not None:
        QApplication.processEvents()
        time.sleep(0.05)
    QApplication.processEvents()
    shots["plugin-evaluate.png"] = _shot(viewer)
    viewer.window.remove_dock_widget(dock)

    # a site of two classes: the class to draw, the mask labels' colours, each box's class
    make_sample(work / "two", sites=1, images=12, eval_images=1, size=128, classes=2, mix=[0.5, 0.5, 0.0], seed=5)
    for name in ("FedMix prediction", "FedMix probability"):
        viewer.layers.remove(name)
    annotate = AnnotateWidget(viewer)
    dock = viewer.window.add_dock_widget(annotate, name="Annotate site", area="right")
    annotate.open_site(work / "two" / "site-a")
    records = annotate.store.records()
    row = max(range(len(records)), key=lambda i: len({b.class_name for b in annotate.store.boxes(records[i].id)}))
    annotate.image_list.setCurrentRow(row)
    QApplication.processEvents()
    shots["plugin-two-classes.png"] = _shot(viewer)
    viewer.window.remove_dock_widget(dock)

    import imageio.v3 as iio

    OUT.mkdir(parents=True, exist_ok=True)
    for name, image in shots.items():
        if only and name not in only:
            continue
        iio.imwrite(OUT / name, image)
        print(f"wrote {OUT / name}")
    viewer.close()


if __name__ == "__main__":
    main(set(sys.argv[1:]))
