"""Reading, validating and normalising 2-D images and masks: the only place that does it.

Accepted: TIFF (tifffile), PNG/JPEG/BMP (imageio), DICOM (pydicom, see :mod:`.dicom`: as a viewer
shows it); 8- or 16-bit integers or floats; grey
(H×W, or a grey PNG's H×W×2 with alpha dropped) or colour (H×W×3, H×W×4 with alpha dropped; an RGB
TIFF stored as planes, 3×H×W, is read as H×W×3 since the file says what its planes are).
Axes of length 1 are dropped first: ImageJ and NumPy often save one 2-D image as 1×H×W or H×W×1.
Refused with an :class:`InputError` naming the file: unreadable or corrupt files, 3-D stacks,
two-channel TIFFs, empty images, non-finite floats, images of more than :data:`MAX_PIXELS` (told from
the header, before decoding).

Normalisation (:func:`normalise_image`) maps every accepted image to float32 ``C×H×W`` in
[0, 1]:

- ``uint8``: divided by 255 (the scale of ultrasound and photographs is meaningful);
- other integer types (e.g. 12-bit data in 16-bit containers): per-image min–max, because
  the container's maximum says nothing about the detector's range;
- floats: per-image min–max unless already within [0, 1];
- colour to grey (``channels=1``) by ITU-R 601 luma; grey to colour (``channels=3``) by
  repetition.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmix_engine.atomic import atomic_open
from fedmix_engine.data.dicom import DICOM_SUFFIXES, is_dicom_path, load_dicom, read_dicom
from fedmix_engine.data.video import NOT_IMPORTED, VIDEO_SUFFIXES, is_video_path
from fedmix_engine.errors import InputError, first_names

_PLAIN_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")  # read by tifffile or imageio
IMAGE_SUFFIXES = (*_PLAIN_SUFFIXES, *DICOM_SUFFIXES)
PREDICTABLE_SUFFIXES = (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES)  # what batch prediction reads by its name
# Pillow's own limit for PNG and JPEG (twice its MAX_IMAGE_PIXELS: it refuses larger ones as decompression
# bombs), held for every format: ≈13377², far above a mammogram (≈5000×6000) or a camera's photo
MAX_PIXELS = 178_956_970
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_dicom_file(path: Path) -> bool:
    """Read as DICOM: a .dcm/.dicom file, or one with the DICOM marker and no TIFF/PNG/JPEG/BMP suffix."""
    return path.suffix.lower() not in _PLAIN_SUFFIXES and is_dicom_path(path)


def is_image_path(path: Path) -> bool:
    """A file the engine reads as an image: by its suffix, or a DICOM file named otherwise (PACS exports)."""
    return path.suffix.lower() in _PLAIN_SUFFIXES or is_dicom_file(path)


def image_stem(path: str | Path) -> str:
    """A file's name without its image suffix: ``case1`` for ``case1.png``, but all of
    ``1.2.840.113619.2.55.1`` for a DICOM file named by its UID, whose last number is not a suffix."""
    path = Path(path)
    return path.stem if path.suffix.lower() in PREDICTABLE_SUFFIXES else path.name


def is_predictable_path(path: Path) -> bool:
    """A file batch prediction reads: an image (a stack among them) or a video, which a site does not hold."""
    return is_image_path(path) or is_video_path(path)


def visible_files(folder: Path) -> Iterator[Path]:
    """The files at the top of ``folder`` but hidden ones, in name order as paths sort (case-blind on Windows),
    told from folders by the listing itself: no stat per file, a round trip each on a network share. Listed
    now; each path made as it is asked for."""
    with os.scandir(folder) as entries:
        names = sorted((e.name for e in entries if not e.name.startswith(".") and e.is_file()), key=os.path.normcase)
    return (folder / name for name in names)


def iter_image_files(folder: Path, videos: bool = False) -> Iterator[Path]:
    """:func:`image_files` one at a time: a question about the first (is there an image? a DICOM file?) stops
    there, as each file without an image suffix is read to tell whether it is DICOM."""
    wanted = is_predictable_path if videos else is_image_path
    return (path for path in visible_files(folder) if wanted(path))


def image_files(folder: Path, videos: bool = False) -> list[Path]:
    """The image files at the top of ``folder`` (sub-folders are not searched; hidden files are skipped),
    and its videos too with ``videos`` (batch prediction reads them; a site does not)."""
    return list(iter_image_files(folder, videos))


def no_images_reason(folder: Path) -> str:
    """Why a folder has no image files to read, from what it holds instead: other file types (NIfTI
    volumes, say) or sub-folders, which are not searched."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    suffixes = Counter(p.suffix.lower() or "no suffix" for p in entries if p.is_file())
    subfolders = sorted(p.name for p in entries if p.is_dir())
    reason = f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
    videos = sum(count for suffix, count in suffixes.items() if suffix in VIDEO_SUFFIXES)
    if videos:
        reason += f"; it holds {videos} video(s): {NOT_IMPORTED}"
    elif suffixes:
        found = ", ".join(f"{count} {suffix}" for suffix, count in suffixes.most_common(3))
        reason += f"; it holds {found} file(s): export them as TIFF or PNG"
    if subfolders:
        reason += f"; sub-folders ({first_names(subfolders)}) are not searched: give each one"
    return reason


