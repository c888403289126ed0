"""Pixel spacing: read from DICOM headers and calibrated TIFFs at import, kept in the site's stored TIFF,
and used by ``evaluate`` to give HD95 in mm, per axis for anisotropic pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dicom_helpers import write_dicom
from fedmix_engine.cli import main
from fedmix_engine.data.pixel_spacing import file_spacing, tiff_resolution, tiff_spacing
from fedmix_engine.data.site_store import SiteStore
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.metrics import hd95
from model_helpers import all_lesion_checkpoint


def _calibrated_folder(folder: Path) -> dict[str, tuple[float, float] | None]:
    """One image per way a file can state (or not state) its pixel spacing; the spacing each should give."""
    folder.mkdir()
    image = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) % 251).astype(np.uint8)
    write_dicom(folder / "scan.dcm", image, PixelSpacing=[0.5, 0.25])
    tifffile.imwrite(folder / "cm.tif", image, **tiff_resolution((0.2, 0.2)))
    tifffile.imwrite(folder / "fiji.tif", image, imagej=True, resolution=(1 / 300, 1 / 300),
                     metadata={"unit": "micron"})  # 300 µm pixels, as Fiji writes a calibrated image
    tifffile.imwrite(folder / "editor.tif", image, resolution=(72, 72), resolutionunit="INCH")  # screen dpi
    Image.fromarray(image).save(folder / "photo.png")
    return {"scan": (0.5, 0.25), "cm": (0.2, 0.2), "fiji": (0.3, 0.3), "editor": None, "photo": None}


def test_import_keeps_the_pixel_spacing_files_state_and_only_those(tmp_path: Path, capsys) -> None:
    expected = _calibrated_folder(tmp_path / "images")
    assert {p.stem: file_spacing(p) for p in (tmp_path / "images").iterdir()} == expected
    assert main(["site", "import", str(tmp_path / "site"), "--images", str(tmp_path / "images"),
                 "--classes", "lesion"]) == 0
    assert "pixel spacing (mm) from the files: 3 of 5 added images" in capsys.readouterr().out
    main(["site", "info", str(tmp_path / "site")])
    assert "pixel spacing (mm): 3 of 5 images (evaluate gives HD95 in mm for these)" in capsys.readouterr().out
    with SiteStore.open(tmp_path / "site", readonly=True) as store:
        assert {i: store.spacing(i) for i in store.image_ids()} == expected
        # the stored TIFF says it itself: a reader that knows nothing of FedMix (here tifffile) sees it
        with tifffile.TiffFile(tmp_path / "site" / "images" / "scan.tif") as tiff:
            assert int(tiff.pages[0].resolutionunit) == 3  # centimetre
            assert tiff.pages[0].resolution == pytest.approx((10 / 0.25, 10 / 0.5))

    # an array added with a spacing keeps it; a nonsensical one is refused by name, nothing stored
    with SiteStore.open(tmp_path / "site") as store:
        store.add_image(np.zeros((8, 8), np.uint8), "frame", spacing=(0.1, 0.15))
        assert store.spacing("frame") == (0.1, 0.15)
        for bad in ((0.0, 0.1), (float("nan"), 0.1), (0.1,)):
            with pytest.raises(InputError, match="image 'bad': pixel spacing"):
                store.add_image(np.zeros((8, 8), np.uint8), "bad", spacing=bad)
        assert "bad" not in store.image_ids() and not (tmp_path / "site" / "images" / "bad.tif").exists()


def test_hd95_in_mm_measures_each_axis_at_its_own_spacing() -> None:
    """A point moved 2 rows is 1 mm away at 0.5 mm rows; moved 2 columns, 0.5 mm at 0.25 mm columns."""
    truth = np.zeros((20, 20), bool)
    truth[10, 10] = True
    down, right = np.roll(truth, 2, axis=0), np.roll(truth, 2, axis=1)
    assert hd95(down, truth) == hd95(right, truth) == 2.0
    assert hd95(down, truth, (0.5, 0.25)) == pytest.approx(1.0)
    assert hd95(right, truth, (0.5, 0.25)) == pytest.approx(0.5)


def test_batch_masks_keep_the_pixel_spacing_and_the_summary_gives_the_area_in_mm2(tmp_path: Path) -> None:
    """A lesion's size in mm² is what a report quotes; a mask opened in Fiji beside its image should
    measure in the same mm."""
    expected = _calibrated_folder(tmp_path / "images")
    stack = (np.arange(4 * 32 * 40) % 200).astype(np.uint8).reshape(4, 32, 40)
    tifffile.imwrite(tmp_path / "images" / "loop.tif", stack, photometric="minisblack", **tiff_resolution((0.1, 0.2)))
    expected["loop"] = (0.1, 0.2)
    model = all_lesion_checkpoint(tmp_path / "m.safetensors")
    for resume in ((), ("--resume",)):  # a continued batch keeps the masks and gives the same rows
        assert main(["predict", str(model), str(tmp_path / "images"), str(tmp_path / "out"), "--device", "cpu",
                     *resume]) == 0
        with open(tmp_path / "out" / "summary.csv", newline="") as handle:
            rows = {Path(row["file"]).stem: row for row in csv.DictReader(handle)}
        assert set(rows) == set(expected)
        for name, spacing in expected.items():
            row = rows[name]
            assert row["status"] == "ok" and float(row["foreground_fraction"]) == 1.0  # every pixel
            assert tiff_spacing(tmp_path / "out" / row["mask_file"]) == spacing
            if spacing is None:
                assert row["foreground_mm2"] == row["spacing_row_mm"] == row["spacing_col_mm"] == ""
            else:
                assert (float(row["spacing_row_mm"]), float(row["spacing_col_mm"])) == spacing
                assert float(row["foreground_mm2"]) == pytest.approx(32 * 40 * spacing[0] * spacing[1])
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["files"]["kept"] == len(expected)


def test_evaluate_gives_hd95_in_mm_for_the_images_with_a_spacing(tmp_path: Path, capsys) -> None:
    _calibrated_folder(tmp_path / "images")
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in (tmp_path / "images").iterdir():
        mask = np.zeros((32, 40), np.uint8)
        mask[8:20, 10:26] = 1
        Image.fromarray(mask).save(masks / f"{path.stem}.png")
    assert main(["site", "import", str(tmp_path / "site"), "--images", str(tmp_path / "images"),
                 "--masks", str(masks), "--classes", "lesion"]) == 0
    model = all_lesion_checkpoint(tmp_path / "m.safetensors")  # its HD95 is defined on every image
    capsys.readouterr()
    assert main(["evaluate", str(model), str(tmp_path / "site"), "--out", str(tmp_path / "scores.csv"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "HD95 in pixels of the image and in mm where it has a pixel spacing" in out
    assert "HD95 mm" in out and "mm from 3 of 5 images" in out
    with open(tmp_path / "scores.csv", newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    px = float(rows["cm"]["hd95_px"])
    assert px > 0 and float(rows["cm"]["hd95_mm"]) == pytest.approx(0.2 * px, abs=1e-3)
    assert float(rows["fiji"]["hd95_mm"]) == pytest.approx(0.3 * px, abs=1e-3)
    # anisotropic: every surface distance weighed per axis, so neither 0.5 × px nor 0.25 × px in general
    truth = np.zeros((32, 40), bool)
    truth[8:20, 10:26] = True
    assert float(rows["scan"]["hd95_mm"]) == pytest.approx(hd95(np.ones_like(truth), truth, (0.5, 0.25)), abs=1e-3)
    assert (rows["scan"]["spacing_row_mm"], rows["scan"]["spacing_col_mm"]) == ("0.5", "0.25")
    for name in ("editor", "photo"):
        assert rows[name]["hd95_mm"] == rows[name]["spacing_row_mm"] == "" and float(rows[name]["hd95_px"]) == px
