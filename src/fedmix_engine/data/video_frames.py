"""A video's frames by index, each decoded when it is asked for: how napari shows a long endoscopy
recording or cine loop without holding it (a 5-minute 1080p recording is 54 GB of RGB frames).

Opening makes one pass over the container's packets, without decoding, to list every frame's
timestamps and keyframes: the frame count is then exact (MKV states none, AVI and MP4 only an
estimate) and frame *k* is found by seeking to the keyframe before it and decoding forward. A frame
shortly after the last one decoded (playback, a slider step) continues the decoding instead of
seeking again. Indexing follows NumPy for the leading axis (an int or a slice, then any indices of
a frame), so ``dask.array.from_array`` can wrap it.

A decoded frame is placed by its presentation timestamp where those are true. AVI stores none: with
B-frames (H.264 from a video tower or a screen recorder) FFmpeg gives it timestamps in *decoding*
order, which the decoder hands on out of order. Opening decodes the first frames to tell the two
apart; in such a file a frame is placed by counting the frames decoded since a keyframe, which in a
closed GOP is shown after every frame stored before it.
"""

from __future__ import annotations

import bisect
import operator
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmix_engine.errors import InputError

CONTINUE = 64  # frames ahead of the last decoded one that are reached by decoding on rather than seeking
PROBE = 16  # frames decoded on opening to see whether the timestamps follow the display order


@dataclass(frozen=True)
class _Anchor:
    """A keyframe decoding can start from: the frame it shows, and its timestamp (to seek to, and to know it by)."""

    index: int  # its frame number, in display order
    pts: int


class VideoFrames:
    """Random access to a video's RGB frames (``shape``: F×H×W×3 uint8), safe to use from several threads."""

    def __init__(self, path: str | Path) -> None:
        import av

        self._av = av
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "file not found")
        try:
            self._container = av.open(str(self.path))
            self._stream = self._container.streams.video[0]
            # the flush packet at the end has no payload; every other packet is one frame
            packets = [(p.pts, p.is_keyframe) for p in self._container.demux(self._stream) if p.size]
        except IndexError:
            raise InputError(self.path, "no video stream in this file") from None
        except Exception as exc:  # FFmpeg raises many types for damaged containers
            raise InputError(self.path, f"unreadable or corrupt video ({type(exc).__name__}: {exc})") from exc
        if not packets:
            raise InputError(self.path, "the video holds no frames")
        self._count = len(packets)
        self._lock = threading.Lock()
        self._decoded = None  # the decoding iterator
        self._last: int | None = None  # the frame number it yielded last
        self._expect: _Anchor | None = None  # when counting: the keyframe a seek went to, until it is decoded
        self._skipped = 0
        stamps = [pts for pts, _ in packets]
        self._place_of: dict[int, int] | None = None  # presentation timestamp -> frame number, where true
        if None not in stamps and len(set(stamps)) == len(stamps):
            self._place_of = {pts: i for i, pts in enumerate(sorted(stamps))}
        first = self._probe()
        if self._place_of is not None:
            self._anchors = sorted((_Anchor(self._place_of[pts], pts) for pts, key in packets if key),
                                   key=lambda anchor: anchor.index)
        else:
            self._anchors = [_Anchor(i, pts) for i, (pts, key) in enumerate(packets) if key and pts is not None]
        self._starts = [anchor.index for anchor in self._anchors]
        self.shape: tuple[int, ...] = (self._count, *first.shape)
        self.dtype = first.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self._count

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

    def _probe(self) -> np.ndarray:
        """Decode the first frames from the start: the first one (for the shape), and whether their
        timestamps come in display order; where they do not, frames are placed by counting. A damaged
        packet after the first frame ends the probe, not the opening: the other frames can still be shown."""
        self._restart()
        stamps, first = [], None
        try:
            for frame in self._decoded:
                if first is None:
                    first = frame.to_ndarray(format="rgb24")
                stamps.append(frame.pts)
                if len(stamps) == min(PROBE, self._count):
                    break
        except Exception as exc:
            if first is None:
                raise InputError(self.path, f"unreadable or corrupt video ({type(exc).__name__}: {exc})") from exc
        if first is None:
            raise InputError(self.path, "frame 0 could not be decoded")
        if self._place_of is not None and stamps != sorted(self._place_of)[:len(stamps)]:
            self._place_of = None
        self._decoded, self._last = None, None
        return first

    def _frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as H×W×3 uint8 RGB."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame video")
        index %= len(self)
        with self._lock:
            if not (self._decoded is not None and self._last is not None
                    and self._last < index <= self._last + CONTINUE):
                self._seek_before(index)
            frame = self._decode_until(index)
            if frame is None:  # an imprecise seek landed past it: from the start, as a player would
                self._restart()
                frame = self._decode_until(index)
            if frame is None:
                raise InputError(self.path, f"frame {index} could not be decoded")
            return frame

    def _seek_before(self, index: int) -> None:
        """Seek to the last keyframe at or before frame ``index``; from the start where there is none."""
        at = bisect.bisect_right(self._starts, index) - 1
        if at < 0:
            self._restart()
            return
        anchor = self._anchors[at]
        self._container.seek(anchor.pts, stream=self._stream, backward=True, any_frame=False)
        self._decoded, self._last, self._expect, self._skipped = self._container.decode(self._stream), None, anchor, 0

    def _restart(self) -> None:
        """Decode from the first frame: the container opened again, which works whatever its timestamps."""
        self._container.close()
        self._container = self._av.open(str(self.path))
        self._stream = self._container.streams.video[0]
        self._decoded, self._last, self._expect, self._skipped = self._container.decode(self._stream), None, None, 0

    def _place(self, frame) -> int | None:
        """The frame number of a decoded frame; None for one that cannot be placed (skipped)."""
        if self._place_of is not None:
            return self._place_of.get(frame.pts)
        if self._last is not None:
            return self._last + 1
        if self._expect is None:  # decoding from the start
            return 0
        if frame.pts == self._expect.pts:
            return self._expect.index
        self._skipped += 1
        return None

    def _decode_until(self, index: int) -> np.ndarray | None:
        try:
            for frame in self._decoded:
                place = self._place(frame)
                if place is None:
                    if self._skipped > CONTINUE:  # the keyframe sought never came: give up on this seek
                        break
                    continue
                self._last = place
                if place == index:
                    return frame.to_ndarray(format="rgb24")
                if place > index:
                    return None
        except Exception as exc:  # a damaged packet
            self._decoded, self._last = None, None
            raise InputError(self.path, f"video damaged near frame {index} ({type(exc).__name__}: {exc})") from exc
        self._decoded, self._last = None, None  # the stream ended before it
        return None
