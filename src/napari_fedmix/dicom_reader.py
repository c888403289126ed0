"""File › Open for DICOM images, which napari cannot read by itself: through the engine's reader, so
napari shows exactly the pixels that import and prediction use (window applied, colour converted)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmix_engine.data.dicom import DICOM_SUFFIXES

LayerData = tuple[Any, dict, str]


def get_dicom_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: the reader if every path is a ``.dcm``/``.dicom`` file, the folder reader for
    a folder holding DICOM files (File › Open Folder: a study), else None (napari then asks its
    other readers)."""
    paths = [path] if isinstance(path, str) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        from fedmix_engine.data.imageio import image_files, is_dicom_file

        return read_dicom_folder if any(is_dicom_file(p) for p in image_files(Path(paths[0]))) else None
    if paths and all(Path(p).suffix.lower() in DICOM_SUFFIXES and Path(p).is_file() for p in paths):
        return read_dicom_layers
    return None


def read_dicom_folder(path: str | list[str]) -> list[LayerData]:
    """One image layer per series of the folder: a CT or MR series as a volume in slice order, scaled
    in mm; a file on its own (an ultrasound frame, a cine loop) as its own layer. Files left out (a
    structure set, a report, an undecodable file) are named in a warning, which napari shows."""
    import warnings

    from fedmix_engine.data.dicom_series import read_series

    folder = path if isinstance(path, str) else path[0]
    study = read_series(folder)
    if study.skipped:
        warnings.warn(f"{len(study.skipped)} file(s) not opened: " + "; ".join(study.skipped[:5]), stacklevel=2)
    layers = []
    for series in study.series:
        attributes = {"name": series.name, "rgb": series.colour,
                      "metadata": {"source": str(folder), "files": [str(f) for f in series.files]}}
        if series.spacing is not None:
            attributes["scale"] = series.spacing
        layers.append((series.pixels, attributes, "image"))
    return layers


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