def read_array(path: str | Path) -> np.ndarray:
    """Read an image file as stored (no conversion); refuse what cannot be read."""
    path = Path(path)
    if is_dicom_file(path):
        return read_dicom(path)
    return _read_stored(path)[0]


def _read_stored(path: Path) -> tuple[np.ndarray, str]:
    """A non-DICOM image file as stored, and its axes: tifffile's for a TIFF (YX, YXS for colour
    samples, a planar RGB page's too; SYX other channels first, TYX, …), else YX or YXS by the shape."""
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    if is_video_path(path):
        raise InputError(path, NOT_IMPORTED)
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(path, f"unsupported file type '{suffix}'; use one of {', '.join(IMAGE_SUFFIXES)} "
                               "(or a DICOM file without suffix)")
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tiff:  # what tifffile.imread reads: the first series
                series = tiff.series[0]
                if "Y" in series.axes and "X" in series.axes:  # before decoding: a slide scanner's gigapixels
                    check_size(path, series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")])
                array, axes = series.asarray(), series.axes
                if _planar_colour(series.keyframe):
                    array, axes = np.moveaxis(array, -3, -1), axes[:-3] + "YXS"
        else:
            import imageio.v3 as iio
            from PIL import Image

            try:
                with Image.open(path) as header:  # the header only, before decoding
                    check_size(path, header.height, header.width)
            except Image.DecompressionBombError as exc:  # over MAX_PIXELS: Pillow refuses to open it at all
                counted = re.search(r"\((\d+) pixels\)", str(exc))
                raise _too_large(path, f"{int(counted[1]):,} pixels" if counted else f"over {MAX_PIXELS:,} pixels") \
                    from None
            array = iio.imread(path)
            if array.ndim == 3 and array.shape[-1] == 2:
                array = array[..., 0]  # PNG's grey + alpha mode: the format says the second channel is alpha
            axes = "YXS" if array.ndim == 3 else "YX"
    except InputError:
        raise
    except Exception as exc:  # the readers raise many types for corrupt files
        raise _unreadable(path, exc) from exc
    array = np.asarray(array)
    if array.size == 0:
        raise InputError(path, "unreadable or corrupt image file (no pixel data)")
    return array, axes


def _planar_colour(page) -> bool:
    """A TIFF page that stores its colour as planes (PlanarConfiguration 2: Photoshop's 'Per Channel', some
    scanners), which tifffile reads samples first (SYX). The file says they are R, G, B, so they are moved
    last like any colour image's, not refused as an array that might be three grey frames."""
    import tifffile

    return page.photometric == tifffile.PHOTOMETRIC.RGB and page.axes.endswith("SYX")


# how each format's files begin: a file that begins otherwise is not that format, whatever its suffix says
_SIGNATURES = {".png": ("PNG", (b"\x89PNG\r\n\x1a\n",)), ".jpg": ("JPEG", (b"\xff\xd8\xff",)),
               ".jpeg": ("JPEG", (b"\xff\xd8\xff",)), ".bmp": ("BMP", (b"BM",)),
               ".tif": ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
               ".tiff": ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))}


