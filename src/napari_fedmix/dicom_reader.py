"""File › Open for DICOM images, which napari cannot read by itself: through the engine's reader, so
napari shows exactly the pixels that import and prediction use (window applied, colour converted)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmix_engine.data.dicom import DICOM_SUFFIXES

LayerData = tuple[Any, dict, str]
# a Zarr store (v2 or v3), which napari's own reader opens: its chunk files ("0.0.0") have no image suffix,
# so telling them from DICOM files named by UID meant opening every one before napari's reader was asked
ZARR_MARKERS = (".zarray", ".zgroup", ".zattrs", "zarr.json")


def get_dicom_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: the reader if every path is a ``.dcm``/``.dicom`` file, the folder reader for
    a folder holding DICOM files (File › Open Folder: a study), else None (napari then asks its
    other readers)."""
    paths = [path] if isinstance(path, str) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        from fedmix_engine.data.imageio import is_dicom_file, visible_files

        folder = Path(paths[0])
        if folder.suffix.lower() == ".zarr" or any((folder / marker).exists() for marker in ZARR_MARKERS):
            return None
        # napari asks for every folder opened: the first DICOM file answers, each file read once at most
        return read_dicom_folder if any(is_dicom_file(p) for p in visible_files(folder)) else None
    if paths and all(Path(p).suffix.lower() in DICOM_SUFFIXES and Path(p).is_file() for p in paths):
        return read_dicom_layers
    return None


def read_dicom_folder(path: str | list[str]) -> list[LayerData]:
    """One image layer per series of the folder: a CT or MR series as a volume in slice order, scaled
    in mm; a file on its own (an ultrasound frame, a cine loop) as its own layer. Files left out (a
    structure set, a report, an undecodable file) are named in a warning, which napari shows."""
    import warnings

    from fedmix_engine.data.dicom_series import read_series

    study = read_series(path if isinstance(path, str) else path[0])
    if study.skipped:
        warnings.warn(f"{len(study.skipped)} file(s) not opened: " + "; ".join(study.skipped[:5]), stacklevel=2)
    return [_layer(series) for series in study.series]


def read_dicom_layers(path: str | list[str]) -> list[LayerData]:
    """One image layer per file, named after it and scaled in mm when the file gives its pixel spacing.
    A multi-frame file (a cine loop) opens as a stack, which Predict predicts frame by frame; a file
    the engine refuses (a SEG, an undecodable one) raises its InputError, which napari shows."""
    from fedmix_engine.data.dicom_series import series_of_file

    return [_layer(series_of_file(p)) for p in ([path] if isinstance(path, str) else path)]


def _layer(series) -> LayerData:
    """A series as napari layer data, placed in mm when its spacing is known."""
    attributes = {"name": series.name, "rgb": series.colour, "metadata": {"files": [str(f) for f in series.files]}}
    if series.spacing is not None:
        attributes.update(scale=series.spacing, units=series.units)
    return series.pixels, attributes, "image"
