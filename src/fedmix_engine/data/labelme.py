"""LabelMe annotation files, which the LabelMe tool saves beside each image (``case-07.png`` and
``case-07.json``), read as the same annotations a COCO file gives (:mod:`coco`).

A shape becomes: a ``polygon`` a drawn region, a ``circle`` (its centre and a point on its edge) a drawn
region too, a ``rectangle`` (two opposite corners) a box. Lines, line strips and points outline nothing:
they are left out, said. The per-image rule is COCO's: an image whose shapes are all regions gets their
mask, one with any box gets every shape as a box. LabelMe's image-level flags are not read: an unticked
flag is what a picture not yet looked at has too, so it cannot say "absent".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedmix_engine.data.coco import CocoAnnotation, CocoImage, pixel_count
from fedmix_engine.errors import InputError
from fedmix_engine.json_values import is_number, parse_json

CIRCLE_POINTS = 64  # a circle as a polygon of this many corners: within a tenth of a pixel for r ≤ 60


def is_labelme_file(path: Path) -> bool:
    """A ``.json`` that LabelMe wrote (it has ``shapes``); a COCO file or another program's JSON is not."""
    if path.suffix.lower() != ".json":
        return False
    try:
        with path.open("rb") as stream:
            return b'"shapes"' in stream.read(1 << 20)  # cheap: LabelMe writes "shapes" near the top
    except OSError:
        return False


def read_labelme(path: Path) -> tuple[CocoImage, list[str]]:
    """The file's shapes as a :class:`CocoImage` (``file_name`` its ``imagePath``), and the shapes left out,
    each named; refused whole (naming the file) when it is not a LabelMe file that can be read."""
    try:
        data = parse_json(path.read_bytes())
    except ValueError as exc:  # not UTF-8, not JSON, nested thousands deep
        raise InputError(path, f"not a LabelMe file that can be read ({exc})") from None
    if not (isinstance(data, dict) and isinstance(data.get("shapes"), list) and pixel_count(data.get("imageHeight"))
            and pixel_count(data.get("imageWidth"))):
        raise InputError(path, "not a LabelMe file: it needs 'shapes', 'imageHeight' and 'imageWidth'")
    annotations, left_out, unread = [], [], []
    for i, shape in enumerate(data["shapes"]):
        where = f"shapes[{i}]"
        try:
            annotations.append(_annotation(shape, where))
        except ValueError as exc:
            left_out.append(f"{path}: {where}: {exc}; left out")
            label = shape.get("label") if isinstance(shape, dict) else None
            unread.append(label.strip() if isinstance(label, str) and label.strip() else None)
    name = data.get("imagePath") if isinstance(data.get("imagePath"), str) and data.get("imagePath") else path.stem
    return CocoImage(name, int(data["imageHeight"]), int(data["imageWidth"]), tuple(annotations),
                     tuple(unread)), left_out


def _annotation(shape: Any, where: str) -> CocoAnnotation:
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
        raise ValueError("a shape needs a label")
    kind = shape.get("shape_type") or "polygon"  # LabelMe before 3.x wrote no type: polygons only
    points = shape.get("points")
    if not (isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 and all(is_number(v) for v in p)
                                             for p in points)):
        raise ValueError("its points must be x, y pairs of numbers")
    label = shape["label"].strip()
    if kind == "rectangle" and len(points) == 2:
        (xa, ya), (xb, yb) = points
        return CocoAnnotation(where, label, (min(xa, xb), min(ya, yb), abs(xb - xa), abs(yb - ya)), None)
    if kind == "polygon" and len(points) >= 3:
        return CocoAnnotation(where, label, None, [[float(v) for p in points for v in p]])
    if kind == "circle" and len(points) == 2:
        (cx, cy), (ex, ey) = points
        r = math.hypot(ex - cx, ey - cy)
        ring = [(cx + r * math.cos(2 * math.pi * k / CIRCLE_POINTS), cy + r * math.sin(2 * math.pi * k / CIRCLE_POINTS))
                for k in range(CIRCLE_POINTS)]
        return CocoAnnotation(where, label, None, [[v for p in ring for v in p]])
    if kind in ("polygon", "rectangle", "circle"):
        raise ValueError(f"a {kind} of {len(points)} point(s)")
    raise ValueError(f"a {kind} outlines no region (polygons, circles and rectangles are read)")
