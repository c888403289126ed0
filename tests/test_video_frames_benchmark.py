"""The video benchmark measures both readers on the same file, in processes of their own."""

from __future__ import annotations

import argparse
import re


def test_both_readers_are_measured_side_by_side_on_the_same_frames(video_frames) -> None:
    table = video_frames.run(argparse.Namespace(frames=30, height=48, width=64, gop=10, repeats=1))
    rows = {match[0]: match[1:] for match in re.findall(r"^\| (.+?) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$",
                                                         table, re.M) if match[0] in video_frames.READERS}
    assert set(rows) == set(video_frames.READERS)
    whole, frame_by_frame = rows[video_frames.READERS[0]], rows[video_frames.READERS[1]]
    assert all(float(v) >= 0 for v in whole[:3]) and whole[3:] == ("—", "—")  # napari's: no stepping to time
    assert all(float(v) >= 0 for v in frame_by_frame)
    assert "Both readers saw 30 frame(s)." in table
