"""Reading one DICOM image (pydicom) as the pixels a DICOM viewer shows, for import and prediction.

Hospitals export images from their PACS as DICOM, often as files without a suffix (``IM00001`` in
a DICOM media folder) or named by their instance UID (``1.2.840.113619.2.55.1``). A file counts as
DICOM if it ends in ``.dcm``/``.dicom``, or carries the ``DICM`` marker of a DICOM file header.

What is read, in the order of the standard's pixel pipeline (PS3.4 N.2):

- greyscale (``MONOCHROME1/2``): the modality transform (rescale slope and intercept, e.g. CT's
  Hounsfield units) and the VOI transform (the stored window, or VOI LUT), so a CT or MR slice
  looks as the radiologist saw it, in [0, 1]; ``MONOCHROME1`` (white = 0) is inverted. Neither is applied
  when the file does not ask for it, so an 8-bit ultrasound frame stays 8-bit (and is scaled by
  /255, not per image);
- colour: ``RGB`` as stored, ``YBR_*`` converted to RGB by pydicom, ``PALETTE COLOR`` through
  its lookup table.

Refused, naming the file: multi-frame files (cine loops, volumes) where one 2-D image is needed
(import; napari's reader and batch prediction take them as stacks, batch prediction decoding a frame
at a time: :class:`DicomFrames`), segmentations (``SEG``) and
files without pixel data (structure sets, reports), compressed pixel data this installation has no
decoder for, and files that are not DICOM. Only pixels are kept: the header (patient data) is not
copied into a site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmix_engine.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_SUFFIXES = (".dcm", ".dicom")
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOMDIR = "DICOMDIR"  # a DICOM media folder's index: DICOM, but holds no image


def has_dicom_marker(path: Path) -> bool:
    """True if the file has the 128-byte preamble followed by ``DICM`` that starts a DICOM file."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: Path) -> bool:
    """A DICOM image candidate: a ``.dcm``/``.dicom`` file, or any other with the DICOM marker (not the
    media folder's DICOMDIR index)."""
    if path.name.upper() == _DICOMDIR:
        return False
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_marker(path)


def read_dataset(path: Path, pixels: bool = True) -> Dataset:
    """The parsed file, as pydicom reads it (``pixels=False``: its header only); one without the
    128-byte preamble (written by older software) is read too. pydicom converts each element when it
    is first asked for, so a damaged element fails where it is used: see :func:`corrupt`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except InvalidDicomError:
            try:
                dataset = pydicom.dcmread(path, force=True, stop_before_pixels=not pixels)
            except Exception as exc:
                raise InputError(path, f"not a DICOM file ({type(exc).__name__}: {exc})") from exc
            if "SOPClassUID" not in dataset and "Rows" not in dataset:
                raise InputError(path, "not a DICOM file (no DICOM header)") from None
    except InputError:
        raise
    except Exception as exc:
        raise corrupt(path, exc) from exc
    return dataset


def corrupt(path: Path, exc: Exception) -> InputError:
    """The error to say for a file whose reading failed inside pydicom or on its values: a damaged element
    (a value representation no DICOM has, a flipped byte) surfaces only where it is first used, as
    NotImplementedError, TypeError or an OSError without an errno, a traceback instead of the file's name.
    Converting every element on reading would find it at once, but doubled the time a study folder takes
    to open. An OSError with an errno is the machine's (a share gone away): raised as it is."""
    if isinstance(exc, OSError) and exc.errno is not None:
        raise exc
    return InputError(path, f"unreadable or corrupt DICOM file ({type(exc).__name__}: {exc})")


def pixel_spacing(dataset: Dataset) -> tuple[float, float] | None:
    """Row and column spacing in mm (PixelSpacing, an enhanced file's shared PixelMeasuresSequence, an
    X-ray's ImagerPixelSpacing, or an ultrasound image's regions); None when the file gives none or a
    malformed value."""
    measured = _macro(_shared_group(dataset), "PixelMeasuresSequence")
    given = measured if measured is not None and "PixelSpacing" in measured else dataset  # enhanced: shared
    try:
        spacing = given.get("PixelSpacing") or given.get("ImagerPixelSpacing") or _ultrasound_spacing(dataset)
        rows, columns = (float(v) for v in spacing)
    except (TypeError, ValueError):
        return None
    return (rows, columns) if rows > 0 and columns > 0 else None


