"""Image reading, validation and normalisation: each bad input names its file and reason."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from PIL import Image

from fedmix_engine.data.imageio import holds_colour, normalise_image, read_image, tiff_stack, validate_mask
from fedmix_engine.errors import InputError


def test_reads_tiff_png_8_and_16_bit_grey_and_rgb(tmp_path: Path, rng: np.random.Generator) -> None:
    grey16 = rng.integers(0, 4096, size=(32, 40), dtype=np.uint16)
    rgb8 = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", grey16)
    iio.imwrite(tmp_path / "b.png", rgb8)
    assert read_image(tmp_path / "a.tif").dtype == np.uint16
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), rgb8)


def test_compressed_tiffs_as_scanners_and_image_editors_write_them_are_read(tmp_path: Path,
                                                                             rng: np.random.Generator) -> None:
    """LZW (Photoshop's, GIMP's and many scanners' default) and JPEG-in-TIFF were refused as 'unreadable or
    corrupt image file (<COMPRESSION.LZW: 5> requires the 'imagecodecs' package)': tifffile decodes them
    with imagecodecs, which the engine now depends on. Written here by Pillow, as another program would."""
    from fedmix_engine.data.imageio import read_mask_file

    scan = rng.integers(0, 256, size=(48, 64), dtype=np.uint8)
    smooth = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))  # JPEG keeps a smooth image close
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:40] = 1
    for compression in ("tiff_lzw", "tiff_adobe_deflate", "packbits"):
        Image.fromarray(scan).save(tmp_path / f"{compression}.tif", compression=compression)
        np.testing.assert_array_equal(read_image(tmp_path / f"{compression}.tif"), scan)
    Image.fromarray(mask).save(tmp_path / "mask.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(read_mask_file(tmp_path / "mask.tif", 1), mask)
    Image.fromarray(smooth).save(tmp_path / "jpeg.tif", compression="jpeg", quality=95)
    assert np.abs(read_image(tmp_path / "jpeg.tif").astype(int) - smooth).max() <= 3


def test_corrupt_tiff_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "case-07.tif"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 10)
    with pytest.raises(InputError, match=r"case-07\.tif: unreadable or corrupt"):
        read_image(bad)


def test_truncated_png_names_the_file(tmp_path: Path, grey_image: np.ndarray) -> None:
    path = tmp_path / "cut.png"
    iio.imwrite(path, grey_image)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match=r"cut\.png: unreadable or corrupt"):
        read_image(path)


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")  # imageio trying its plugins
def test_an_empty_file_and_a_file_that_is_not_its_suffix_are_said_plainly(tmp_path: Path) -> None:
    """A 0-byte PNG (a copy that did not finish) was 'Could not find a backend to open … the following plugins
    might add capable backends: opencv: pip install imageio[opencv]', five lines advising an install that
    cannot help; a text file named .jpg was 'ValueError: need at least one array to stack'."""
    empty, text = tmp_path / "scan.png", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image")
    with pytest.raises(InputError) as said:
        read_image(empty)
    assert str(said.value) == (f"{empty}: is empty (0 bytes): a copy or a download that did not finish, or a "
                               "file never written; copy it again")
    with pytest.raises(InputError) as said:
        read_image(text)
    assert str(said.value) == (f"{text}: unreadable or corrupt image file: its content is not a JPEG image "
                               "(damaged, or another kind of file with this suffix)")
    assert "\n" not in str(said.value) and "pip install" not in str(said.value)


def test_3d_stack_is_refused_with_advice(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((12, 64, 64), np.uint8))
    with pytest.raises(InputError, match=r"stack\.tif: 3-D stack \(12×64×64\).*split the stack"):
        read_image(tmp_path / "stack.tif")


def test_4d_and_tiny_and_nan_and_unsupported(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((2, 3, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match=r"t\.tif: 4-D array"):
        read_image(tmp_path / "t.tif")
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"small\.tif: .*too small"):
        read_image(tmp_path / "small.tif")
    nan = np.zeros((16, 16), np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(InputError, match=r"nan\.tif: image contains NaN"):
        read_image(tmp_path / "nan.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: unsupported file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=r"missing\.tif: file not found"):
        read_image(tmp_path / "missing.tif")


def test_a_black_and_white_file_is_said_to_look_like_a_mask(tmp_path: Path, lesion_mask: np.ndarray) -> None:
    """A 1-bit file (a drawing tool's mask in the images folder) was refused as 'pixel type bool is not
    supported', which told a clinic nothing of what to do."""
    tifffile.imwrite(tmp_path / "lesion.tif", lesion_mask.astype(bool))
    Image.fromarray(lesion_mask.astype(bool)).save(tmp_path / "lesion.png")
    for name in ("lesion.tif", "lesion.png"):
        with pytest.raises(InputError, match=rf"{name.replace('.', '[.]')}: 1-bit \(black-and-white\) pixels: a mask, "
                                             r"not an image\? Import masks as masks \(site import --masks"):
            read_image(tmp_path / name)


def test_a_whole_slide_sized_image_is_refused_from_its_header_before_it_is_decoded(tmp_path: Path) -> None:
    """A slide scanner's tiled TIFF holds gigapixels in a small file; dropped into a folder of scans it was
    decoded whole (20480² here: 400 MB from 0.4 MB; a real slide's 100000² takes all the memory, and the
    import or napari with it). A PNG past Pillow's limit was "unreadable or corrupt"."""
    import tracemalloc

    from PIL import Image

    from fedmix_engine.data.imageio import MAX_PIXELS, validate_image

    side, tile = 20480, np.zeros((1024, 1024), np.uint8)
    slide = tmp_path / "slide 12.tif"
    tifffile.imwrite(slide, (tile for _ in range((side // 1024) ** 2)), shape=(side, side), dtype=np.uint8,
                     tile=(1024, 1024), compression="zlib")
    assert slide.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"slide 12\.tif: image of 20480×20480 pixels is too large \(at most "
                                             r"178,956,970 pixels, about 13000×13000\): a whole-slide or stitched "
                                             r"image; export tiles"):
            read_image(slide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000, f"decoded: {peak / 1e6:.0f} MB"

    Image.new("L", (17000, 17000)).save(tmp_path / "stitched.png")  # over Pillow's own limit
    with pytest.raises(InputError, match=r"stitched\.png: image of 289,000,000 pixels is too large"):
        read_image(tmp_path / "stitched.png")
    wide = np.broadcast_to(np.uint8(0), (8, MAX_PIXELS // 8 + 1))  # an array (a napari layer): no memory
    with pytest.raises(InputError, match=r"layer: image of 8×22369622 pixels is too large"):
        validate_image(wide, "layer")
    assert validate_image(np.broadcast_to(np.uint8(0), (8, MAX_PIXELS // 8)), "layer").shape == (8, MAX_PIXELS // 8)


def test_normalisation_rules() -> None:
    u8 = np.array([[0, 255], [51, 102]], np.uint8).repeat(8, 0).repeat(8, 1)
    np.testing.assert_allclose(normalise_image(u8)[0, 0, 0], 0.0)
    np.testing.assert_allclose(normalise_image(u8).max(), 1.0)
    assert normalise_image(u8).shape == (1, 16, 16)
    u16 = (u8.astype(np.uint16) * 4 + 100)  # 12-bit-like data: min–max, not /65535
    out = normalise_image(u16)
    assert out.min() == 0.0 and out.max() == 1.0
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = 255  # pure green → luma 0.587
    np.testing.assert_allclose(normalise_image(rgb)[0], 0.587, atol=1e-6)
    assert normalise_image(rgb, channels=3).shape == (3, 16, 16)
    assert normalise_image(u8, channels=3).shape == (3, 16, 16)
    already = np.full((16, 16), 0.25, np.float32)
    np.testing.assert_allclose(normalise_image(already), 0.25)


def test_colour_is_told_from_grey_saved_as_rgb_and_from_coloured_calipers(rng: np.random.Generator) -> None:
    """A grey model sees a colour image's luma only; batch prediction notes such images, so this must tell a
    Doppler image (grey with a colour flow region) from grey saved as RGB, nearly so by a lossy codec, or a
    grey scan with a little coloured text; any pixel type, and an image larger than the million pixels it reads."""
    grey = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    assert not holds_colour(grey) and not holds_colour(as_rgb)
    near = np.clip(as_rgb + rng.integers(-6, 7, as_rgb.shape), 0, 255).astype(np.uint8)  # a lossy codec's
    assert not holds_colour(near)
    calipers = as_rgb.copy()
    calipers[4:9, 10:30] = (255, 255, 0)  # 100 yellow pixels: 0.6 % of the image
    assert not holds_colour(calipers)
    doppler = as_rgb.copy()
    doppler[40:60, 50:70] = (200, 30, 40)  # a 20×20 flow region: 2.4 %
    assert holds_colour(doppler)
    assert holds_colour(doppler.astype(np.uint16) * 257) and holds_colour(doppler.astype(np.float32) / 255)
    assert not holds_colour(np.repeat(as_rgb, 12, axis=0).repeat(12, axis=1))  # 2.4 M pixels, read on a grid
    assert holds_colour(np.repeat(doppler, 12, axis=0).repeat(12, axis=1))


def test_mask_validation_names_the_mask(lesion_mask: np.ndarray) -> None:
    with pytest.raises(InputError, match=r"m\.tif: mask shape 48×60 ≠ image shape 48×64"):
        validate_mask(lesion_mask[:, :60], (48, 64), 1, "m.tif")
    with pytest.raises(InputError, match=r"m\.tif: mask values 0\.\.3 outside the class range 0\.\.2"):
        validate_mask(lesion_mask * 3, (48, 64), 2, "m.tif")
    assert validate_mask(lesion_mask * 255, (48, 64), 1, "m.tif").max() == 1  # 0/255 binary masks are common
    # and 0/65535 from 16-bit tools (refused as 'values 0..65535 outside the class range 0..1')
    white16 = validate_mask(lesion_mask.astype(np.uint16) * 65535, (48, 64), 1, "m.tif")
    assert white16.dtype == np.uint8 and np.array_equal(white16, lesion_mask)
    with pytest.raises(InputError, match="whole class numbers"):
        validate_mask(lesion_mask * 0.5, (48, 64), 1, "m.tif")
    with pytest.raises(InputError, match=r"m\.tif: mask must be 2-D \(H×W\), got shape \(2, 48, 64\)"):
        validate_mask(np.stack([lesion_mask, lesion_mask]), (48, 64), 1, "m.tif")  # a stack's masks, not one
    with pytest.raises(InputError, match=r"m\.tif: mask pixel type complex64 is not supported"):
        validate_mask(lesion_mask.astype(np.complex64), (48, 64), 1, "m.tif")
    grey_as_rgba = np.repeat(lesion_mask[..., None], 4, axis=-1)
    grey_as_rgba[..., 3] = 255  # opaque: a grey mask saved as RGBA, which is no colour mask
    np.testing.assert_array_equal(validate_mask(grey_as_rgba, (48, 64), 1, "m.tif"), lesion_mask)
    np.testing.assert_array_equal(validate_mask(lesion_mask.astype(bool), (48, 64), 1, "m.tif"), lesion_mask)


def test_an_input_error_crosses_a_process_boundary_whole(tmp_path: Path) -> None:
    """The benchmark's worker pool pickles a worker's error back to the parent; it must arrive intact."""
    import pickle

    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 16, 16), np.uint8))
    with pytest.raises(InputError) as raised:
        read_image(tmp_path / "stack.tif")
    arrived = pickle.loads(pickle.dumps(raised.value))
    assert type(arrived) is InputError and str(arrived) == str(raised.value)
    assert (arrived.where, arrived.reason) == (raised.value.where, raised.value.reason)


def test_singleton_axes_and_grey_alpha_are_one_2d_image(tmp_path: Path, rng: np.random.Generator) -> None:
    """ImageJ and NumPy save a 2-D image as 1×H×W or H×W×1, and a grey PNG may carry alpha (H×W×2)."""
    grey = rng.integers(0, 256, size=(32, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "leading.tif", grey[None], photometric="minisblack")
    tifffile.imwrite(tmp_path / "both.tif", grey[None, None], photometric="minisblack")
    tifffile.imwrite(tmp_path / "trailing.tif", grey[..., None])
    iio.imwrite(tmp_path / "alpha.png", np.stack([grey, np.full_like(grey, 255)], axis=-1))
    assert [tifffile.imread(tmp_path / n).ndim for n in ("leading.tif", "both.tif", "trailing.tif")] == [3, 4, 3]
    assert iio.imread(tmp_path / "alpha.png").shape == (32, 40, 2)
    for name in ("leading.tif", "both.tif", "trailing.tif", "alpha.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name), grey, err_msg=name)
    colour = rng.integers(0, 256, size=(1, 32, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "colour.tif"), colour[0])
    # a TIFF's second channel may be data, not alpha: refused rather than dropped; a real stack says so
    tifffile.imwrite(tmp_path / "pair.tif", np.zeros((32, 40, 2), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(InputError, match=r"pair\.tif: two-channel image \(32, 40, 2\)"):
        read_image(tmp_path / "pair.tif")
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 1, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match=r"two\.tif: 4-D array \(2×1×32×32\)"):
        read_image(tmp_path / "two.tif")


def test_an_rgb_tiff_stored_as_planes_is_read_as_colour(tmp_path: Path, rng: np.random.Generator) -> None:
    """Photoshop's 'Per Channel' TIFFs and some scanners' store R, G and B as planes (PlanarConfiguration 2),
    which tifffile reads as 3×H×W: the file says they are colour, so the image is the same as stored per pixel.
    Planes the file does not call R, G, B are still refused, naming the file."""
    colour = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planes.tif", np.moveaxis(colour, -1, 0), photometric="rgb", planarconfig="separate")
    assert tifffile.imread(tmp_path / "planes.tif").shape == (3, 32, 40)
    np.testing.assert_array_equal(read_image(tmp_path / "planes.tif"), colour)
    loop = rng.integers(0, 256, size=(4, 32, 40, 3), dtype=np.uint8)  # a colour cine loop, each page as planes
    tifffile.imwrite(tmp_path / "loop.tif", np.moveaxis(loop, -1, 1), photometric="rgb", planarconfig="separate")
    stack = tiff_stack(tmp_path / "loop.tif")  # prediction reads it a page at a time, each page as H×W×3
    assert stack is not None and len(stack) == 4
    np.testing.assert_array_equal(np.stack(list(stack)), loop)
    tifffile.imwrite(tmp_path / "grey-planes.tif", np.moveaxis(colour, -1, 0), photometric="minisblack",
                     planarconfig="separate", extrasamples=["unspecified"] * 2)
    with pytest.raises(InputError, match=r"grey-planes\.tif: channels-first colour image \(3, 32, 40\)"):
        read_image(tmp_path / "grey-planes.tif")


def test_mask_with_a_singleton_axis_is_accepted(lesion_mask: np.ndarray) -> None:
    for shaped in (lesion_mask[None], lesion_mask[..., None]):
        np.testing.assert_array_equal(validate_mask(shaped, (48, 64), 1, "m.tif"), lesion_mask)


def test_a_one_class_jpeg_mask_is_thresholded_and_a_grey_or_multiclass_one_refused(tmp_path: Path) -> None:
    """Kvasir-SEG stores its 0/255 masks as JPEG: the edges hold every value between after compression."""
    from fedmix_engine.data.imageio import read_mask_file

    truth = np.zeros((60, 80), np.uint8)
    truth[10:40, 21:53] = 255
    iio.imwrite(tmp_path / "polyp.jpg", np.repeat(truth[..., None], 3, axis=-1), quality=75)
    assert len(np.unique(iio.imread(tmp_path / "polyp.jpg"))) > 10, "the file really is smeared"
    mask = validate_mask(read_mask_file(tmp_path / "polyp.jpg", 1), (60, 80), 1, "polyp.jpg")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert np.sum(mask != (truth > 0)) <= 0.01 * truth.size
    with pytest.raises(InputError, match=r"polyp\.jpg: a mask with several classes must be saved lossless"):
        read_mask_file(tmp_path / "polyp.jpg", 2)
    ramp = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (60, 1))
    iio.imwrite(tmp_path / "photo.jpg", ramp)
    with pytest.raises(InputError, match=r"photo\.jpg: JPEG mask is not black and white \(\d+% of its pixels"):
        read_mask_file(tmp_path / "photo.jpg", 1)
    iio.imwrite(tmp_path / "ones.jpg", (truth > 0).astype(np.uint8))  # 0/1: thresholding would erase it
    with pytest.raises(InputError, match=r"ones\.jpg: JPEG mask has no white \(its brightest value is \d\)"):
        read_mask_file(tmp_path / "ones.jpg", 1)
    iio.imwrite(tmp_path / "none.jpg", np.zeros((60, 80), np.uint8))  # all black: a lesion-free image's mask
    assert not read_mask_file(tmp_path / "none.jpg", 1).any()
    iio.imwrite(tmp_path / "exact.png", truth)  # lossless files are read as stored
    np.testing.assert_array_equal(read_mask_file(tmp_path / "exact.png", 1), truth)


def test_a_palette_png_mask_gives_its_indices_not_its_colours(tmp_path: Path) -> None:
    """Indexed PNGs are a common way to store class masks; a reader turns them into their display colours."""
    from PIL import Image

    from fedmix_engine.data.imageio import read_mask_file

    labels = np.zeros((40, 50), np.uint8)
    labels[5:20, 5:30], labels[25:35, 30:45] = 1, 2
    indexed = Image.fromarray(labels, mode="P")
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 253 * 3)
    indexed.save(tmp_path / "case_mask.png")
    assert iio.imread(tmp_path / "case_mask.png").shape == (40, 50, 3), "what a plain read gives"
    np.testing.assert_array_equal(validate_mask(read_mask_file(tmp_path / "case_mask.png", 2), (40, 50), 2, "m"),
                                  labels)
    (tmp_path / "cut.png").write_bytes((tmp_path / "case_mask.png").read_bytes()[:60])
    with pytest.raises(InputError, match=r"cut\.png: unreadable or corrupt"):
        read_mask_file(tmp_path / "cut.png", 2)


def test_a_one_colour_mask_on_black_is_read_and_a_many_coloured_one_refused(tmp_path: Path,
                                                                             lesion_mask: np.ndarray) -> None:
    """Outline tools export a red (or any one colour) lesion on black; that is one class, unambiguous. Several
    colours need a colour-to-class key the file does not hold, so they are refused, not guessed."""
    from fedmix_engine.data.imageio import read_mask_file

    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 0] = lesion_mask * 200
    iio.imwrite(tmp_path / "red.png", red)
    np.testing.assert_array_equal(validate_mask(read_mask_file(tmp_path / "red.png", 1), (48, 64), 1, "m"),
                                  lesion_mask)
    opaque = np.dstack([red, np.full((48, 64), 255, np.uint8)])
    iio.imwrite(tmp_path / "rgba.png", opaque)
    np.testing.assert_array_equal(read_mask_file(tmp_path / "rgba.png", 1), lesion_mask)

    two = red.copy()
    two[30:40, 40:50] = (0, 255, 0)
    iio.imwrite(tmp_path / "two.png", two)
    for classes in (1, 2):  # a second colour is a second class, or noise: neither is guessed
        with pytest.raises(InputError, match=r"two\.png: colour mask with 3 colours.*indexed \(palette\) PNG"):
            validate_mask(read_mask_file(tmp_path / "two.png", classes), (48, 64), classes, tmp_path / "two.png")
    with pytest.raises(InputError, match=r"red\.png: colour mask with 2 colours"):
        validate_mask(read_mask_file(tmp_path / "red.png", 2), (48, 64), 2, tmp_path / "red.png")


def test_stray_mask_values_are_named(lesion_mask: np.ndarray) -> None:
    """"0..255 outside 0..1" does not say that 255 is fine in a 0/255 mask and the anti-aliased edge is not."""
    smeared = lesion_mask * 255
    smeared[10, 15:18] = (128, 64, 128)
    with pytest.raises(InputError, match=r"m: mask values 0\.\.255 outside 0 and 255 \(or 0 and 1\): 64, 128$"):
        validate_mask(smeared, (48, 64), 1, "m")
    smeared16 = lesion_mask.astype(np.uint16) * 65535
    smeared16[10, 15] = 32768
    with pytest.raises(InputError, match=r"outside 0 and 65535 \(or 0 and 1\): 32768$"):
        validate_mask(smeared16, (48, 64), 1, "m")
    many = (np.arange(48 * 64).reshape(48, 64) % 12).astype(np.uint8)
    with pytest.raises(InputError, match=r"range 0\.\.2 \(0 = background\): 3, 4, 5, 6, 7 and 4 more$"):
        validate_mask(many, (48, 64), 2, "m")