def _unreadable(path: Path, exc: Exception) -> InputError:
    """Why a file the readers failed on cannot be read, in a line: an empty file, or one whose content is
    not the format its suffix names, said so (imageio answered both with advice to install OpenCV, or
    'need at least one array to stack'); else the reader's first line."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return InputError(path, f"cannot be read ({error.strerror or error})")
    if not head:
        return InputError(path, "is empty (0 bytes): a copy or a download that did not finish, or a file never "
                                "written; copy it again")
    name, starts = _SIGNATURES.get(path.suffix.lower(), (None, ()))
    if name is not None and not head.startswith(starts):
        return InputError(path, f"unreadable or corrupt image file: its content is not a {name} image (damaged, "
                                "or another kind of file with this suffix)")
    said = next(iter(str(exc).strip().splitlines()), "")
    return InputError(path, f"unreadable or corrupt image file ({type(exc).__name__}{': ' + said if said else ''})")


def _without_length_one_axes(array: np.ndarray) -> np.ndarray:
    """1×H×W, H×W×1 or 1×1×H×W is one 2-D image; keep the array as stored if dropping would leave < 2 axes."""
    if array.ndim <= 2:
        return array
    squeezed = np.squeeze(array)
    return squeezed if squeezed.ndim >= 2 else array


def check_size(where: str | Path, height: int, width: int) -> None:
    """Refuse an image of more than :data:`MAX_PIXELS`, from its header where it has one: a whole-slide scan
    (gigapixels in a small tiled file) decoded whole takes all the memory, or the process with it."""
    if height * width > MAX_PIXELS:
        raise _too_large(where, f"{height}×{width} pixels")


def _too_large(where: str | Path, size: str) -> InputError:
    return InputError(where, f"image of {size} is too large (at most {MAX_PIXELS:,} pixels, about 13000×13000): "
                             "a whole-slide or stitched image; export tiles or a smaller copy of the region (QuPath, "
                             "OpenSlide) and use those")


def validate_image(array: np.ndarray, where: str | Path) -> np.ndarray:
    """Check that ``array`` is one 2-D image (grey or colour) and return it as H×W or H×W×3."""
    stored = np.asarray(array)
    numeric = np.issubdtype(stored.dtype, np.integer) or np.issubdtype(stored.dtype, np.floating)
    if stored.dtype == bool:  # a 1-bit (black-and-white) file: a mask saved by a drawing tool, taken for an image
        raise InputError(where, "1-bit (black-and-white) pixels: a mask, not an image? Import masks as masks "
                                "(site import --masks FOLDER, or named NAME_mask.png beside their image); an image "
                                "must be 8/16-bit integers or floats")
    if not numeric:
        raise InputError(where, f"pixel type {stored.dtype} is not supported; use 8/16-bit integers or floats")
    array = _without_length_one_axes(stored)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # drop alpha
    elif array.ndim == 3 and array.shape[-1] == 2:
        raise InputError(where, f"two-channel image {tuple(stored.shape)}; save it grey (H×W) or colour (H×W×3)")
    if array.ndim == 3 and array.shape[-1] == 3:
        pass
    elif array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] > 4:
        raise InputError(
            where, f"channels-first colour image {tuple(array.shape)}; save it channels-last (H×W×3)"
        )
    elif array.ndim != 2:
        shape = "×".join(str(s) for s in stored.shape)
        if stored.ndim == 3:
            reason = (f"3-D stack ({shape}); FedMix sites hold 2-D images — split the stack or import one slice")
        else:
            reason = f"{stored.ndim}-D array ({shape}); expected a 2-D grey (H×W) or colour (H×W×3) image"
        raise InputError(where, reason)
    if array.shape[0] < 8 or array.shape[1] < 8:
        raise InputError(where, f"image of {array.shape[0]}×{array.shape[1]} pixels is too small (min 8×8)")
    check_size(where, array.shape[0], array.shape[1])
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(where, "image contains NaN or infinite values")
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read and validate one 2-D image file (stored values, no normalisation)."""
    return validate_image(read_array(path), path)


@dataclass(frozen=True)
class TiffStack:
    """A multi-page TIFF whose pages are its frames (a time series, a z-stack; grey or RGB pages), read a
    page at a time, so batch prediction never holds a long stack whole."""

    path: Path
    leading: tuple[int, ...]  # the stack's axes before a page's (T, Z, …), to name a frame as napari does
    planar: bool = False  # RGB pages stored as planes: each page's samples are moved last (``_planar_colour``)

    def __len__(self) -> int:
        return int(np.prod(self.leading))

    def __iter__(self) -> Iterator[np.ndarray]:
        import tifffile

        done = 0
        try:
            with tifffile.TiffFile(self.path) as tiff:
                for page in tiff.series[0].pages:
                    pixels = page.asarray()
                    yield np.moveaxis(pixels, 0, -1) if self.planar else pixels
                    done += 1
        except Exception as exc:  # tifffile raises many types for a damaged page
            raise InputError(self.path, f"page {done} unreadable ({type(exc).__name__}: {exc})") from exc


