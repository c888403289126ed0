"""COCO and LabelMe annotation files: what is a region and what a box, and annotations that cannot be read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from fedmix_engine.data.coco import read_coco, region_mask
from fedmix_engine.errors import InputError


def _write(path: Path, annotations: list[dict], images: int = 2, categories: list[dict] | None = None) -> Path:
    path.write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": f"scan-{i}.png", "height": 40, "width": 50} for i in range(images)],
        "categories": categories or [{"id": 1, "name": "lesion"}],
        "annotations": [{"image_id": 1, "category_id": 1, **a} for a in annotations],
    }))
    return path


def test_a_rectangle_written_as_a_polygon_is_a_box_and_any_other_polygon_a_region(tmp_path: Path) -> None:
    coco = read_coco(_write(tmp_path / "c.json", [
        {"id": 1, "bbox": [4, 3, 26, 17], "segmentation": [[4, 3, 30, 3, 30, 20, 4, 20]]},  # VIA's rectangle
        {"id": 2, "segmentation": [[4, 3, 30, 3, 30, 20, 4, 20, 4, 3]]},  # closed, as some tools write it
        {"id": 3, "segmentation": [[10, 0, 20, 10, 10, 20, 0, 10]]},  # a diamond: four corners, drawn
        {"id": 4, "segmentation": [[4, 3, 30, 3, 30, 20], [4, 20, 4, 3, 30, 20]]},  # two polygons: drawn
        {"id": 5, "bbox": [1, 2, 3, 4], "segmentation": []},  # CVAT's rectangle
    ]))
    regions = [a.is_region for a in coco.images[0].annotations]
    assert regions == [False, False, True, True, False]
    assert coco.images[0].annotations[1].box(40, 50) == (3, 4, 20, 30)  # no bbox: the polygon's bounds
    assert coco.unannotated == 1 and coco.problems == ()


def test_a_region_is_the_pixels_pycocotools_decodes_and_the_later_class_wins_an_overlap(tmp_path: Path) -> None:
    pixels = np.zeros((40, 50), np.uint8, order="F")
    pixels[5:25, 10:20] = 1
    rle = coco_mask.encode(pixels)
    rle["counts"] = rle["counts"].decode()
    coco = read_coco(_write(tmp_path / "c.json", [
        {"id": 1, "category_id": 1, "segmentation": rle},
        {"id": 2, "category_id": 2, "segmentation": [[15, 20, 30, 20, 30, 30, 15, 30, 12, 25]]},
    ], categories=[{"id": 2, "name": "cyst"}, {"id": 1, "name": "lesion"}]))
    assert coco.categories == ("lesion", "cyst")  # by id, as the file's labels go
    lesion, cyst = coco.images[0].annotations
    mask = region_mask([cyst, lesion], [2, 1], 40, 50)  # cyst is label 2 here: painted over the lesion
    assert mask[10, 15] == 1 and mask[22, 17] == 2 and mask[22, 25] == 2 and mask[35, 45] == 0
    np.testing.assert_array_equal(mask > 0, (pixels > 0) | (region_mask([cyst], [1], 40, 50) > 0))


@pytest.mark.parametrize(("segmentation", "said"), [
    ({"counts": "", "size": [40, 50]}, "neither polygons nor a run-length encoding"),  # decoded to noise before
    ({"counts": [5], "size": [40, -50]}, "neither polygons nor a run-length encoding"),
    ([[1, 2, 3, 4]], "x, y pairs of at least 3 points"),
    ([[1, 2, 3, 4, 5, "6"]], "x, y pairs of at least 3 points"),
    ({"polygon": [1, 2]}, "neither polygons nor a run-length encoding"),
])
def test_an_annotation_that_cannot_be_read_is_left_out_naming_it(tmp_path: Path, segmentation, said) -> None:
    path = _write(tmp_path / "c.json", [{"id": 7, "bbox": [1, 1, 3, 3]}, {"id": 8, "segmentation": segmentation}])
    coco = read_coco(path)
    assert [a.where for a in coco.images[0].annotations] == ["annotations[0] (id 7)"]
    assert len(coco.problems) == 1 and coco.problems[0].startswith(f"{path}: annotations[1] (id 8): ")
    assert said in coco.problems[0] and coco.problems[0].endswith("; left out")


def test_a_run_length_encoding_of_another_size_or_sum_is_refused_by_name(tmp_path: Path) -> None:
    """pycocotools 2.0.11 refuses runs that add up to more than the image, but decodes fewer (a string cut
    short, a damaged file) leaving the rest of the mask as whatever memory held: a lesion nobody drew."""
    pixels = np.zeros((40, 50), np.uint8, order="F")
    pixels[20:30, 5:12] = 1
    whole = coco_mask.encode(pixels)["counts"].decode()
    coco = read_coco(_write(tmp_path / "c.json", [
        {"id": 1, "segmentation": {"counts": [10, 1990], "size": [50, 40]}},
        {"id": 2, "segmentation": {"counts": [10, 2000], "size": [40, 50]}},
        {"id": 3, "segmentation": {"counts": "garbage~~", "size": [40, 50]}},
        {"id": 4, "segmentation": {"counts": whole[:8], "size": [40, 50]}},  # decoded 819 pixels of noise before
        {"id": 5, "segmentation": {"counts": whole[:4] + "l", "size": [40, 50]}},  # ends inside a number
        {"id": 6, "segmentation": {"counts": [-5, 2005], "size": [40, 50]}},  # an OverflowError's traceback before
        {"id": 7, "segmentation": {"counts": [10.5, 1989.5], "size": [40, 50]}},  # read as 10 and 1989 before
        {"id": 8, "segmentation": {"counts": whole, "size": [40, 50]}},
    ]))
    annotations = coco.images[0].annotations
    for annotation, said in zip(annotations, [
            r"its run-length encoding is 50×40, the image 40×50$",
            r"its run lengths cover 2010 pixels, where its size 40×50 has 2000: the encoding is cut short or damaged$",
            r"its run-length counts cannot be read \(a character COCO's encoding does not use, or the string ends "
            r"inside a number\)$",
            r"its run lengths cover 310 pixels, where its size 40×50 has 2000: the encoding is cut short",
            r"its run-length counts cannot be read",
            r"its run lengths must be whole numbers ≥ 0$",
            r"its run lengths must be whole numbers ≥ 0$"], strict=False):
        with pytest.raises(ValueError, match=rf"^{re.escape(annotation.where)}: {said}"):
            region_mask([annotation], [1], 40, 50)
    np.testing.assert_array_equal(region_mask([annotations[-1]], [1], 40, 50), pixels)


def test_run_lengths_reads_what_pycocotools_writes() -> None:
    from fedmix_engine.data.coco import run_lengths

    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(n) for n in rng.integers(1, 60, 2))
        pixels = np.asfortranarray((rng.random((height, width)) < rng.choice([0.0, 0.02, 0.5, 1.0])).astype(np.uint8))
        runs = run_lengths(coco_mask.encode(pixels)["counts"].decode())
        np.testing.assert_array_equal(np.repeat(np.arange(len(runs)) % 2, runs), pixels.ravel(order="F"))


def test_a_polygon_far_off_its_image_is_refused_before_pycocotools_rasterises_it(tmp_path: Path) -> None:
    """pycocotools draws each edge at 5× before it clips to the image: one point at 1e300 (a damaged file) took
    all of the machine's memory and the process was killed. A point a little outside is drawn, clipped."""
    coco = read_coco(_write(tmp_path / "c.json", [
        {"id": 1, "segmentation": [[10, 5, 30, 5, 1e300, 15, 10, 15]]},
        {"id": 2, "segmentation": [[10, 5, 30, 5, 30, -41, 10, 15]]},
        {"id": 3, "segmentation": [[-10, -5, 60, -5, 60, 45, -10, 45, -50, 20]]},  # a little past every edge
    ]))
    far, above, around = coco.images[0].annotations
    with pytest.raises(ValueError, match=r"^annotations\[0\] \(id 1\): its polygon reaches \(1e\+300, 15\), more "
                                         r"than the image's own size off the 40×50 image: drawn on another image"):
        region_mask([far], [1], 40, 50)
    with pytest.raises(ValueError, match=r"its polygon reaches \(30, -41\)"):
        region_mask([above], [1], 40, 50)
    assert region_mask([around], [1], 40, 50).all()


