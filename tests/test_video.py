"""Videos (ultrasound cine loops, endoscopy recordings): predicted frame by frame without being held
whole, refused by import with what to do instead (napari opening one: test_plugin_widgets). Real MP4/AVI files
written here."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from fedmix_engine.device import plan_device
from fedmix_engine.errors import InputError
from fedmix_engine.fedmix.pair import init_pair
from fedmix_engine.model import ModelConfig
from fedmix_engine.predict import NOT_RUN, FrameStep, Predictor, iter_predict_folder, predict_folder
from video_helpers import write_clip, write_gop_clip

TINY = ModelConfig(base_width=4)


def predictor(batch_size: int = 4) -> Predictor:
    return Predictor(init_pair(TINY, 0), TINY, 32, plan_device("cpu"), batch_size=batch_size)


def test_a_video_is_predicted_frame_by_frame_into_a_multi_page_mask(tmp_path: Path, monkeypatch) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    decoded = write_clip(folder / "clip.mp4")
    avi = write_clip(folder / "loop.avi", frames=3)
    write_clip(folder / "endoscopy.mkv", frames=6)  # MKV does not state its frame count
    (folder / "broken.mp4").write_bytes(b"not a video" * 50)
    model = predictor()

    def whole_read(*args, **kwargs):
        raise AssertionError("a video is read frame by frame, never whole")

    monkeypatch.setattr(iio, "imread", whole_read)
    frames: list[tuple[str, int, int]] = []
    rows = {r.file: r for r in predict_folder(model, folder, out,
                                              on_frames=lambda p, done, total: frames.append((p.name, done, total)))}
    assert [f for f in frames if f[0] == "clip.mp4"] == [("clip.mp4", 4, 10), ("clip.mp4", 8, 10), ("clip.mp4", 10, 10)]
    assert [f for f in frames if f[0] == "endoscopy.mkv"] == [("endoscopy.mkv", 4, 0), ("endoscopy.mkv", 6, 0)]
    assert (rows["endoscopy.mkv"].status, rows["endoscopy.mkv"].frames) == ("ok", 6), "an unstated count is no refusal"
    clip = rows["clip.mp4"]
    assert (clip.status, clip.frames, clip.height, clip.width, clip.mask_file) == ("ok", 10, 40, 48, "clip_mask.tif")
    masks = tifffile.imread(out / "clip_mask.tif")
    assert masks.shape == (10, 40, 48) and masks.dtype == np.uint8
    for t in (0, 9):  # each page is that frame's own 2-D prediction
        np.testing.assert_array_equal(masks[t], model.mask(decoded[t]))
    assert clip.foreground_fraction == pytest.approx(round(float((masks > 0).mean()), 6))
    assert (rows["loop.avi"].frames, tifffile.imread(out / "loop_mask.tif").shape) == (3, (3, 40, 48))
    assert len(avi) == 3
    assert rows["broken.mp4"].status.startswith("skipped: unreadable or corrupt video")


def test_one_video_file_is_predicted_on_its_own(tmp_path: Path, capsys) -> None:
    """A clinician with one recording gives the file, not a folder (the CLI took folders only)."""
    from fedmix_engine.checkpoint import save_checkpoint
    from fedmix_engine.cli import main

    write_clip(tmp_path / "clip.mp4", frames=5)
    iio.imwrite(tmp_path / "other.png", np.zeros((40, 48), np.uint8))  # beside it: not predicted
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", init_pair(TINY, 0), TINY, {"image_size": 32})
    assert main(["predict", str(checkpoint), str(tmp_path / "clip.mp4"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "predicted 1 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_mask.tif", "prediction.json", "summary.csv"]
    assert tifffile.imread(tmp_path / "out" / "clip_mask.tif").shape == (5, 40, 48)


def test_frames_are_taken_from_a_stream_only_as_a_batch_needs_them() -> None:
    pulled: list[int] = []

    def stream():
        for t in range(10):
            pulled.append(t)
            yield np.full((40, 48), 20 * t, np.uint8)

    chunks = predictor(batch_size=4).iter_label_chunks(stream())
    first = next(chunks)
    assert first.shape == (4, 40, 48) and len(pulled) == 4, "one batch decoded, not the whole stream"
    assert [len(c) for c in chunks] == [4, 2] and len(pulled) == 10


def test_a_batch_stopped_inside_a_video_leaves_no_mask_and_lists_it_as_not_run(tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write_clip(folder / "clip.mp4")
    batch = iter_predict_folder(predictor(), folder, out, frame_steps=True)
    assert isinstance(next(batch), FrameStep)
    batch.close()  # a GUI's Cancel between two batches of frames
    assert not list(out.glob("*.tif")) and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with open(out / "summary.csv", newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == [NOT_RUN]


def test_import_refuses_videos_saying_how_to_label_their_frames(tmp_path: Path) -> None:
    from fedmix_engine.data.importer import import_files_steps, import_folder, read_sources
    from fedmix_engine.data.site_store import SiteStore
    from fedmix_engine.steps import run_steps

    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "clip.mp4", frames=2)
    with pytest.raises(InputError, match=r"holds 1 video\(s\): a video is not imported: .*Add the image on screen"):
        read_sources(videos)
    iio.imwrite(videos / "still.png", np.full((40, 48), 90, np.uint8))  # beside an image: the image goes in
    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        report = import_folder(store, videos)
        assert store.image_ids() == ["still"] and report.images_added == 1
        assert report.problems == [f"{videos / 'clip.mp4'}: a video is not imported: a site holds 2-D images, so "
                                   "open it in napari and add the frames to label (Annotate › Add the image on "
                                   "screen); batch predict predicts every frame"]
        chosen = run_steps(import_files_steps(store, [videos / "clip.mp4"]))  # picked in the import dialog
        assert chosen.images_added == 0 and chosen.problems == report.problems


def test_a_multi_page_tiff_is_read_a_page_at_a_time_and_a_bad_page_is_named(tmp_path: Path, monkeypatch) -> None:
    """A long TIFF stack (a time series, a z-stack) was decoded whole before its first frame was predicted."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(1)
    loop = rng.integers(0, 255, (7, 40, 48), dtype=np.uint8)
    tifffile.imwrite(folder / "loop.tif", loop)
    hyper = rng.random((2, 3, 40, 48)).astype(np.float32)
    hyper[1, 2, 5, 5] = np.nan  # time 1, slice 2
    tifffile.imwrite(folder / "hyper.tif", hyper, imagej=True, metadata={"axes": "TZYX"})

    def whole(*args, **kwargs):
        raise AssertionError("a multi-page TIFF is read a page at a time, never whole")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole)
    model = predictor(batch_size=3)
    rows = {r.file: r for r in predict_folder(model, folder, out)}
    assert (rows["loop.tif"].status, rows["loop.tif"].frames) == ("ok", 7)
    masks = tifffile.imread(out / "loop_mask.tif", key=range(7))  # pages, not the series reader patched above
    for t in (0, 6):
        np.testing.assert_array_equal(masks[t], model.mask(loop[t]))
    assert rows["hyper.tif"].status == "skipped: frame (1, 2): image contains NaN or infinite values"
    assert not (out / "hyper_mask.tif").exists()


