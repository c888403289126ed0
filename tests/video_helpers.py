"""Writing test videos: real MP4/AVI files through imageio's PyAV plugin."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np


def write_clip(path: Path, frames: int = 10, height: int = 40, width: int = 48) -> np.ndarray:
    """A grey-on-RGB clip with a bright blob moving right, as a scanner's export would hold it; returns
    the frames as decoded (the codec is lossy)."""
    yy, xx = np.mgrid[0:height, 0:width]
    clip = np.stack([np.repeat((60 + 150 * (((yy - 20) ** 2 + (xx - 10 - 2 * t) ** 2) < 64))[..., None], 3, axis=2)
                     for t in range(frames)]).astype(np.uint8)
    iio.imwrite(path, clip, plugin="pyav", codec="mpeg4", fps=10)
    return iio.imread(path, plugin="pyav")