@pytest.mark.parametrize(("text", "said"), [
    ("[1, 2]", "not a COCO annotation file"),
    ('{"images": [], "annotations": []}', "not a COCO annotation file"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}',
     "images[0]: needs an id, a file_name, and a height and width in pixels"),
    ('{"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 5}], "categories": [{"id": 1, "name": "x"}],'
     ' "annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}',
     "annotations[0]: its image_id is not one of the file's images"),
    ('{"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 5}], "categories": [{"id": 1, "name": "x"}],'
     ' "annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]}',
     "annotations[0] (id 4): its category_id is not one of the file's categories"),
    ('{"images": [', "not JSON: Expecting value at line 1, column 13"),
    ('{"images": ' + "[" * 100_000, "nested too deep"),  # a RecursionError's traceback before
])
def test_a_file_that_is_not_coco_is_refused_whole_naming_the_field(tmp_path: Path, text: str, said: str) -> None:
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(InputError) as refused:
        read_coco(tmp_path / "c.json")
    assert refused.value.where == str(tmp_path / "c.json") and said in refused.value.reason


def test_labelme_files_are_told_from_other_json_and_name_what_they_leave_out(tmp_path: Path) -> None:
    from fedmix_engine.data.labelme import is_labelme_file, read_labelme

    coco = _write(tmp_path / "coco.json", [{"id": 1, "bbox": [1, 1, 2, 2]}])
    drawn = tmp_path / "case-07.json"  # no imagePath (LabelMe with "save without image data" off, older ones)
    drawn.write_text(json.dumps({"imageHeight": 40, "imageWidth": 50, "shapes": [
        {"label": "lesion", "points": [[1, 2], [9, 2], [5, 8]]},  # before LabelMe 3: no shape_type, a polygon
        {"label": " ", "points": [[1, 2], [9, 2], [5, 8]], "shape_type": "polygon"},
        {"label": "lesion", "points": [[1, 2]], "shape_type": "rectangle"},
        {"label": "lesion", "points": [[1, "2"], [3, 4]], "shape_type": "rectangle"},
        {"label": "lesion", "points": [[1, 2]], "shape_type": "point"},
    ]}))
    assert not is_labelme_file(coco) and is_labelme_file(drawn) and not is_labelme_file(tmp_path / "x.png")
    image, left_out = read_labelme(drawn)
    assert image.file_name == "case-07" and (image.height, image.width) == (40, 50)
    assert [a.where for a in image.annotations] == ["shapes[0]"] and image.annotations[0].is_region
    assert [line.removeprefix(f"{drawn}: ") for line in left_out] == [
        "shapes[1]: a shape needs a label; left out",
        "shapes[2]: a rectangle of 1 point(s); left out",
        "shapes[3]: its points must be x, y pairs of numbers; left out",
        "shapes[4]: a point outlines no region (polygons, circles and rectangles are read); left out"]
    assert image.unread == (None, "lesion", "lesion", "lesion"), "what the importer weighs: a label, or none"
    (tmp_path / "sizeless.json").write_text('{"shapes": []}')
    with pytest.raises(InputError, match="needs 'shapes', 'imageHeight' and 'imageWidth'"):
        read_labelme(tmp_path / "sizeless.json")
