"""File › Open Sample: a synthetic ultrasound image with each supervision kind, from the engine's generator."""

from __future__ import annotations

from typing import Any


def sample_site() -> list[tuple[Any, dict, str]]:
    """One ultrasound-like image, its lesion mask and the lesion boxes a clinician would draw."""
    import numpy as np

    from fedmix_engine.data.synthetic import site_domain, synth_image
    from fedmix_engine.data.weak_labels import boxes_from_mask

    rng = np.random.default_rng(7)
    image, mask = synth_image(rng, 192, site_domain(0, rng))
    rectangles = [np.array([[b.y0, b.x0], [b.y0, b.x1], [b.y1, b.x1], [b.y1, b.x0]], float)
                  for b in boxes_from_mask(mask, ("lesion",), rng)]
    return [
        (image, {"name": "ultrasound"}, "image"),
        (mask, {"name": "lesion mask", "opacity": 0.4}, "labels"),
        (rectangles, {"name": "lesion boxes", "shape_type": "rectangle", "edge_color": "yellow",
                      "face_color": "transparent", "edge_width": 1}, "shapes"),
    ]
