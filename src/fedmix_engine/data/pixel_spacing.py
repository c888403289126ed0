"""Pixel spacing in millimetres: what turns a boundary distance (HD95) from pixels into mm.

Read from a DICOM file's header (PixelSpacing, an X-ray's ImagerPixelSpacing, an ultrasound image's
calibrated regions) or from a TIFF calibrated in centimetres, or by ImageJ/Fiji in mm, cm or µm. A
TIFF's resolution in inches is not used: image editors and screen grabs write 72 or 96 dpi, which
says nothing about the patient. PNG, JPEG and BMP carry none.

A site keeps the spacing in its stored image's own TIFF resolution tags (pixels per cm), so the
folder stays self-describing and Fiji shows the image calibrated.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedmix_engine.errors import InputError

Spacing = tuple[float, float]  # (row, column) in mm
_PER_MM = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "centimeter": 10.0, "micron": 1e-3, "um": 1e-3,
           "µm": 1e-3, "\u03bcm": 1e-3}  # ImageJ's unit names, as Fiji writes them
_CENTIMETER = 3  # TIFF ResolutionUnit


def checked_spacing(spacing: object, where: str | Path) -> Spacing:
    """Two finite positive numbers (row, column), or an error naming ``where``."""
    try:
        row, column = (float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(where, f"pixel spacing must be two numbers (row, column) in mm, not {spacing!r}") from None
    if not (math.isfinite(row) and math.isfinite(column) and row > 0 and column > 0):
        raise InputError(where, f"pixel spacing must be positive and finite, not ({row}, {column}) mm")
    return row, column


def file_spacing(path: str | Path) -> Spacing | None:
    """The spacing an image file states (module docstring), or None; never an error for an image that
    reads: a malformed calibration only leaves the image without one."""
    from fedmix_engine.data.imageio import is_dicom_file

    path = Path(path)
    if is_dicom_file(path):
        from fedmix_engine.data.dicom import pixel_spacing, read_dataset

        try:
            return pixel_spacing(read_dataset(path, pixels=False))
        except InputError:
            return None
    if path.suffix.lower() in (".tif", ".tiff"):
        return tiff_spacing(path)
    return None


def tiff_spacing(path: str | Path) -> Spacing | None:
    """A TIFF's calibration in mm: resolution in pixels per cm, or ImageJ's resolution per unit."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            x_per_unit, y_per_unit = page.resolution
            if int(page.resolutionunit) == _CENTIMETER:
                mm_per_unit = 10.0
            else:
                unit = str((tiff.imagej_metadata or {}).get("unit", "")).strip().lower()
                mm_per_unit = _PER_MM.get(unit, 0.0)
    except Exception:  # an unreadable file is said by the image reader, not here
        return None
    if not mm_per_unit or not (x_per_unit > 0 and y_per_unit > 0):
        return None
    try:  # rationals like 100/3 px per cm: read back to the digits they were written with
        return checked_spacing((float(f"{mm_per_unit / y_per_unit:.9g}"), float(f"{mm_per_unit / x_per_unit:.9g}")),
                               path)
    except InputError:
        return None


def tiff_resolution(spacing: Spacing | None) -> dict:
    """``tifffile.imwrite`` options that store ``spacing`` (pixels per cm); nothing for None."""
    if spacing is None:
        return {}
    row, column = spacing
    return {"resolution": (10.0 / column, 10.0 / row), "resolutionunit": "CENTIMETER"}