@pytest.mark.parametrize(("name", "codec", "b_frames"),
                         [("loop.mp4", "mpeg4", None), ("loop.avi", "mpeg4", None), ("scope.mkv", "libx264", None),
                          ("scope.mov", "libx264", None), ("scope.avi", "libx264", None), ("loop.avi", "mpeg4", 2)])
def test_any_frame_of_a_video_is_decoded_on_demand_exactly_as_a_full_decode_gives_it(tmp_path: Path, name: str,
                                                                                    codec: str, b_frames) -> None:
    """napari's frame-by-frame view of a long recording: frames asked in any order (a slider dragged
    back, playback, a jump), keyframes every 10 frames, B-frames out of display order (x264), and MKV,
    which states no frame count. AVI has no presentation timestamps: with B-frames (H.264, or MPEG-4
    with ``bf``) its timestamps are in decoding order, and its index seeks by them."""
    from fedmix_engine.data.video_frames import VideoFrames

    decoded = write_gop_clip(tmp_path / name, codec=codec, b_frames=b_frames)
    frames = VideoFrames(tmp_path / name)
    assert frames.shape == decoded.shape and frames.dtype == np.uint8 and len(frames) == 90
    order = [*np.random.default_rng(0).permutation(90), *range(90), *range(89, -1, -1), 5, 80, 6, -1]
    for index in order:
        np.testing.assert_array_equal(frames[int(index)], decoded[index], err_msg=f"frame {index}")
    np.testing.assert_array_equal(frames[10:20, 5:9], decoded[10:20, 5:9])  # NumPy indexing, as dask slices it
    with pytest.raises(IndexError, match="frame 90 of a 90-frame video"):
        frames[90]
    frames.close()


