"""DICOM images: read as a viewer shows them, imported from PACS-style folders, refused with reasons.

Real files from other software are pydicom's own test files, installed with it (no download): a CT
slice with rescale, an MR slice with a window (uncompressed, RLE, JPEG 2000), colour JPEG and YBR
secondary captures, a palette-colour ultrasound frame, a 30-frame ultrasound cine loop, a SEG, an
RT structure set, a JPEG-LS file and a truncated one. Files for cases those lack are written here.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_helpers import write_dicom, write_slice
from fedmix_engine.cli import main
from fedmix_engine.data.imageio import image_files, normalise_image, read_image, read_mask_file
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.errors import InputError


def bundled(name: str) -> Path:
    path = Path(get_testdata_file(name))
    assert path.is_file(), f"pydicom's test file {name} is installed with it"
    return path


def test_greyscale_dicom_is_read_as_the_viewer_shows_it(tmp_path: Path) -> None:
    ct = pydicom.dcmread(bundled("CT_small.dcm"))
    image = read_image(bundled("CT_small.dcm"))  # rescale intercept -1024: Hounsfield units, no window stored
    np.testing.assert_array_equal(image, ct.pixel_array.astype(np.float32) - 1024)

    mr = pydicom.dcmread(bundled("MR_small.dcm"))  # window centre 600, width 1600 (PS3.3 C.11.2.1.2.1, LINEAR)
    raw = mr.pixel_array.astype(np.float64)
    expected = np.clip((raw - (600 - 0.5)) / (1600 - 1) + 0.5, 0, 1)
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_allclose(read_image(bundled(name)), expected, atol=1e-6, err_msg=name)
    assert expected.min() > 0.2, "the window is not stretched to the image's own darkest pixel"
    np.testing.assert_allclose(normalise_image(read_image(bundled("MR_small.dcm")))[0], expected, atol=1e-6)

    ramp = np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (16, 1))  # an X-ray's MONOCHROME1: 0 shows white
    shown = read_image(write_dicom(tmp_path / "cr.dcm", ramp, "MONOCHROME1", WindowCenter=2000, WindowWidth=4000))
    assert shown[0, 0] == pytest.approx(1.0, abs=1e-3) and shown[0, -1] < 0.05
    ultrasound = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
    kept = read_image(write_dicom(tmp_path / "us.dcm", ultrasound))
    assert kept.dtype == np.uint8 and np.array_equal(kept, ultrasound), "8-bit frames keep the /255 scale"


def _group(**macros) -> pydicom.Dataset:
    """A functional-group item: each macro (e.g. FrameVOILUTSequence) a sequence of one item."""
    item = pydicom.Dataset()
    for macro, values in macros.items():
        inner = pydicom.Dataset()
        for keyword, value in values.items():
            setattr(inner, keyword, value)
        setattr(item, macro, pydicom.Sequence([inner]))
    return item


def test_an_enhanced_multi_frame_file_shows_each_frame_with_its_own_rescale_and_window(tmp_path: Path) -> None:
    """Enhanced CT/MR keep rescale, window and spacing in functional groups, not at the top level."""
    from fedmix_engine.data.dicom import load_dicom
    from fedmix_engine.data.dicom_series import series_of_file

    stored = np.stack([np.full((16, 20), v, np.uint16) for v in (1064, 1064, 864)])
    stored[:, 0, 0] = 2000  # far above every window: white
    shared = _group(FrameVOILUTSequence={"WindowCenter": 40, "WindowWidth": 400},  # a soft-tissue window, in HU
                    PixelMeasuresSequence={"PixelSpacing": [0.6, 0.7], "SliceThickness": 1.0})
    per_frame = [_group(PixelValueTransformationSequence={"RescaleSlope": 1, "RescaleIntercept": b,
                                                          "RescaleType": "HU"}) for b in (-1024, -1000, -1024)]
    path = write_dicom(tmp_path / "enhanced.dcm", stored, SharedFunctionalGroupsSequence=pydicom.Sequence([shared]),
                       PerFrameFunctionalGroupsSequence=pydicom.Sequence(per_frame))
    image = load_dicom(path, frames=True)
    assert image.pixels.shape == (3, 16, 20) and image.spacing == pytest.approx((0.6, 0.7))
    # HU 40 is the window's centre, HU 64 (another intercept) 24 HU brighter, HU −160 its black level
    assert [round(float(f[5, 5]), 3) for f in image.pixels] == pytest.approx([0.5, 0.56, 0.0], abs=0.003)
    assert image.pixels[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    volume = series_of_file(path)
    assert volume.spacing == pytest.approx((1.0, 0.6, 0.7)) and volume.pixels.dtype == np.float32
    assert volume.units == ("pixel", "mm", "mm"), "no frame positions: the frame axis has no distance"

    # with its frames' positions (here along an oblique normal) a volume is scaled along its frames too
    shared.PlaneOrientationSequence = pydicom.Sequence([pydicom.Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0.6, 0.8]  # normal (0, −0.8, 0.6)
    for group, z in zip(per_frame, (10.0, 12.5, 15.0), strict=True):
        group.PlanePositionSequence = pydicom.Sequence([pydicom.Dataset()])
        group.PlanePositionSequence[0].ImagePositionPatient = [-50.0, -0.8 * z, 0.6 * z]
    write_dicom(path, stored, SharedFunctionalGroupsSequence=pydicom.Sequence([shared]),
                PerFrameFunctionalGroupsSequence=pydicom.Sequence(per_frame))
    volume = series_of_file(path)
    assert volume.spacing == pytest.approx((2.5, 0.6, 0.7)) and volume.units == ("mm", "mm", "mm")
    assert load_dicom(path, frames=True).pixels[:, 5, 5] == pytest.approx([0.5, 0.56, 0.0], abs=0.003), "not reordered"
    per_frame[1].PlanePositionSequence[0].ImagePositionPatient = [-50.0, -0.8 * 20, 0.6 * 20]  # out of order
    write_dicom(path, stored, SharedFunctionalGroupsSequence=pydicom.Sequence([shared]),
                PerFrameFunctionalGroupsSequence=pydicom.Sequence(per_frame))
    assert series_of_file(path).units == ("pixel", "mm", "mm"), "frames out of order: no distance is claimed"


def _region(delta_x: float, delta_y: float, spatial_format: int = 1, units: int = 3) -> pydicom.Dataset:
    """One item of SequenceOfUltrasoundRegions: deltas in cm per pixel (units 3 = cm)."""
    region = pydicom.Dataset()
    region.RegionSpatialFormat, region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = (
        spatial_format, units, units)
    region.PhysicalDeltaX, region.PhysicalDeltaY = delta_x, delta_y
    return region


def test_an_ultrasound_image_is_scaled_by_its_regions(tmp_path: Path) -> None:
    """Ultrasound scanners give the scale in SequenceOfUltrasoundRegions, not PixelSpacing: without it
    napari showed the image in pixels, and lesion sizes measured there were not millimetres."""
    from fedmix_engine.data.dicom import load_dicom

    frame = np.zeros((24, 32), np.uint8)
    doppler = _region(0.001, 2.5, spatial_format=3, units=4)  # a spectral Doppler strip: seconds, not cm
    path = write_dicom(tmp_path / "us.dcm", frame, SequenceOfUltrasoundRegions=pydicom.Sequence(
        [_region(0.012, 0.01), _region(0.012, 0.01), doppler]))
    assert load_dicom(path).spacing == pytest.approx((0.1, 0.12)), "mm per pixel: rows, columns"
    zoomed = write_dicom(tmp_path / "dual.dcm", frame, SequenceOfUltrasoundRegions=pydicom.Sequence(
        [_region(0.012, 0.01), _region(0.006, 0.005)]))
    assert load_dicom(zoomed).spacing is None, "two views at two scales: no one spacing for the image"
    given = write_dicom(tmp_path / "given.dcm", frame, PixelSpacing=[0.2, 0.2],
                        SequenceOfUltrasoundRegions=pydicom.Sequence([_region(0.012, 0.01)]))
    assert load_dicom(given).spacing == pytest.approx((0.2, 0.2)), "PixelSpacing, when given, comes first"


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")  # the palette file's own oddity
def test_colour_dicom_is_read_as_rgb() -> None:
    ybr = read_image(bundled("SC_ybr_full_422_uncompressed.dcm"))  # stored as YCbCr; its top band is red
    assert ybr.shape == (100, 100, 3) and ybr[5, 5, 0] > 240 and ybr[5, 5, 1:].max() < 15
    assert read_image(bundled("SC_rgb_jpeg.dcm")).shape == (256, 256, 3)  # JPEG baseline, decoded by Pillow
    palette = read_image(bundled("examples_palette.dcm"))  # an ultrasound frame in PALETTE COLOR
    assert palette.shape == (350, 800, 3) and len(np.unique(palette.reshape(-1, 3), axis=0)) > 10


@pytest.mark.parametrize(("name", "reason"), [
    ("examples_ybr_color.dcm", "multi-frame DICOM (30 frames: a cine loop or a volume)"),
    ("liver_1frame.dcm", "a DICOM segmentation (SEG), not an image"),
    ("rtstruct.dcm", "DICOM file holds no image (RT Structure Set Storage)"),
    ("MR_truncated.dcm", "cannot decode the DICOM pixel data"),
])
def test_dicom_files_that_hold_no_single_image_are_refused_by_name(name: str, reason: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files before we refuse them
        with pytest.raises(InputError, match=r".*") as refused:
            read_image(bundled(name))
    assert name in str(refused.value) and reason in str(refused.value)


def test_compressed_pixel_data_without_a_decoder_is_refused_naming_the_transfer_syntax(tmp_path: Path) -> None:
    """JPEG-LS is decoded (pyjpegls comes with highdicom); a video transfer syntax (an MPEG-2 cine
    loop) has no decoder here: the message names it and what pydicom would need."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    np.testing.assert_array_equal(read_image(bundled("MR_small_jpeg_ls_lossless.dcm")),
                                  read_image(bundled("MR_small.dcm")))
    dataset = pydicom.dcmread(bundled("MR_small.dcm"))
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    dataset["PixelData"].VR = "OB"
    video = tmp_path / "loop.dcm"
    dataset.save_as(video)
    with pytest.raises(InputError, match=r"loop\.dcm: cannot decode the DICOM pixel data \(transfer syntax: MPEG2 "):
        read_image(video)


