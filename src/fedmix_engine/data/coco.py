"""COCO annotation files as a site's masks and boxes.

Annotation tools export COCO JSON (CVAT, Labelbox, Roboflow, VIA, Label Studio): a list of images, of
categories and of annotations, each with a box (``bbox``: x, y, width, height) and, for a drawn region,
a ``segmentation`` (polygons, or run-length encoded pixels). What each becomes at a site:

- an annotation with a segmentation is a pixel label, unless its polygon is its own box's rectangle
  (VIA and others export a rectangle that way): that is a box, as is one without a segmentation;
- an image whose annotations are all pixel labels gets their mask; one with any box gets every annotation
  as a box (a region by its bounding box). A mask must cover every lesion of the image, or the lesions
  only boxed would be trained as background;
- an image listed without annotations gets nothing: tools list the images not annotated yet as well.

Polygons and run-length encodings are decoded by pycocotools, COCO's own reference implementation, so a
region covers the pixels the data set's authors meant. A file that is not COCO is refused whole, naming
the field; an annotation that cannot be read is a problem of the import, naming its index and id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmix_engine.errors import InputError
from fedmix_engine.json_values import is_count, is_number, parse_json


@dataclass(frozen=True)
class CocoAnnotation:
    """One annotation: its place in the file (for messages), its category's name, box and segmentation."""

    where: str  # "annotations[3] (id 17)"
    category: str
    bbox: tuple[float, float, float, float] | None  # x, y, width, height (pixels)
    segmentation: list | dict | None  # polygons or RLE; None: a box only

    @property
    def is_region(self) -> bool:
        """A drawn region (not a box, nor a rectangle written as a polygon)."""
        return self.segmentation is not None and not _is_rectangle(self.segmentation)

    def box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """y0, x0, y1, x1: the annotation's box, or when it states none its region's bounding box."""
        if self.bbox is not None:
            x, y, w, h = self.bbox
            return y, x, y + h, x + w
        if isinstance(self.segmentation, list):
            xs = [v for polygon in self.segmentation for v in polygon[0::2]]
            ys = [v for polygon in self.segmentation for v in polygon[1::2]]
            return min(ys), min(xs), max(ys), max(xs)
        rows, cols = np.nonzero(region_mask([self], [1], height, width))  # run-length pixels only
        return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


@dataclass(frozen=True)
class CocoImage:
    file_name: str
    height: int
    width: int
    annotations: tuple[CocoAnnotation, ...]
    # the categories of its annotations that cannot be read (None: a shape without a label): a site class among
    # them means the readable ones are not all of the image's lesions, and the image gets none of them
    unread: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class CocoFile:
    path: Path
    categories: tuple[str, ...]  # the names of the categories annotated, in id order
    images: tuple[CocoImage, ...]  # those with annotations that can be read
    unannotated: int  # images the file lists without any annotation (not annotated yet, or nothing found)
    problems: tuple[str, ...]  # annotations left out, each named: they cannot be read


