"""Videos (MP4, AVI, MOV, MKV) as streams of RGB frames, read with PyAV (FFmpeg): ultrasound cine
loops and endoscopy recordings as scanners and video towers export them.

Frames are decoded one at a time, so a long recording is never held whole: batch prediction writes
its mask page by page. A site holds 2-D images, so import refuses a video; napari opens it through
the plugin (``video_frames``: a frame decoded when shown) and Annotate › Add the image on screen
takes the frame to label.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmix_engine.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
# why import refuses a video, and what to do instead
NOT_IMPORTED = ("a video is not imported: a site holds 2-D images, so open it in napari and add the frames to "
                "label (Annotate › Add the image on screen); batch predict predicts every frame")


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class Video:
    """A video file opened for reading: its frame count and size from the container, its frames on demand."""

    path: Path
    frames: int  # as the container states it: an estimate in some formats, 0 (unknown) in MKV and WebM
    height: int
    width: int

    def __iter__(self) -> Iterator[np.ndarray]:
        """The frames in order, each H×W×3 uint8 RGB, decoded as they are asked for."""
        import imageio.v3 as iio

        done = 0
        try:
            for frame in iio.imiter(self.path, plugin="pyav"):
                yield frame
                done += 1
        except Exception as exc:  # FFmpeg raises many types for damaged streams
            raise InputError(self.path, f"video damaged after {done} frame(s) ({type(exc).__name__}: {exc})") from exc


def open_video(path: str | Path) -> Video:
    """Open a video (its header only), refusing a missing or unreadable file by name."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        properties = iio.improps(path, plugin="pyav")
    except Exception as exc:
        raise InputError(path, f"unreadable or corrupt video ({type(exc).__name__}: {exc})") from exc
    shape = properties.shape
    if len(shape) != 4:
        raise InputError(path, f"not a video of 2-D frames (shape {tuple(shape)})")
    return Video(path, int(shape[0]), int(shape[1]), int(shape[2]))