def test_a_file_named_dcm_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "scan.dcm"
    fake.write_bytes(b"this is a text file renamed to .dcm\n" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match=r"scan\.dcm: not a DICOM file"):
            read_image(fake)


def test_site_import_reads_a_pacs_export_and_keeps_no_patient_data(tmp_path: Path, capsys) -> None:
    """A PACS export: files without suffix named by instance UID, a DICOMDIR index and a cine loop."""
    export = tmp_path / "export"
    export.mkdir()
    rng = np.random.default_rng(1)
    for uid in ("1.2.826.0.1.3680043.100", "1.2.826.0.1.3680043.101"):  # differ only in what looks like a suffix
        write_dicom(export / uid, rng.integers(0, 256, (40, 48), dtype=np.uint8))
    shutil.copy(bundled("examples_ybr_color.dcm"), export / "IM0003")
    shutil.copy(bundled("CT_small.dcm"), export / "DICOMDIR")  # the index is skipped, whatever it holds
    (export / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(export)] == ["1.2.826.0.1.3680043.100", "1.2.826.0.1.3680043.101",
                                                      "IM0003"]
    tags = tmp_path / "tags.csv"
    tags.write_text("image,class,present\n1.2.826.0.1.3680043.101,lesion,present\n")
    masks = tmp_path / "masks"  # masks drawn elsewhere, named after the UID
    masks.mkdir()
    drawn = np.zeros((40, 48), np.uint8)
    drawn[10:20, 12:30] = 255
    iio.imwrite(masks / "1.2.826.0.1.3680043.100_mask.png", drawn)
    site = tmp_path / "site"
    assert main(["site", "import", str(site), "--classes", "lesion", "--images", str(export),
                 "--masks", str(masks), "--tags", str(tags)]) == 1, "a problem was reported"
    assert "IM0003: multi-frame DICOM (30 frames" in capsys.readouterr().out
    with SiteStore.open(site, readonly=True) as store:
        assert store.image_ids() == ["1.2.826.0.1.3680043.100", "1.2.826.0.1.3680043.101"]
        assert store.tags("1.2.826.0.1.3680043.101") == {"lesion": True}
        np.testing.assert_array_equal(store.read_mask("1.2.826.0.1.3680043.100"), drawn // 255)
        assert tifffile.imread(site / "images" / "1.2.826.0.1.3680043.100.tif").shape == (40, 48)
    for stored in site.rglob("*"):
        if stored.is_file():
            content = stored.read_bytes()
            assert b"Doe^Jane" not in content and b"MRN-0042" not in content, f"{stored} holds patient data"


def test_a_dicom_mask_is_refused_with_the_formats_that_are_read(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"liver_1frame\.dcm: DICOM masks \(SEG, RT structure sets\) are not read"):
        read_mask_file(bundled("liver_1frame.dcm"), 1)


def test_batch_predict_decodes_a_dicom_loop_a_frame_at_a_time_as_napari_shows_it(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """A long cine loop was decoded whole, then converted whole, before its first frame was predicted."""
    from fedmix_engine.data.dicom import load_dicom
    from fedmix_engine.device import plan_device
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.predict import Predictor, predict_folder

    tiny = ModelConfig(base_width=4)
    model = Predictor(init_pair(tiny, 0), tiny, 32, plan_device("cpu"), batch_size=8)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(bundled("examples_ybr_color.dcm"), folder / "cine.dcm")  # 30 YBR frames, shown as RGB
    stored = np.stack([np.full((16, 20), v, np.uint16) for v in (1064, 1000, 864)])
    per_frame = [_group(PixelValueTransformationSequence={"RescaleSlope": 1, "RescaleIntercept": -1024})] * 3
    write_dicom(folder / "enhanced.dcm", stored, PerFrameFunctionalGroupsSequence=pydicom.Sequence(per_frame),
                SharedFunctionalGroupsSequence=pydicom.Sequence([_group(
                    FrameVOILUTSequence={"WindowCenter": 40, "WindowWidth": 400})]))
    shown = {name: load_dicom(folder / name, frames=True).pixels for name in ("cine.dcm", "enhanced.dcm")}

    def whole(self):
        raise AssertionError("a multi-frame DICOM file is decoded a frame at a time in a batch")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(whole))
    frames: list[tuple[str, int, int]] = []
    rows = {r.file: r for r in predict_folder(model, folder, tmp_path / "out",
                                              on_frames=lambda p, done, total: frames.append((p.name, done, total)))}
    assert [f for f in frames if f[0] == "cine.dcm"] == [("cine.dcm", k, 30) for k in (8, 16, 24, 30)]
    for name, count in (("cine.dcm", 30), ("enhanced.dcm", 3)):
        assert (rows[name].status, rows[name].frames) == ("ok", count)
        masks = tifffile.imread(tmp_path / "out" / f"{Path(name).stem}_mask.tif")
        for t in (0, count - 1):  # the frame as napari shows it (YBR as RGB; its own rescale and window)
            np.testing.assert_array_equal(masks[t], model.mask(shown[name][t]))


def test_batch_predict_names_masks_after_the_whole_uid(tmp_path: Path) -> None:
    from fedmix_engine.device import plan_device
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.predict import Predictor, predict_folder

    folder = tmp_path / "export"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for uid in ("1.2.3.7", "1.2.3.8"):
        write_dicom(folder / uid, rng.integers(0, 256, (20, 24), dtype=np.uint8))
    tiny = ModelConfig(base_width=4)
    rows = predict_folder(Predictor(init_pair(tiny, 0), tiny, 32, plan_device("cpu")), folder, tmp_path / "out")
    assert [(r.file, r.mask_file, r.status) for r in rows] == [
        ("1.2.3.7", "1.2.3.7_mask.tif", "ok"), ("1.2.3.8", "1.2.3.8_mask.tif", "ok")]
    assert tifffile.imread(tmp_path / "out" / "1.2.3.8_mask.tif").shape == (20, 24)


def test_predictions_of_dicom_images_are_written_as_dicom_seg_of_their_source(tmp_path: Path, capsys) -> None:
    """A batch of DICOM images gave TIFF masks only, which a PACS or DICOM viewer cannot place on the
    study. With --dicom-seg each DICOM image also gets a SEG referencing it; a cine loop without a
    frame of reference gets its TIFF mask and the reason it has no SEG; other files are unchanged."""
    import highdicom as hd

    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.data.dicom_seg import write_dicom_seg
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig

    ct = pydicom.dcmread(bundled("CT_small.dcm"))
    drawn = np.zeros((128, 128), np.uint8)
    drawn[30:60, 40:90] = 1
    seg = hd.seg.segread(write_dicom_seg(bundled("CT_small.dcm"), drawn, ["liver lesion"], tmp_path / "one.dcm"))
    np.testing.assert_array_equal(seg.pixel_array, drawn)
    assert seg.SegmentSequence[0].SegmentLabel == "liver lesion" and seg.PatientID == ct.PatientID
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert referenced == ct.SOPInstanceUID and seg.StudyInstanceUID == ct.StudyInstanceUID
    # what a PACS lists for the series says it is a research tool's output, not a clinical result
    assert seg.SeriesDescription == "FedMix segmentation: research use only, not for diagnosis"
    assert seg.ContentDescription == "FedMix prediction, research use only" and seg.SeriesNumber == 9100
    assert all(len(text) <= 64 for text in (seg.SeriesDescription, seg.ContentDescription))  # LO's limit
    # a class named in a language the source's character set cannot write (Latin-1 here) is not lost to '?'
    worded = pydicom.dcmread(write_dicom_seg(bundled("CT_small.dcm"), drawn, ["病变"], tmp_path / "worded.dcm"))
    assert worded.SegmentSequence[0].SegmentLabel == "病变" and worded.PatientName == ct.PatientName
    with pytest.raises(InputError, match="mask label 2 has no class name"):
        write_dicom_seg(bundled("CT_small.dcm"), drawn * 2, ["lesion"], tmp_path / "two.dcm")
    two = drawn.copy()
    two[80:100, 20:40] = 2
    seg = hd.seg.segread(write_dicom_seg(bundled("CT_small.dcm"), two, ["lesion", "cyst"], tmp_path / "two.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "cyst"]
    for frame, groups in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        k = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber  # one binary frame per class
        np.testing.assert_array_equal(frame, two == k)
    older = pydicom.dcmread(bundled("MR_small.dcm"))
    older.preamble = None  # written by software that leaves out the 128-byte preamble: read, so also segmented
    older.save_as(tmp_path / "older.dcm", enforce_file_format=False)
    small = np.zeros((64, 64), np.uint8)
    small[5:9, 5:9] = 1
    np.testing.assert_array_equal(
        hd.seg.segread(write_dicom_seg(tmp_path / "older.dcm", small, ["lesion"], tmp_path / "o.dcm")).pixel_array,
        small)

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(bundled("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(bundled("MR_small.dcm"), folder / "1.2.3.9")  # a PACS file name
    shutil.copy(bundled("examples_ybr_color.dcm"), folder / "cine.dcm")
    tifffile.imwrite(folder / "scan.tif", np.zeros((40, 48), np.uint8))
    config = ModelConfig(base_width=4)
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", init_pair(config, 0), config, {"image_size": 32})
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["predict", str(checkpoint), str(folder), str(out), "--device", "cpu", "--dicom-seg",
                     "--classes", "lesion"])
    printed = capsys.readouterr().out
    assert code == 1 and "cine.dcm: mask written, DICOM SEG not written: no DICOM SEG for a 30-frame" in printed
    assert "predicted 4 image(s)" in printed and "; 2 DICOM SEG(s)" in printed
    for name, source in (("ct", "ct.dcm"), ("1.2.3.9", "1.2.3.9")):
        seg = hd.seg.segread(out / f"{name}_seg.dcm")
        mask = tifffile.imread(out / f"{name}_mask.tif")
        np.testing.assert_array_equal(seg.pixel_array.reshape(mask.shape), mask)  # the same mask, as DICOM
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"  # Segmentation Storage
        assert (seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
                == pydicom.dcmread(folder / source).SOPInstanceUID)
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmParameters == (  # the PACS copy names the exact model, as prediction.json does
            f"model_sha256={hashlib.sha256(checkpoint.read_bytes()).hexdigest()},threshold=0.5")
    assert tifffile.imread(out / "cine_mask.tif").shape == (30, 240, 320)
    assert not (out / "scan_seg.dcm").exists() and not (out / "cine_seg.dcm").exists()
    # a folder without DICOM images: '0 DICOM SEG(s)' alone left the user to guess why
    plain = tmp_path / "plain"
    plain.mkdir()
    tifffile.imwrite(plain / "scan.tif", np.zeros((40, 48), np.uint8))
    assert main(["predict", str(checkpoint), str(plain), str(tmp_path / "out3"), "--device", "cpu",
                 "--dicom-seg"]) == 0
    assert ("; 0 DICOM SEG(s) (--dicom-seg: none of the images is DICOM, and a SEG is written for DICOM images "
            "only: it refers to its source image)") in capsys.readouterr().out
    with pytest.raises(InputError, match=r"classes: 2 name\(s\) \(a, b\) for a model of 1 class"):
        from fedmix_engine.predict import Predictor, predict_folder

        predict_folder(Predictor.from_checkpoint(checkpoint, "cpu"), folder, tmp_path / "out2", dicom_seg=True,
                       classes=["a", "b"])
    # segment names a site could not give its classes: 'background' is label 0, not a segment
    assert main(["predict", str(checkpoint), str(folder), str(tmp_path / "out4"), "--device", "cpu",
                 "--classes", "Background"]) == 2
    assert "error: --classes: 'background' is implicit (label 0); do not list it as a class" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out4").exists()


def test_a_study_folders_files_are_read_once_to_tell_dicom_and_napari_asks_only_until_the_first(
        tmp_path: Path, monkeypatch) -> None:
    """A PACS export names its files without a suffix, so telling DICOM from a report means reading each one.
    napari asks the plugin's reader about every folder opened: it read the header of every file there (twice
    for each DICOM file) before saying yes. Reading the folder's series read each DICOM file's header twice
    more before decoding it. Now napari's question stops at the first DICOM file, and the series read tells
    each file once."""
    from collections import Counter

    from fedmix_engine.data import dicom
    from fedmix_engine.data.dicom_series import read_series
    from napari_fedmix.dicom_reader import get_dicom_reader, read_dicom_folder

    study = tmp_path / "study"
    study.mkdir()
    (study / "A-README").write_text("a report, first by name")
    series = generate_uid()
    for k in range(6):
        write_slice(study / f"IM{k}", 100 + k, 2.5 * k, instance=k + 1, series=series, SeriesDescription="CT")
    told: Counter[str] = Counter()
    real = dicom.has_dicom_marker
    monkeypatch.setattr(dicom, "has_dicom_marker", lambda path: told.update([Path(path).name]) or real(path))
    assert get_dicom_reader(str(study)) is read_dicom_folder
    assert told == {"A-README": 1, "IM0": 1}
    told.clear()
    (scanned,) = read_series(study).series
    assert scanned.pixels.shape[0] == 6 and told == {"A-README": 1, **{f"IM{k}": 1 for k in range(6)}}
    told.clear()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "R1").write_text("no DICOM here")
    assert get_dicom_reader(str(tmp_path / "reports")) is None and told == {"R1": 1}
    # a Zarr store's chunks ("0.0", no image suffix) are not opened to ask: napari's own reader takes the store
    for store, marker in (("image.zarr", ".zgroup"), ("volume", "zarr.json"), ("labels.zarr/0", ".zarray")):
        (tmp_path / store).mkdir(parents=True)
        (tmp_path / store / marker).write_text("{}")
        for chunk in ("0.0", "0.1", "1.0"):
            (tmp_path / store / chunk).write_bytes(bytes(200))
        told.clear()
        assert get_dicom_reader(str(tmp_path / store)) is None and not told, store


def test_a_folder_of_slices_is_read_as_series_in_patient_order_with_their_spacing(tmp_path: Path) -> None:
    """File names and instance numbers need not follow the slices' positions: the positions order them."""
    from fedmix_engine.data.dicom_series import read_series

    study = tmp_path / "study"
    study.mkdir()
    ct = generate_uid()
    heights = {0: 40.0, 1: 42.5, 2: 45.0, 3: 47.5, 4: 50.0}
    for name, k in zip(("IM9", "IM2", "IM7", "IM1", "IM5"), (3, 0, 4, 1, 2), strict=True):  # shuffled names
        write_slice(study / name, 1000 + k, heights[k], instance=10 - k, series=ct, SeriesDescription="CT abdomen")
    loose = generate_uid()
    for k in (2, 0, 1):  # no positions: instance numbers order them
        write_slice(study / f"loose{k}.dcm", 500 + k, None, instance=k + 1, series=loose)
    write_dicom(study / "us.dcm", np.zeros((24, 32), np.uint8))  # a single frame: a series of its own
    (study / "notes.txt").write_text("not DICOM")
    shutil.copy(bundled("rtstruct.dcm"), study / "RS0001.dcm")  # study exports carry structure sets and SEGs beside
    shutil.copy(bundled("liver_1frame.dcm"), study / "SEG0001")
    shutil.copy(bundled("MR_truncated.dcm"), study / "IM_bad")
    scanned = read_series(study)
    by_name = {s.name: s for s in scanned.series}
    assert sorted(scanned.skipped) == sorted([
        f"{study / 'IM_bad'}: cannot decode the DICOM pixel data (transfer syntax: Explicit VR Little Endian): "
        "The number of bytes of pixel data is less than expected (8130 vs 8192 bytes) - the dataset may be "
        "corrupted, have an invalid group 0028 element value, or the transfer syntax may be incorrect",
        f"{study / 'RS0001.dcm'}: not an image (RTSTRUCT)", f"{study / 'SEG0001'}: not an image (SEG)"])
    assert set(by_name) == {"CT abdomen", "loose0", "us"}
    volume = by_name["CT abdomen"]
    assert volume.pixels.shape == (5, 16, 20)
    assert [int(v) for v in volume.pixels[:, 0, 0]] == [1000, 1001, 1002, 1003, 1004], "ordered by position"
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.8)) and volume.units == ("mm", "mm", "mm")
    assert [int(v) for v in by_name["loose0"].pixels[:, 0, 0]] == [500, 501, 502]
    assert by_name["loose0"].spacing == pytest.approx((1.0, 0.7, 0.8))
    assert by_name["loose0"].units == ("pixel", "mm", "mm"), "no slice distance without positions"
    assert by_name["us"].pixels.shape == (24, 32) and by_name["us"].spacing is None

    write_dicom(study / "odd.dcm", np.zeros((8, 8), np.uint16), SeriesInstanceUID=ct, SeriesDescription="CT abdomen")
    assert any("series 'CT abdomen' mixes slice sizes or colour" in line for line in read_series(study).skipped)
    with pytest.raises(InputError, match="no DICOM image files"):
        read_series(tmp_path)


def test_a_simulated_models_class_names_name_its_dicom_seg_segments(tmp_path: Path) -> None:
    """Checkpoints carried no class names, so a two-class model's SEG said 'class 1', 'class 2'."""
    import highdicom as hd

    from fedmix_engine.data.synthetic import make_sample
    from fedmix_engine.fedmix.train_config import TrainConfig
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.predict import Predictor, predict_folder
    from fedmix_engine.simulate import SimulationConfig, run_simulation

    make_sample(tmp_path / "fed", sites=1, images=6, eval_images=1, seed=0, size=32, classes=2)
    config = SimulationConfig(method="fedmix", rounds=1, device="cpu", model=ModelConfig(base_width=4, num_classes=2),
                              train=TrainConfig(image_size=32, crop_size=32, batch_size=4))
    run_simulation([tmp_path / "fed" / "site-a"], None, config, tmp_path / "run")
    predictor = Predictor.from_checkpoint(tmp_path / "run" / "final.safetensors", "cpu")
    assert predictor.classes == ("lesion", "cyst")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(bundled("CT_small.dcm"), folder / "ct.dcm")
    [row] = predict_folder(predictor, folder, tmp_path / "out", dicom_seg=True)
    seg = hd.seg.segread(tmp_path / "out" / row.seg_file)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "cyst"]