_CM = 3  # PhysicalUnitsX/YDirection: centimetres
_TISSUE_2D = 1  # RegionSpatialFormat: a 2-D (tissue or flow) image


def _ultrasound_spacing(dataset) -> tuple[float, float] | None:
    """An ultrasound image's spacing in mm from its SequenceOfUltrasoundRegions (which scanners write in
    place of PixelSpacing): the 2-D regions measured in cm, if they all share one scale. Regions of
    another scale (a zoomed second view beside the first) leave the image without one spacing: None."""
    scales = set()
    for region in dataset.get("SequenceOfUltrasoundRegions") or []:
        if (region.get("RegionSpatialFormat") == _TISSUE_2D and region.get("PhysicalUnitsXDirection") == _CM
                and region.get("PhysicalUnitsYDirection") == _CM):
            row, column = (round(10 * float(region.get(f"PhysicalDelta{axis}")), 9) for axis in "YX")
            scales.add((row, column))
    return scales.pop() if len(scales) == 1 else None


def _what_it_is(dataset) -> str:
    """The file's kind for a message: its SOP class name, e.g. 'RT Structure Set Storage'."""
    uid = dataset.get("SOPClassUID")
    return getattr(uid, "name", None) or str(dataset.get("Modality", "unknown kind"))


@dataclass(frozen=True)
class DicomImage:
    """A DICOM file's pixels as a viewer shows them, and what a viewer needs to place them."""

    pixels: np.ndarray  # H×W or H×W×3; F×H×W or F×H×W×3 for a multi-frame file read with frames=True
    colour: bool  # the last axis holds RGB (not the width of a grey frame)
    spacing: tuple[float, float] | None  # row and column spacing in mm, when the file gives it
    frame_spacing: float | None = None  # mm between frames: an enhanced volume's, when its frames are in order


def read_dicom(path: str | Path) -> np.ndarray:
    """One DICOM file's 2-D image, H×W (grey) or H×W×3 (colour), as a viewer shows it (module docstring)."""
    return load_dicom(path).pixels


def load_dicom(path: str | Path, frames: bool = False) -> DicomImage:
    """:func:`read_dicom` with the pixel spacing. ``frames=True`` (napari's reader, to show and predict
    a cine loop or a volume) also reads a multi-frame file; an enhanced one (Enhanced CT/MR) keeps its
    rescale, window and pixel spacing in functional groups, per frame or shared, and each frame is shown
    with its own (:func:`_frame_transforms`)."""
    path = Path(path)
    dataset = read_dataset(path)
    try:
        return _interpreted(path, dataset, frames)
    except InputError:
        raise
    except Exception as exc:
        raise corrupt(path, exc) from exc


def _interpreted(path: Path, dataset: Dataset, frames: bool) -> DicomImage:
    """:func:`load_dicom`'s reading of a parsed file (what fails here unforeseen is the file's: ``corrupt``)."""
    if str(dataset.get("Modality", "")) == "SEG":
        raise InputError(path, "a DICOM segmentation (SEG), not an image; a site's masks are read from "
                               "PNG or TIFF files")
    if not any(k in dataset for k in _PIXEL_DATA):
        raise InputError(path, f"DICOM file holds no image ({_what_it_is(dataset)})")
    count = frame_count(dataset)
    if count > 1 and not frames:
        raise InputError(path, f"multi-frame DICOM ({count} frames: a cine loop or a volume); FedMix sites "
                               "hold 2-D images — open it in napari and add the frame to label (Annotate › Add "
                               "the image on screen), or export that frame as its own file")
    try:
        array = dataset.pixel_array
    except Exception as exc:
        raise _undecodable(path, dataset, exc) from exc
    try:
        pixels = _as_shown(dataset, count)(array, None)
    except Exception as exc:  # a damaged rescale or window (a text where a number belongs)
        raise InputError(path, f"its display values (rescale, window) cannot be applied: damaged or not as DICOM "
                               f"defines them ({type(exc).__name__}: {exc})") from exc
    return DicomImage(pixels, _is_colour(dataset), pixel_spacing(dataset), _frame_spacing(dataset, count))