def tiff_stack(path: str | Path) -> TiffStack | None:
    """The TIFF as a :class:`TiffStack` when each of its pages is a whole 2-D frame (grey, or colour
    samples per pixel or as RGB planes) and there are several; None otherwise (one page, other channels
    first, not a TIFF, not readable: :func:`read_frames` then reads it, or names what is wrong)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            page, pages = series.keyframe, len(series.pages)
            leading = tuple(n for n in series.shape[:len(series.shape) - len(page.shape)] if n > 1)
            planar = _planar_colour(page)
    except Exception:
        return None
    frame = page.shape[1:] if planar else page.shape[:2]
    if pages < 2 or not (planar or page.axes in ("YX", "YXS")) or min(frame) < 8 or int(np.prod(leading)) != pages:
        return None
    return TiffStack(path, leading, planar)


def read_frames(path: str | Path) -> tuple[np.ndarray, bool]:
    """A file's pixels for prediction: one 2-D image, validated, or a stack of 2-D frames (a multi-page
    TIFF, a multi-frame DICOM cine loop) as stored, whose frames the predictor validates one by one;
    and whether the last axis holds colour. Import takes one 2-D image only (:func:`read_image`)."""
    path = Path(path)
    axes = ""
    if is_dicom_file(path):
        image = load_dicom(path, frames=True)
        array, colour = image.pixels, image.colour
    else:
        array, axes = _read_stored(path)
        colour = axes.endswith("S")
        array = _without_length_one_axes(array)
    frame_axes = 3 if colour else 2
    frame = array.shape[-frame_axes:][:2]
    planar = not colour and "S" in axes  # channels-first colour (SYX) is not a stack of grey frames
    if array.ndim > frame_axes and min(frame) >= 8 and not planar:
        return array, colour
    image = validate_image(array, path)  # one image, or its refusal (an H×W×2 TIFF is not 48 frames of W×2)
    return image, image.ndim == 3


def exif_orientation(path: str | Path) -> int | None:
    """A photo's EXIF orientation when photo viewers and most annotation tools turn or mirror it (2–8; a
    phone or camera held sideways), else None (as stored, no orientation, not a photo format, or an
    unreadable header: the image was read all the same). The engine keeps the pixels as stored, as napari
    shows them: a mask drawn on the turned photo does not fit them (silently so on a square one), so an
    import and a batch prediction say which photos are turned."""
    if Path(path).suffix.lower() not in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
        return None
    from PIL import Image

    try:
        with Image.open(path) as photo:
            value = photo.getexif().get(0x0112, 1)
    except Exception:
        return None
    return value if isinstance(value, int) and 2 <= value <= 8 else None  # 1: as stored; others: not valid


def pixel_digest(array: np.ndarray) -> str:
    """SHA-256 of an image's pixels, shape and type: equal for copies of one image under other names or in
    other folders (a public dataset's duplicates, an image imported into two sites)."""
    import hashlib

    return hashlib.sha256(f"{array.shape}{array.dtype}".encode() + np.ascontiguousarray(array).tobytes()).hexdigest()


def normalise_image(array: np.ndarray, channels: int = 1) -> np.ndarray:
    """Map a validated image to float32 ``channels×H×W`` in [0, 1] (rules in the module docstring)."""
    if channels not in (1, 3):
        raise InputError("channels", f"must be 1 or 3, not {channels}")
    if array.dtype == np.uint8:
        image = array.astype(np.float32) / 255.0
    else:
        image = array.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        if np.issubdtype(array.dtype, np.integer) or lo < 0.0 or hi > 1.0:
            image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    if image.ndim == 3:  # H×W×3
        image = image @ _LUMA if channels == 1 else image
        image = image[None] if channels == 1 else np.moveaxis(image, -1, 0)
    else:
        image = image[None] if channels == 1 else np.repeat(image[None], 3, axis=0)
    return np.ascontiguousarray(image, dtype=np.float32)


# a colour image's share of pixels whose channels lie over a tenth of the range apart: a Doppler image's
# flow, an endoscopy or skin photo; not grey saved as RGB (equal channels, or nearly so by a lossy codec)
# nor a scanner's small coloured text and calipers on a grey image
COLOUR_SHARE = 0.01


def holds_colour(image: np.ndarray) -> bool:
    """Whether a validated image shows colour: over ``COLOUR_SHARE`` of its pixels have channels more than
    a tenth of the range apart. A grey model sees only a colour image's luma, so what its colour meant
    (Doppler flow) plays no part in its mask: prediction says so for such images, and an import into a
    grey site counts them. Read on a grid of about a million pixels at most."""
    if image.ndim != 3:
        return False
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 2**20)))
    rgb = normalise_image(image[::step, ::step], channels=3)
    return float((rgb.max(axis=0) - rgb.min(axis=0) > 0.1).mean()) > COLOUR_SHARE