def read_coco(path: str | Path) -> CocoFile:
    """Read a COCO annotation file; refused whole (naming the file and field) if it is not one."""
    path = Path(path)
    try:
        data = parse_json(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 JSON text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except ValueError as exc:  # nested thousands deep
        raise InputError(path, f"not a COCO annotation file: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise InputError(path, "not a COCO annotation file: it needs the lists 'images', 'annotations' and "
                               "'categories' (export the annotations as COCO from the annotation tool)")
    categories = {}
    for i, category in enumerate(data["categories"]):
        if not (isinstance(category, dict) and isinstance(category.get("name"), str) and _id(category.get("id"))):
            raise InputError(path, f"categories[{i}]: needs an id and a name")
        categories[category["id"]] = category["name"].strip()
    images: dict[Any, tuple[str, int, int]] = {}
    for i, image in enumerate(data["images"]):
        if not (isinstance(image, dict) and _id(image.get("id")) and isinstance(image.get("file_name"), str)
                and pixel_count(image.get("height")) and pixel_count(image.get("width"))):
            raise InputError(path, f"images[{i}]: needs an id, a file_name, and a height and width in pixels")
        if image["id"] in images:
            raise InputError(path, f"images[{i}]: id {image['id']} is given to two images")
        images[image["id"]] = (image["file_name"], int(image["height"]), int(image["width"]))
    annotated: dict[Any, list[CocoAnnotation]] = {}
    unread: dict[Any, list[str]] = {}
    problems, used, mentioned = [], set(), set()
    for i, raw in enumerate(data["annotations"]):
        where = f"annotations[{i}]" + (f" (id {raw['id']})" if isinstance(raw, dict) and "id" in raw else "")
        if not isinstance(raw, dict) or not _id(raw.get("image_id")) or raw["image_id"] not in images:
            raise InputError(path, f"{where}: its image_id is not one of the file's images")
        mentioned.add(raw["image_id"])
        if not _id(raw.get("category_id")) or raw["category_id"] not in categories:
            raise InputError(path, f"{where}: its category_id is not one of the file's categories")
        try:
            annotation = _annotation(raw, where, categories[raw["category_id"]])
        except ValueError as exc:
            problems.append(f"{path}: {where}: {exc}; left out")
            unread.setdefault(raw["image_id"], []).append(categories[raw["category_id"]])
            continue
        annotated.setdefault(raw["image_id"], []).append(annotation)
        used.add(raw["category_id"])
    return CocoFile(path, tuple(categories[k] for k in sorted(used, key=_order)),
                    tuple(CocoImage(*images[k], tuple(annotated[k]), tuple(unread.get(k, ()))) for k in images
                          if k in annotated),
                    len(images) - len(mentioned), tuple(problems))


def region_mask(annotations: list[CocoAnnotation], labels: list[int], height: int, width: int) -> np.ndarray:
    """A label mask (uint8 H×W) of regions, each painted with its label (a higher label over a lower where
    two overlap); ValueError naming the annotation whose segmentation does not fit the image."""
    from pycocotools import mask as coco_mask

    out = np.zeros((height, width), np.uint8)
    for annotation, label in sorted(zip(annotations, labels, strict=True), key=lambda pair: pair[1]):
        segmentation = annotation.segmentation
        if isinstance(segmentation, dict) and segmentation["size"] != [height, width]:
            raise ValueError(f"{annotation.where}: its run-length encoding is {segmentation['size'][0]}×"
                             f"{segmentation['size'][1]}, the image {height}×{width}")
        if isinstance(segmentation, dict):
            _check_runs(segmentation, annotation.where)
        if isinstance(segmentation, list) and (far := _far_point(segmentation, height, width)):
            # pycocotools rasterises every edge at 5× before it clips: a point at 1e300 took all the memory
            raise ValueError(f"{annotation.where}: its polygon reaches ({far[0]:g}, {far[1]:g}), more than the "
                             f"image's own size off the {height}×{width} image: drawn on another image, or in "
                             "other units")
        try:
            if isinstance(segmentation, list):
                rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation["counts"], list):
                rle = coco_mask.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
            pixels = coco_mask.decode(rle).astype(bool)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:  # pycocotools': a bad encoding
            raise ValueError(f"{annotation.where}: its segmentation cannot be decoded ({exc})") from None
        if not pixels.any():
            raise ValueError(f"{annotation.where}: its segmentation covers no pixel of the image")
        out[pixels] = label
    return out


