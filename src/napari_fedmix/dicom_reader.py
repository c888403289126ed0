"""File › Open for DICOM images, which napari cannot read by itself: through the engine's reader, so
napari shows exactly the pixels that import and prediction use (window applied, colour converted)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmix_engine.data.dicom import DICOM_SUFFIXES

LayerData = tuple[Any, dict, str]


def get_dicom_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: the reader if every path is a ``.dcm``/``.dicom`` file, else None (napari
    then asks its other readers)."""
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(Path(p).suffix.lower() in DICOM_SUFFIXES and Path(p).is_file() for p in paths):
        return read_dicom_layers
    return None


def read_dicom_layers(path: str | list[str]) -> list[LayerData]:
    """One image layer per file, named after it and scaled in mm when the file gives its pixel spacing.
    A multi-frame file (a cine loop) opens as a stack, which Predict predicts frame by frame; a file
    the engine refuses (a SEG, an undecodable one) raises its InputError, which napari shows."""
    from fedmix_engine.data.dicom import load_dicom
    from fedmix_engine.data.imageio import image_stem, validate_image

    layers = []
    for p in [path] if isinstance(path, str) else path:
        image = load_dicom(p, frames=True)
        pixels, frame_axes = image.pixels, 3 if image.colour else 2
        if pixels.ndim == frame_axes:
            pixels = validate_image(pixels, p)  # one frame: checked as import would check it
        attributes = {"name": image_stem(p), "rgb": image.colour, "metadata": {"source": str(p)}}
        if image.spacing is not None:
            leading = pixels.ndim - frame_axes
            attributes.update(scale=(1.0,) * leading + image.spacing, units=("pixel",) * leading + ("mm", "mm"))
        layers.append((pixels, attributes, "image"))
    return layers
