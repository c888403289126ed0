"""SIGKILL a napari-free process driving the annotate widget's save path: nothing saved before is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from fedmix_engine.data.site_store import SiteStore

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from fedmix_engine.data.site_store import SiteStore
    from napari_fedmix.layer_records import save_annotations
    store = SiteStore.open(sys.argv[1])
    i = 0
    while True:
        image_id = f"img-{i % 3}"
        mask = np.zeros((40, 48), np.uint8)
        mask[i % 30: i % 30 + 4, 2:8] = 1
        rects = [np.array([[i % 30, 0], [i % 30 + 5, 9]], float), np.array([[0, 20], [9, 40]], float)]
        problems = save_annotations(store, image_id, mask, rects, ["lesion", "lesion"], {"lesion": bool(i % 2)})
        assert not problems, problems
        print(image_id, i, flush=True)
        i += 1
""")


def test_sigkill_mid_autosave_keeps_every_completed_save(tmp_path: Path) -> None:
    assert "napari" not in CHILD.split("napari_fedmix")[0]
    with SiteStore.create(tmp_path / "site", ["lesion"]) as store:
        for k in range(3):
            store.add_image(np.full((40, 48), 100, np.uint8), f"img-{k}")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "site")], stdout=subprocess.PIPE, text=True)
    done = []
    while len(done) < 60:
        line = proc.stdout.readline()
        assert line, "child died"
        image_id, i = line.split()
        done.append((image_id, int(i)))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # what the child acknowledged between the last line read and the signal is still in the pipe (whole lines,
    # each below PIPE_BUF): without it a loaded machine shows a save "past" the one in flight
    done += [(image_id, int(i)) for image_id, i in map(str.split, proc.stdout.read().splitlines())]
    code = "import sys; import napari_fedmix.layer_records; print('napari' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    with SiteStore.open(tmp_path / "site") as store:
        for image_id in ("img-0", "img-1", "img-2"):
            last = max(i for m, i in done if m == image_id)
            allowed = {last, last + 3}  # the acknowledged save, or the one in flight
            mask = store.read_mask(image_id)
            assert mask is not None
            assert int(np.flatnonzero(mask.any(1))[0]) in {i % 30 for i in allowed}
            boxes = store.boxes(image_id)
            assert len(boxes) == 2 and boxes[0].y0 in {i % 30 for i in allowed}
            assert store.tags(image_id)["lesion"] in {bool(i % 2) for i in allowed}