LOSSY_SUFFIXES = (".jpg", ".jpeg")


def tiff_bytes(array: np.ndarray, spacing: tuple[float, float] | None = None) -> bytes:
    """A 2-D grey or H×W×3 colour array as a Deflate-compressed TIFF, the one way the engine writes
    images and masks (a stack's mask: :func:`tiff_pages`). Lossless and read by every TIFF reader
    (Fiji, PIL, OpenCV) without extra codecs; level 1, because masks shrink ~100× at any level while
    images gain little beyond it (speckle is noise) and higher levels cost up to 5× the time.
    ``spacing`` (row, column mm) goes into the resolution tags (``pixel_spacing``)."""
    import io

    import tifffile

    from fedmix_engine.data.pixel_spacing import tiff_resolution

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(array), photometric="rgb" if array.ndim == 3 else "minisblack",
                     **_TIFF_WRITE, **tiff_resolution(spacing))
    return buffer.getvalue()


_TIFF_WRITE = {"compression": "zlib", "compressionargs": {"level": 1}, "metadata": None}


@contextlib.contextmanager
def tiff_pages(path: str | Path, spacing: tuple[float, float] | None = None, leading: tuple[int, ...] = ()
               ) -> Iterator[Callable[[np.ndarray], None]]:
    """Write grey ``H×W`` pages to ``path`` one at a time, as :func:`tiff_bytes` writes one (a reader
    gets the stack F×H×W), so a long video's mask is never held whole; atomically: a run stopped
    half-way leaves no file, or the one that was there. ``spacing`` as for :func:`tiff_bytes`.
    ``leading``: the image's axes before its frames when there are several (T×Z of a time series of
    volumes), whose product the caller writes as pages; the first page then states the whole shape
    (tifffile's ``{"shape": …}`` description), so tifffile and napari read ``T×Z×H×W`` back and the
    mask lies over its image."""
    import tifffile

    from fedmix_engine.data.pixel_spacing import tiff_resolution

    options = {**_TIFF_WRITE, **tiff_resolution(spacing)}
    first = True

    def write(page: np.ndarray) -> None:
        nonlocal first
        shaped = {"description": json.dumps({"shape": [*leading, *page.shape]})} if first and len(leading) > 1 else {}
        tiff.write(np.ascontiguousarray(page), photometric="minisblack", **options, **shaped)
        first = False

    with atomic_open(path) as handle, tifffile.TiffWriter(handle) as tiff:
        yield write


def _palette_indices(path: Path) -> np.ndarray | None:
    """A palette PNG's or BMP's indices (a reader would turn them into its colours); None for any other
    file, and for one that cannot be read, which read_array then reports."""
    if path.suffix.lower() not in (".png", ".bmp"):
        return None
    try:
        import imageio.v3 as iio

        if iio.immeta(path).get("mode") != "P":
            return None
        return np.asarray(iio.imread(path, mode="P"))
    except Exception:  # unreadable: said by read_array with the reader's reason
        return None


