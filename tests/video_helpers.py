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


def write_gop_clip(path: Path, frames: int = 90, gop: int = 10, codec: str = "libx264", height: int = 48,
                   width: int = 64, b_frames: int | None = None) -> np.ndarray:
    """A clip with a keyframe every ``gop`` frames (and, with libx264 or ``b_frames``, B-frames stored out
    of display order), written with PyAV directly to set them; returns the frames as decoded in one pass."""
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.options = {"bf": str(b_frames)}
        for t in range(frames):  # a blob moving right and a brightness step per frame: every frame differs
            grey = 40 + 150 * (((yy - 24) ** 2 + (xx - t % width) ** 2) < 64) + 2 * (t % 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.repeat(grey[..., None], 3, 2).astype(np.uint8),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return iio.imread(path, plugin="pyav")