def test_a_continued_recursive_batch_keeps_a_dicom_images_mask_and_seg_in_its_sub_folder(tmp_path: Path) -> None:
    """A kept file's row must be what predicting it gives, its SEG named by its path below the output."""
    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.fedmix.pair import init_pair
    from fedmix_engine.model import ModelConfig
    from fedmix_engine.predict import Predictor, iter_predict_folder, predict_folder

    (tmp_path / "export" / "p01").mkdir(parents=True)
    shutil.copy(bundled("CT_small.dcm"), tmp_path / "export" / "p01" / "IM0001")
    config = ModelConfig(base_width=4)
    predictor = Predictor.from_checkpoint(
        save_checkpoint(tmp_path / "m.safetensors", init_pair(config, 0), config, {"image_size": 32}), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [first] = predict_folder(predictor, tmp_path / "export", tmp_path / "out", dicom_seg=True, recursive=True)
        batch = iter_predict_folder(predictor, tmp_path / "export", tmp_path / "out", dicom_seg=True,
                                    recursive=True, resume=True)
        [(_, _, kept)] = list(batch)
    assert first.seg_file == "p01/IM0001_seg.dcm" and (tmp_path / "out" / first.seg_file).is_file()
    assert batch.kept == 1 and kept == first


def test_a_damaged_header_element_is_named_as_corrupt_wherever_the_file_is_read(tmp_path: Path) -> None:
    """pydicom converts an element when it is first asked for: a value representation no DICOM has (a flipped
    byte) was a NotImplementedError wherever that happened, and a window stored as text a TypeError, each a
    traceback; a study folder holding such a file could not be opened at all. Found by fuzzing."""
    from fedmix_engine.data.dicom_series import read_series

    pixels = np.arange(16 * 20, dtype=np.uint16).reshape(16, 20)
    write_dicom(tmp_path / "good.dcm", pixels)

    def damaged(name: str, element: bytes, into: bytes, **attributes) -> Path:
        path = write_dicom(tmp_path / name, pixels, **attributes)
        data = path.read_bytes()
        assert data.count(element) == 1
        path.write_bytes(data.replace(element, into))
        return path

    unknown_vr = damaged("vr.dcm", b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00JS")  # Modality's VR: JS
    text_window = damaged("window.dcm", b"\x28\x00\x50\x10DS", b"\x28\x00\x50\x10LO", WindowCenter="40",
                          WindowWidth="400")  # WindowCenter read as text
    said = {unknown_vr: r"unreadable or corrupt DICOM file \(NotImplementedError: Unknown Value Representation 'JS' "
                        r"in tag \(0008,0060\)\)",
            text_window: r"its display values \(rescale, window\) cannot be applied: damaged or not as DICOM defines "
                         r"them \(TypeError: "}
    for path, reason in said.items():
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {reason}"):
            read_image(path)
    study = read_series(tmp_path)
    assert [s.files for s in study.series] == [(tmp_path / "good.dcm",)]
    assert len(study.skipped) == 2 and all(any(line.startswith(f"{p}: ") for line in study.skipped) for p in said)
