"""Regenerate the README's picture: one synthetic image per site, with what each site may annotate.

Usage: .venv/bin/python docs/make_figures.py   (writes docs/images/sample-federation.png)
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.segmentation import find_boundaries

from fedmix_engine.data.synthetic import boxes_from_mask, site_domain, synth_image

OUT = Path(__file__).parent / "images" / "sample-federation.png"


def _panel(kind: str, index: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    image, mask = synth_image(rng, 192, site_domain(index, rng))
    rgb = np.repeat(image[..., None], 3, axis=2)
    if kind == "mask":
        rgb[find_boundaries(mask > 0, mode="inner")] = (255, 80, 80)
    elif kind == "box":
        for b in boxes_from_mask(mask, ("lesion",), rng):
            rgb[b.y0:b.y1, [b.x0, b.x1 - 1]] = (255, 220, 0)
            rgb[[b.y0, b.y1 - 1], b.x0:b.x1] = (255, 220, 0)
    else:  # tag: a green (present) or grey (absent) corner marker
        rgb[4:20, 4:20] = (60, 220, 60) if mask.any() else (128, 128, 128)
    return rgb


def main() -> None:
    panels = [_panel(kind, i, seed=3) for i, kind in enumerate(("mask", "box", "tag"))]
    gap = np.full((192, 6, 3), 255, np.uint8)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(OUT, np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
