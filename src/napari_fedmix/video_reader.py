"""File › Open for videos (MP4, AVI, MOV, MKV: ultrasound cine loops, endoscopy recordings) as a lazy
colour stack: each frame is decoded when napari shows it (``fedmix_engine.data.video_frames``), where
napari's own reader decodes the whole recording into memory first (a 5-minute 1080p recording: 54 GB).
Predict then reads the frames a batch at a time, and Annotate › Add the image on screen decodes one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmix_engine.data.video import is_video_path

LayerData = tuple[Any, dict, str]


def get_video_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: the reader when every path is a video file, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    return read_videos if paths and all(is_video_path(p) and Path(p).is_file() for p in paths) else None


def read_videos(path: str | list[str]) -> list[LayerData]:
    """One lazy RGB layer per video, named after its file; a frame is decoded when it is shown or read."""
    import dask.array as da

    from fedmix_engine.data.imageio import image_stem
    from fedmix_engine.data.video_frames import VideoFrames

    layers = []
    for one in [path] if isinstance(path, str) else list(path):
        frames = VideoFrames(one)
        lazy = da.from_array(frames, chunks=(1, *frames.shape[1:]), asarray=True, fancy=False, name=False)
        layers.append((lazy, {"name": image_stem(one), "rgb": True, "metadata": {"frames": frames}}, "image"))
    return layers
