"""A folder of DICOM files as its series: the slices of a CT or MR series (one file each) stacked in
the order of their position in the patient, so napari opens a study folder as volumes, not as one
layer per file. A file on its own (an ultrasound frame, a cine loop) is a series of its own.

Slices are ordered along the slice normal (ImageOrientationPatient × ImagePositionPatient), as
DICOM viewers do, and spaced by the median distance between neighbours; without positions, by
InstanceNumber and then file name, unspaced. Slices of one series must share their size and colour.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmix_engine.data.dicom import corrupt, load_dicom, position_along_normal, read_dataset
from fedmix_engine.data.imageio import image_stem, is_dicom_file, validate_image, visible_files
from fedmix_engine.errors import InputError


@dataclass(frozen=True)
class DicomSeries:
    """One series' pixels as a viewer shows them, and where they sit."""

    name: str  # the SeriesDescription, else the first file's name
    pixels: np.ndarray  # S×H×W(×3) for several files; a single file's H×W(×3) or F×H×W(×3)
    colour: bool  # the last axis holds RGB
    spacing: tuple[float, ...] | None  # per axis before the colour axis, in ``units``
    units: tuple[str, ...] | None  # "mm", or "pixel" for an axis without a distance (a cine loop's frames)
    files: tuple[Path, ...]


@dataclass(frozen=True)
class StudyFolder:
    """A folder's series, and the files left out with why (a structure set, a report, a SEG, a file
    that cannot be decoded: study exports hold them beside the images)."""

    series: list[DicomSeries]
    skipped: list[str]


def read_series(folder: str | Path) -> StudyFolder:
    """Every series of the DICOM files at the top of ``folder`` (sub-folders are not searched)."""
    folder = Path(folder)
    files = [p for p in visible_files(folder) if is_dicom_file(p)]  # each file read once to tell DICOM
    if not files:
        raise InputError(folder, "no DICOM image files at the top of this folder")
    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    skipped = []
    for path in files:
        try:
            header = read_dataset(path, pixels=False)
            if "Rows" not in header or str(header.get("Modality", "")) == "SEG":
                skipped.append(f"{path}: not an image ({str(header.get('Modality', '')) or 'no pixel data'})")
                continue
            groups[str(header.get("SeriesInstanceUID", path))].append((path, header))
        except InputError as exc:
            skipped.append(str(exc))
        except Exception as exc:  # a damaged element, converted only when asked for (``corrupt``)
            skipped.append(str(corrupt(path, exc)))
    series = []
    for members in groups.values():
        try:
            series.append(_series(members))
        except InputError as exc:
            skipped.append(str(exc))
        except Exception as exc:  # named by the series' first file
            skipped.append(str(corrupt(members[0][0], exc)))
    return StudyFolder(series, skipped)


def series_of_file(path: str | Path, name: str | None = None) -> DicomSeries:
    """One file as a series: a 2-D image (checked as import checks it) or a multi-frame stack."""
    path = Path(path)
    image = load_dicom(path, frames=True)
    if image.pixels.ndim == (3 if image.colour else 2):
        spacing, units = _geometry(image.spacing, ())
        return DicomSeries(name or image_stem(path), validate_image(image.pixels, path), image.colour, spacing,
                           units, (path,))
    spacing, units = _geometry(image.spacing, (image.frame_spacing,))  # a cine loop's or a volume's frames
    return DicomSeries(name or image_stem(path), image.pixels, image.colour, spacing, units, (path,))


def _geometry(in_plane: tuple[float, float] | None,
              leading: tuple[float | None, ...]) -> tuple[tuple[float, ...] | None, tuple[str, ...] | None]:
    """Spacing and units per axis: ``leading`` axes (frames, slices; None: no distance) then rows and
    columns; none at all when no axis has a distance."""
    if in_plane is None and all(step is None for step in leading):
        return None, None
    spacing = tuple(step or 1.0 for step in leading) + (in_plane or (1.0, 1.0))
    units = tuple("mm" if step else "pixel" for step in leading) + (("mm", "mm") if in_plane else ("pixel", "pixel"))
    return spacing, units


def _series(members: list[tuple[Path, object]]) -> DicomSeries:
    first_path, first = members[0]
    name = str(first.get("SeriesDescription", "") or "").strip() or image_stem(first_path)
    if len(members) == 1:
        return series_of_file(first_path, name)
    ordered, slice_spacing = _slice_order(members)
    images = [load_dicom(path) for path in ordered]
    shapes = {(image.pixels.shape, image.colour) for image in images}
    if len(shapes) > 1:
        sizes = ", ".join(sorted(str(shape) for shape, _ in shapes))
        raise InputError(first_path.parent, f"series '{name}' mixes slice sizes or colour ({sizes}); open its "
                                            "files one by one")
    spacing, units = _geometry(images[0].spacing, (slice_spacing,))
    return DicomSeries(name, np.stack([image.pixels for image in images]), images[0].colour, spacing, units,
                       tuple(ordered))


def _slice_order(members: list[tuple[Path, object]]) -> tuple[list[Path], float | None]:
    """The files along the slice normal and the median slice distance; by InstanceNumber and name
    (no distance) when a file lacks its position or orientation."""
    try:
        keys = [position_along_normal(header.ImageOrientationPatient, header.ImagePositionPatient)
                for _path, header in members]
    except (AttributeError, ValueError, TypeError):
        ordered = sorted(members, key=lambda m: (int(m[1].get("InstanceNumber", 0) or 0), m[0].name))
        return [path for path, _ in ordered], None
    order = np.argsort(keys, kind="stable")
    gaps = np.diff(np.asarray(keys)[order])
    spacing = float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else None
    return [members[i][0] for i in order], spacing