def _undecodable(path: Path, dataset, exc: Exception) -> InputError:
    """Pixel data that cannot be decoded, named with its transfer syntax and pydicom's advice."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    named = f" (transfer syntax: {syntax.name})" if syntax is not None else ""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    # pydicom's message for a missing decoder lists, one per line, the packages that would decode it
    return InputError(path, f"cannot decode the DICOM pixel data{named}: {'; '.join(lines)}")


def _photometric(dataset) -> str:
    return str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()


def _is_colour(dataset) -> bool:
    return not _photometric(dataset).startswith("MONOCHROME")


def _as_shown(dataset, count: int) -> Callable[[np.ndarray, int | None], np.ndarray]:
    """How stored pixels are shown: called with a frame and its index, or with the whole pixel array and
    None. Palette colour through its table, RGB (and YBR, which pydicom converts) as stored, grey through
    the file's rescale and window, an enhanced file's per frame (:func:`_frame_transforms`)."""
    from pydicom.pixels import apply_color_lut

    photometric = _photometric(dataset)
    if photometric == "PALETTE COLOR":
        return lambda pixels, _index: np.asarray(apply_color_lut(pixels, dataset))
    if _is_colour(dataset):
        return lambda pixels, _index: np.asarray(pixels)
    inverted = photometric == "MONOCHROME1"
    if not any(sequence in dataset for sequence in _FUNCTIONAL_GROUPS):
        return lambda pixels, _index: _grey_as_displayed(pixels, dataset, inverted)
    views = _frame_transforms(dataset, count)

    def per_frame(pixels: np.ndarray, index: int | None) -> np.ndarray:
        if index is not None:
            return _grey_as_displayed(pixels, views[index], inverted)
        frames = pixels if count > 1 else pixels[None]
        shown = np.stack([_grey_as_displayed(frame, view, inverted) for frame, view in zip(frames, views, strict=True)])
        return shown if count > 1 else shown[0]

    return per_frame


@dataclass(frozen=True)
class DicomFrames:
    """A multi-frame DICOM file's frames as a viewer shows them (as :func:`load_dicom` shows the whole
    file), decoded one at a time by pydicom, so batch prediction never holds a long loop whole."""

    path: Path
    header: Any  # the file parsed up to its pixel data: how to show the frames, and how many there are

    @property
    def count(self) -> int:
        return frame_count(self.header)

    def __iter__(self) -> Iterator[np.ndarray]:
        from pydicom.pixels import iter_pixels

        try:
            shown = _as_shown(self.header, self.count)
        except Exception as exc:
            raise corrupt(self.path, exc) from exc
        # pydicom reads a path frame by frame; a file without the preamble only parses when forced
        source = self.path if has_dicom_marker(self.path) else read_dataset(self.path)
        done = 0
        try:
            for frame in iter_pixels(source):
                yield shown(frame, done)
                done += 1
        except InputError:
            raise
        except Exception as exc:
            raise _undecodable(self.path, self.header, exc) from exc


def dicom_frames(path: str | Path) -> DicomFrames | None:
    """A multi-frame DICOM image file as :class:`DicomFrames`; None for anything else (one frame, no
    image, not readable: :func:`load_dicom` then reads it, or names what is wrong)."""
    path = Path(path)
    try:
        header = read_dataset(path, pixels=False)
        if frame_count(header) < 2 or str(header.get("Modality", "")) == "SEG":  # (no pixel data in a header)
            return None
    except Exception:
        return None
    return DicomFrames(path, header)


def position_along_normal(orientation: Sequence[float], position: Sequence[float]) -> float:
    """Where a slice lies along its normal (ImageOrientationPatient's row × column direction), from its
    ImagePositionPatient: the key DICOM viewers sort a volume's slices by."""
    cosines = np.asarray(orientation, dtype=float)
    return float(np.dot(np.cross(cosines[:3], cosines[3:]), np.asarray(position, dtype=float)))


def _frame_spacing(dataset, count: int) -> float | None:
    """The median distance between an enhanced file's consecutive frames along the slice normal (per-frame
    PlanePositionSequence; orientation per frame or shared); None for a cine loop, a frame without a
    position, or frames not stored in one direction (frames are never reordered: a SEG refers to them
    by their index in the file)."""
    per_frame = list(dataset.get("PerFrameFunctionalGroupsSequence") or [])
    if count < 2 or len(per_frame) != count:
        return None
    shared = _shared_group(dataset)
    try:
        keys = [position_along_normal(
            (_macro(group, "PlaneOrientationSequence") or _macro(shared, "PlaneOrientationSequence"))
            .ImageOrientationPatient, _macro(group, "PlanePositionSequence").ImagePositionPatient)
            for group in per_frame]
    except (AttributeError, ValueError, TypeError):
        return None
    gaps = np.diff(keys)
    return float(np.median(np.abs(gaps))) if np.all(gaps > 0) or np.all(gaps < 0) else None


_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
# the functional-group macros that hold a frame's grey transforms: rescale (modality), window (VOI)
_TRANSFORM_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_TRANSFORM_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
                       "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
                       "VOILUTSequence")


