"""Turn napari layer data into SiteStore records and back: geometry only, no ML."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmix_engine.data.site_store import Box, SiteStore
from fedmix_engine.errors import InputError

if TYPE_CHECKING:
    from napari.layers import Image, Layer


def label_features(classes: list[str] | tuple[str, ...]) -> dict[str, list]:
    """A Labels layer's features naming each label's class (label k = class k), which napari shows
    beside the label under the cursor: on a site with several classes, which colour is which."""
    return {"index": list(range(len(classes) + 1)), "class": ["background", *classes]}


def shapes_to_boxes(rectangles: list[np.ndarray], classes: list[str], image_shape: tuple[int, int]) -> list[Box]:
    """Rectangles (napari Shapes data, rows of (y, x) corners) → boxes clipped to the image.

    Clipping is the one forgiving step: a rectangle dragged past the image edge means "up to the
    edge". A rectangle entirely outside the image or with no area is left for the store to refuse.
    """
    height, width = image_shape
    boxes = []
    for corners, name in zip(rectangles, classes, strict=True):
        corners = np.asarray(corners, dtype=float)[:, -2:]
        (y0, x0), (y1, x1) = corners.min(0), corners.max(0)
        y0, x0 = max(0.0, np.floor(y0)), max(0.0, np.floor(x0))
        y1, x1 = min(float(height), np.ceil(y1)), min(float(width), np.ceil(x1))
        boxes.append(Box(name, int(y0), int(x0), int(y1), int(x1)))
    return boxes


def boxes_to_shapes(boxes: list[Box]) -> tuple[list[np.ndarray], list[str]]:
    """Boxes → napari rectangle corner arrays and their class names."""
    rectangles = [np.array([[b.y0, b.x0], [b.y0, b.x1], [b.y1, b.x1], [b.y1, b.x0]], dtype=float) for b in boxes]
    return rectangles, [b.class_name for b in boxes]


def save_annotations(store: SiteStore, image_id: str, mask: np.ndarray, rectangles: list[np.ndarray],
                     box_classes: list[str], tags: dict[str, bool | None]) -> list[str]:
    """Write one image's annotations as the widget holds them; returns problems (each names what).

    The autosave path of the annotate widget, free of napari and Qt so that a crash test can drive
    it in a plain process. Each part is its own crash-safe store transaction; a refused part (e.g.
    a box outside the image) leaves that part as it was and the others are still saved.
    """
    problems = []
    record = store.record(image_id)
    try:
        if mask.any():
            store.set_mask(image_id, mask)
        elif record.has_mask:
            store.clear_mask(image_id)
    except InputError as exc:
        problems.append(str(exc))
    try:
        store.set_boxes(image_id, shapes_to_boxes(rectangles, box_classes, (record.height, record.width)))
    except InputError as exc:
        problems.append(str(exc))
    for name, value in tags.items():
        try:
            store.set_tag(image_id, name, value)
        except InputError as exc:
            problems.append(str(exc))
    return problems


def image_layer_pixels(layer: Image, index: tuple[int, ...] = (), lazy: bool = False) -> np.ndarray:
    """An image layer's pixels, or one frame of them (``index`` into its leading axes), as an array: a
    lazy (dask) layer reads only what is asked for, and with ``lazy`` nothing yet (a long video's
    stack, which Predict reads a batch at a time). A multiscale (pyramid) layer, such as a whole-slide
    image, is refused: FedMix takes 2-D images and stacks of them."""
    if getattr(layer, "multiscale", False):
        shape = "×".join(str(n) for n in layer.data[0].shape)
        raise InputError(f"layer '{layer.name}'", f"a multiscale (pyramid) layer of {shape} pixels; open one "
                                                   "level or a region of it as an ordinary image layer")
    data = layer.data[index] if index else layer.data
    return data if lazy and hasattr(data, "shape") else np.asarray(data)


def layer_spacing(layer: Layer) -> tuple[float, float] | None:
    """A layer's in-plane pixel spacing in mm (row, column) when its scale is a length (our DICOM reader
    sets mm; another reader µm), so an image added from the screen keeps it; None for pixels."""
    try:
        units = tuple(layer.units)[-2:]
        mm = tuple(float((scale * unit).to("mm").magnitude) for scale, unit in
                   zip(tuple(layer.scale)[-2:], units, strict=True))
    except Exception:  # no units (older napari), or a unit that is no length ("pixel")
        return None
    return mm if len(mm) == 2 and all(v > 0 for v in mm) else None