def _annotation(raw: dict, where: str, category: str) -> CocoAnnotation:
    bbox = raw.get("bbox")
    if bbox is not None and bbox != []:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise ValueError(f"bbox must be 4 numbers (x, y, width, height), got {bbox!r}")
        bbox = tuple(float(v) for v in bbox)
    else:
        bbox = None
    segmentation = raw.get("segmentation")
    if segmentation in (None, [], {}):
        segmentation = None
    elif isinstance(segmentation, list):
        polygons = segmentation
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(is_number(v) for v in p)
                   for p in polygons):
            raise ValueError("segmentation polygons must each be x, y pairs of at least 3 points")
    elif not (isinstance(segmentation, dict) and isinstance(segmentation.get("size"), list)
              and len(segmentation["size"]) == 2 and all(pixel_count(n) for n in segmentation["size"])
              and isinstance(segmentation.get("counts"), list | str) and segmentation["counts"]):
        # an empty run-length string decodes to whatever memory held (pycocotools 2.0.11): refused here
        raise ValueError("segmentation is neither polygons nor a run-length encoding (a height and width, and "
                         "counts)")
    if segmentation is None and bbox is None:
        raise ValueError("neither a bbox nor a segmentation")
    return CocoAnnotation(where, category, bbox, segmentation)


def _far_point(polygons: list, height: int, width: int) -> tuple[float, float] | None:
    """A polygon point more than the image's own size beyond an edge, if there is one."""
    for polygon in polygons:
        for x, y in zip(polygon[0::2], polygon[1::2], strict=True):
            if not (-width <= x <= 2 * width and -height <= y <= 2 * height):
                return x, y
    return None


def _check_runs(rle: dict, where: str) -> None:
    """ValueError unless the run lengths of a run-length encoding cover exactly its height × width pixels.
    pycocotools 2.0.11 refuses more, but decodes fewer (a file cut short, a damaged string) leaving the
    rest of the mask as whatever memory held: a lesion nobody drew, different on every run."""
    height, width = (int(n) for n in rle["size"])
    counts = rle["counts"]
    runs = run_lengths(counts) if isinstance(counts, str) else counts
    if runs is None:
        raise ValueError(f"{where}: its run-length counts cannot be read (a character COCO's encoding does not "
                         "use, or the string ends inside a number)")
    if not all(is_count(n) for n in runs):
        raise ValueError(f"{where}: its run lengths must be whole numbers ≥ 0")
    if (covered := sum(runs)) != height * width:
        raise ValueError(f"{where}: its run lengths cover {covered} pixels, where its size {height}×{width} has "
                         f"{height * width}: the encoding is cut short or damaged")


def run_lengths(counts: str) -> list[int] | None:
    """The run lengths a COCO compressed counts string holds (pycocotools' ``rleFrString``: six-bit
    characters from '0', five bits of a number each, a continuation bit, sign-extended, each run after
    the second stored as the difference from the run two before); None if the string is not one."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return None  # ends inside a number
            char = ord(counts[position]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position, shift = position + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _is_rectangle(segmentation: list | dict) -> bool:
    """A single polygon of 4 corners (5 when closed) that fills its bounding box: a rectangle, exported as a
    polygon by tools that write every shape so (VIA), not a region drawn by hand."""
    if not (isinstance(segmentation, list) and len(segmentation) == 1 and len(segmentation[0]) in (8, 10)):
        return False
    points = list(zip(segmentation[0][0::2], segmentation[0][1::2], strict=True))
    if len(points) == 5:
        if points[0] != points[4]:
            return False
        points = points[:4]
    xs, ys = {p[0] for p in points}, {p[1] for p in points}
    return len(xs) == 2 and len(ys) == 2 and len(set(points)) == 4


def _id(value: Any) -> bool:
    """An id as COCO files write them: a number, or a string in some tools' exports."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def pixel_count(value: Any) -> bool:
    """A height or width: a whole number above zero (``40`` or ``40.0``)."""
    return is_number(value) and value > 0 and float(value).is_integer()


def _order(key: Any) -> tuple[int, Any]:
    """Category ids in order: numbers by value, then others (some tools write strings) as written."""
    return (0, key) if is_number(key) else (1, str(key))