def frame_count(dataset: Dataset) -> int:
    """NumberOfFrames, 1 when absent or 0 (pydicom's rule)."""
    from pydicom.pixels.utils import get_nr_frames

    return get_nr_frames(dataset, warn=False)


def _shared_group(dataset):
    """An enhanced file's SharedFunctionalGroupsSequence item, or None."""
    return (dataset.get("SharedFunctionalGroupsSequence") or [None])[0]


def _macro(group, macro: str):
    """A functional-group item's ``macro`` (its first item), or None."""
    sequence = None if group is None else group.get(macro)
    return sequence[0] if sequence else None


def _frame_transforms(dataset, count: int) -> list:
    """For an enhanced multi-frame file, one flat dataset per frame with the attributes pydicom's
    rescale and window functions read: the file's own, overridden by the shared functional groups,
    overridden by that frame's (the standard's precedence, PS3.3 C.7.6.16)."""
    from pydicom.dataset import Dataset

    shared = _shared_group(dataset)
    per_frame = list(dataset.get("PerFrameFunctionalGroupsSequence") or [])
    views = []
    for index in range(count):
        view = Dataset()
        for keyword in _TRANSFORM_KEYWORDS:
            if keyword in dataset:
                view[keyword] = dataset[keyword]
        for group in (shared, per_frame[index] if index < len(per_frame) else None):
            for macro in _TRANSFORM_MACROS:
                view.update(_macro(group, macro) or {})
        views.append(view)
    return views


def _grey_as_displayed(array: np.ndarray, dataset, inverted: bool) -> np.ndarray:
    """Apply the transforms the file asks for; the stored integers when it asks for none. A windowed
    image is returned in [0, 1] over the window's whole output range (not the image's own min–max,
    which would stretch a window the image does not fill)."""
    rescaled = "ModalityLUTSequence" in dataset or (
        float(dataset.get("RescaleSlope", 1) or 1) != 1 or float(dataset.get("RescaleIntercept", 0) or 0) != 0)
    windowed = "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset)
    if not (rescaled or windowed or inverted):
        return np.asarray(array)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(array, dataset) if rescaled else array  # a modality LUT indexes the stored integers
    if windowed:
        lo, hi = _voi_output_range(dataset)
        values = (np.asarray(apply_voi_lut(values, dataset), dtype=np.float64) - lo) / max(hi - lo, 1e-12)
        values = np.clip(values, 0.0, 1.0)
        if inverted:
            values = 1.0 - values
    else:
        values = np.asarray(values, dtype=np.float64)
        if inverted:
            values = values.max() + values.min() - values
    return values.astype(np.float32)


def _voi_output_range(dataset) -> tuple[float, float]:
    """What the VOI transform gives at the two ends of its input: a VOI LUT's first and last entries,
    or a window's black and white levels (which pydicom derives from the bit depth and rescale)."""
    if "VOILUTSequence" in dataset:
        entries, first = dataset.VOILUTSequence[0].LUTDescriptor[:2]
        ends = np.array([first, first + (entries or 2**16) - 1], dtype=np.int64)
    else:
        ends = np.array([-np.inf, np.inf])
    from pydicom.pixels import apply_voi_lut

    out = np.asarray(apply_voi_lut(ends, dataset), dtype=np.float64)
    return float(out.min()), float(out.max())
