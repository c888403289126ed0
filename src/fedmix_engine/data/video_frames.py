"""A video's frames by index, each decoded when it is asked for: how napari shows a long endoscopy
recording or cine loop without holding it (a 5-minute 1080p recording is 54 GB of RGB frames).

Opening makes one pass over the container's packets, without decoding, to list every frame's
presentation timestamp: the frame count is then exact (MKV states none, AVI and MP4 only an
estimate) and frame *k* is found by seeking to the keyframe before it and decoding forward. A frame
shortly after the last one decoded (playback, a slider step) continues the decoding instead of
seeking again. Indexing follows NumPy for the leading axis (an int or a slice, then any indices of
a frame), so ``dask.array.from_array`` can wrap it.
"""

from __future__ import annotations

import bisect
import operator
import threading
from pathlib import Path

import numpy as np

from fedmix_engine.errors import InputError

CONTINUE = 64  # frames ahead of the last decoded one that are reached by decoding on rather than seeking


class VideoFrames:
    """Random access to a video's RGB frames (``shape``: F×H×W×3 uint8), safe to use from several threads."""

    def __init__(self, path: str | Path) -> None:
        import av

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "file not found")
        try:
            self._container = av.open(str(self.path))
            self._stream = self._container.streams.video[0]
            # the flush packet at the end has no payload; every other packet is one frame
            self._pts = sorted(p.pts for p in self._container.demux(self._stream) if p.size and p.pts is not None)
        except IndexError:
            raise InputError(self.path, "no video stream in this file") from None
        except Exception as exc:  # FFmpeg raises many types for damaged containers
            raise InputError(self.path, f"unreadable or corrupt video ({type(exc).__name__}: {exc})") from exc
        if not self._pts:
            raise InputError(self.path, "the video holds no frames")
        self._lock = threading.Lock()
        self._decoded = None  # the decoding iterator, and the timestamp it yielded last
        self._last_pts: int | None = None
        first = self._frame(0)
        self.shape: tuple[int, ...] = (len(self._pts), *first.shape)
        self.dtype = first.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self._pts)

    def __getitem__(self, key) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, slice):
            frames = [self._frame(i) for i in range(*first.indices(len(self)))]
            stacked = np.stack(frames) if frames else np.empty((0, *self.shape[1:]), self.dtype)
            return stacked[(slice(None), *rest)]
        return self._frame(operator.index(first))[rest]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def close(self) -> None:
        with self._lock:
            self._container.close()

    def _frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as H×W×3 uint8 RGB."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame video")
        index %= len(self)
        target = self._pts[index]
        with self._lock:
            ahead = (self._last_pts is not None and self._last_pts < target
                     and index - bisect.bisect_right(self._pts, self._last_pts) < CONTINUE)
            if not ahead:
                self._seek(target)
            frame = self._decode_until(target)
            if frame is None:  # an imprecise seek landed past it: from the start, as a player would
                self._seek(self._pts[0])
                frame = self._decode_until(target)
            if frame is None:
                raise InputError(self.path, f"frame {index} could not be decoded")
            return frame

    def _seek(self, pts: int) -> None:
        self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        self._decoded = self._container.decode(self._stream)
        self._last_pts = None

    def _decode_until(self, target: int) -> np.ndarray | None:
        try:
            for frame in self._decoded:
                if frame.pts is None:
                    continue
                self._last_pts = frame.pts
                if frame.pts == target:
                    return frame.to_ndarray(format="rgb24")
                if frame.pts > target:
                    return None
        except Exception as exc:  # a damaged packet
            self._decoded, self._last_pts = None, None
            raise InputError(self.path, f"video damaged near {float(target * self._stream.time_base):.2f} s "
                                        f"({type(exc).__name__}: {exc})") from exc
        self._last_pts = None  # the stream ended before it
        return None
