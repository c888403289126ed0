"""Opening a long video in napari: the plugin's frame-by-frame reader against napari's own, side by side.

napari's own reader (``napari_builtins``: ``imageio.v3.imread``) decodes the whole recording before the
first frame is shown; the plugin's (``fedmix_engine.data.video_frames.VideoFrames``) lists the frames'
timestamps from the container and decodes a frame when it is shown. Each measurement runs in a fresh
process (peak memory is per process): open the file and get the middle frame, then for the plugin's
reader the next frame (playback, a slider step) and a jump back. Memory: what the open video holds (resident set
after, minus before) and the peak resident set above the one the imports left. Medians of ``--repeats`` runs.

    python benchmarks/video_frames.py [--frames 600] [--height 480] [--width 640] [--gop 50] [--repeats 3]
                                      [--no-write]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, publish

READERS = ("napari's own (whole video)", "the plugin's (frame by frame)")


def write_video(path: Path, frames: int, height: int, width: int, gop: int) -> None:
    """An H.264 MKV (B-frames, a keyframe every ``gop`` frames) of a bright disc moving over speckle."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    speckle = rng.integers(0, 60, (height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for t in range(frames):
            disc = ((yy - height // 2) ** 2 + (xx - (t * 3) % width) ** 2) < (height // 8) ** 2
            grey = speckle + 150 * disc.astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.repeat(grey[..., None], 3, 2), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def measure(reader: str, path: str) -> dict:
    """One reader's figures, in this process (run it in a fresh one)."""
    import av  # noqa: F401  (both readers decode with PyAV: its import is in both baselines)
    import napari_builtins.io  # and napari's imports
    import psutil

    from fedmix_engine.data.video_frames import VideoFrames

    process = psutil.Process()
    base, base_peak = process.memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out: dict = {}
    if reader == READERS[0]:
        [layer] = napari_builtins.io.napari_get_reader(path)(path)  # (data,) or (data, meta, kind)
        data = layer[0]
        middle = len(data) // 2
        data[middle].copy()
    else:
        data = VideoFrames(path)
        middle = len(data) // 2
        data[middle]
        out["open_s"] = time.perf_counter() - start
        step = time.perf_counter()
        data[middle + 1]
        out["next_ms"] = 1e3 * (time.perf_counter() - step)
        step = time.perf_counter()
        data[middle // 3]
        out["jump_back_ms"] = 1e3 * (time.perf_counter() - step)
    out.setdefault("open_s", time.perf_counter() - start)
    out["held_mb"] = (process.memory_info().rss - base) / 2**20  # what the open video keeps in memory
    out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_peak) / 1024  # Linux: KiB
    out["frames"] = len(data)
    return out


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as work:
        video = Path(work) / "recording.mkv"
        write_video(video, args.frames, args.height, args.width, args.gop)
        size_mb = video.stat().st_size / 2**20
        results: dict[str, list[dict]] = {reader: [] for reader in READERS}
        for _ in range(args.repeats):
            for reader in READERS:  # side by side, alternating
                done = subprocess.run([sys.executable, __file__, "--measure", reader, str(video)], check=True,
                                      capture_output=True, text=True)
                results[reader].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def median(reader: str, key: str) -> str:
        values = [r[key] for r in results[reader] if key in r]
        return f"{statistics.median(values):.{1 if key.endswith('_mb') else 3 if key.endswith('_s') else 1}f}" \
            if values else "—"

    raw = args.frames * args.height * args.width * 3 / 2**20
    lines = ["## Opening a long video in napari (frame by frame, against napari's own reader)", "",
             f"Machine: {machine()}. Command: `{command()}`.", "",
             f"An H.264 MKV of {args.frames} frames of {args.height}×{args.width} (keyframe every {args.gop}; "
             f"{size_mb:.2f} MB on disk, {raw:.0f} MB as RGB frames), each reader in a fresh process, medians "
             f"of {args.repeats} runs alternating the two.", "",
             "| reader | open and show the middle frame (s) | memory held (MB) | peak above the imports' (MB) "
             "| next frame (ms) | jump back (ms) |", "|---|---|---|---|---|---|"]
    for reader in READERS:
        lines.append(f"| {reader} | {median(reader, 'open_s')} | {median(reader, 'held_mb')} | "
                     f"{median(reader, 'peak_mb')} | {median(reader, 'next_ms')} | {median(reader, 'jump_back_ms')} |")
    frames = {r["frames"] for reader in READERS for r in results[reader]}
    lines += ["", f"Both readers saw {', '.join(map(str, sorted(frames)))} frame(s). napari's own reader holds the "
              "whole video; the plugin's holds one decoder and the frame asked for."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--gop", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only")
    args = parser.parse_args()
    publish("video-frames", run(args), args.write)


if __name__ == "__main__":
    main()