def read_mask_file(path: Path, num_classes: int) -> np.ndarray:
    """A mask file's labels. As stored, with two exceptions: a palette ("indexed") PNG or BMP gives its
    indices, since its colours only show the classes; a one-class JPEG mask (Kvasir-SEG's), whose
    compression smears the 0/255 edges into every grey, is thresholded at 128 if it is still two-toned
    (≥ 95 % of its pixels within 32 of black or white). Check the result with :func:`validate_mask`."""
    if is_dicom_file(path):
        raise InputError(path, "DICOM masks (SEG, RT structure sets) are not read; save each mask as PNG or TIFF "
                               "with 0 = background and 1..C = classes")
    indices = _palette_indices(path)
    if indices is not None:
        return indices
    array = read_array(path)
    if path.suffix.lower() not in LOSSY_SUFFIXES:
        return _one_colour_on_black(array, num_classes)
    if num_classes != 1:
        raise InputError(path, "a mask with several classes must be saved lossless (PNG or TIFF): JPEG "
                               "compression changes its class numbers")
    grey = _without_length_one_axes(array).astype(np.float32)
    if grey.ndim == 3 and grey.shape[-1] in (3, 4):
        grey = grey[..., :3].mean(axis=-1)
    if grey.ndim != 2:
        return array  # not one 2-D mask: validate_mask says so
    two_toned = float(np.mean((grey <= 32) | (grey >= 223)))
    if two_toned < 0.95:
        raise InputError(path, f"JPEG mask is not black and white ({1 - two_toned:.0%} of its pixels are grey); "
                               "save masks as PNG or TIFF")
    if 0 < grey.max() < 128:  # a 0/1 mask saved as JPEG would read as "no lesion": refused, not guessed
        raise InputError(path, f"JPEG mask has no white (its brightest value is {grey.max():.0f}); a mask "
                               "marking the lesion 1 must be saved as PNG or TIFF")
    return (grey >= 128).astype(np.uint8)


def _one_colour_on_black(array: np.ndarray, num_classes: int) -> np.ndarray:
    """A one-class colour mask drawn in a single colour on black (a red outline tool's export) as 0/1;
    anything else unchanged. A mask of several colours is left to :func:`validate_mask` to refuse, since
    which colour is which class cannot be guessed."""
    rgb = _without_length_one_axes(array)
    if num_classes != 1 or rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        return array
    if rgb.shape[-1] == 4 and not np.all(rgb[..., 3] == rgb[0, 0, 3]):
        return array  # transparency that varies may itself be the mask: not guessed
    colours = np.unique(rgb[..., :3].reshape(-1, 3), axis=0)
    if len(colours) != 2 or colours[0].any():  # sorted, so black comes first when present
        return array
    return rgb[..., :3].any(axis=-1).astype(np.uint8)


def validate_mask(mask: np.ndarray, image_shape: tuple[int, int], num_classes: int, where: str | Path) -> np.ndarray:
    """Check a label mask (0 = background, 1..C = classes) against its image; return it as uint8."""
    mask = _without_length_one_axes(np.asarray(mask))
    if mask.ndim == 3 and mask.shape[-1] in (3, 4) and np.all(mask[..., :3] == mask[..., :1]):
        mask = mask[..., 0]  # a grey mask saved as RGB(A)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        colours = len(np.unique(mask[..., :3].reshape(-1, 3), axis=0))
        raise InputError(where, f"colour mask with {colours} colours: which colour is which class cannot be "
                                "told; save it with one grey value per class (0 = background, 1..C) or as an "
                                "indexed (palette) PNG")
    if mask.ndim != 2:
        raise InputError(where, f"mask must be 2-D (H×W), got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != tuple(image_shape[:2]):
        raise InputError(
            where, f"mask shape {mask.shape[0]}×{mask.shape[1]} ≠ image shape {image_shape[0]}×{image_shape[1]}"
        )
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise InputError(where, "mask must hold whole class numbers (0 = background), not fractions")
    elif mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise InputError(where, f"mask pixel type {mask.dtype} is not supported")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi > num_classes:
        # a black-and-white mask (0/255, or 0/65535 from a 16-bit tool) is common; accepted for one class
        values = np.unique(mask).tolist()
        white = next((w for w in (255, 65535) if w in values), None) if num_classes == 1 else None
        if white is not None and set(values) <= {0, white}:
            return (mask > 0).astype(np.uint8)
        binary = white is not None  # meant as 0/white: the values that are neither are wrong
        stray = [v for v in values if (v not in (0, white) if binary else not 0 <= v <= num_classes)]
        listed = ", ".join(str(v) for v in stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        allowed = f"0 and {white} (or 0 and 1)" if binary else f"the class range 0..{num_classes} (0 = background)"
        raise InputError(where, f"mask values {lo}..{hi} outside {allowed}: {listed}")
    return mask.astype(np.uint8)