@pytest.mark.parametrize("name", ["scope.mp4", "scope.mkv", "scope.mov", "scope.avi"])
def test_a_jump_decodes_only_from_the_keyframe_before_the_frame(tmp_path: Path, name: str, monkeypatch) -> None:
    """A seek must land on the keyframe before the frame asked for, not one GOP earlier: each container's
    index seeks by its own timestamps (an MP4's lands a GOP early when given decoding timestamps)."""
    from fedmix_engine.data.video_frames import VideoFrames

    decoded = write_gop_clip(tmp_path / name, frames=120, gop=30)
    frames = VideoFrames(tmp_path / name)
    placed: list[int] = []
    real_place = VideoFrames._place
    monkeypatch.setattr(VideoFrames, "_place", lambda self, frame: placed.append(1) or real_place(self, frame))
    starts = frames._starts
    assert len(starts) >= 4, "the clip has keyframes to jump to"
    for index in (118, 80, 40, 3, 110):  # backwards, or more than CONTINUE ahead: every one is a seek
        placed.clear()
        np.testing.assert_array_equal(frames[index], decoded[index])
        before = max(start for start in starts if start <= index)
        assert len(placed) == index - before + 1, f"frame {index}: decoded from the keyframe at {before}?"
    frames.close()


def test_a_damaged_stretch_of_a_video_is_refused_frame_by_frame_and_the_rest_is_shown(tmp_path: Path) -> None:
    """A recording damaged in its middle (a bad sector, a cut copy) still opens: the damaged frames are refused
    by name, the frames before them and after the next keyframe are shown as a full decode gives them."""
    import av

    from fedmix_engine.data.video_frames import VideoFrames

    path = tmp_path / "scope.mp4"
    clean = write_gop_clip(path, frames=60, gop=30)
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    for pos, size in packets[4:8]:  # the middle of the first GOP, in decoding order
        data[pos:pos + size] = bytes(b ^ 0xFF for b in data[pos:pos + size])
    path.write_bytes(bytes(data))
    frames = VideoFrames(path)
    assert len(frames) == 60
    np.testing.assert_array_equal(frames[0], clean[0])
    refused = []
    for index in range(60):
        try:
            shown = frames[index]
        except InputError as exc:
            assert str(exc).startswith(f"{path}: video damaged near frame {index}"), exc
            refused.append(index)
        else:
            if index >= frames._starts[-1]:
                np.testing.assert_array_equal(shown, clean[index], err_msg=f"frame {index}")
    assert refused and refused[-1] < frames._starts[-1], refused
    frames.close()


def test_a_file_that_is_no_video_is_refused_by_name_when_opened_frame_by_frame(tmp_path: Path) -> None:
    from fedmix_engine.data.video_frames import VideoFrames

    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video")
    with pytest.raises(InputError, match=f"{fake}: unreadable or corrupt video"):
        VideoFrames(fake)
    with pytest.raises(InputError, match="file not found"):
        VideoFrames(tmp_path / "gone.mp4")
