"""Shared fixtures: small real files on disk, never mocks of the file system."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

# The Flower adapter's tests run in their own environment (make test-flower: .venv-flower has flwr,
# whose pinned FastAPI/uvicorn stay out of the napari environment); elsewhere they are not collected.
if importlib.util.find_spec("flwr") is None:
    collect_ignore = ["test_flower.py"]

# `make test` runs the suite in two worker processes (pytest-xdist). Each trains with one torch thread, as the
# site processes do (federation_helpers.ENV): two workers of two threads each on two cores slow each other
# down. Set before a test module imports torch; the processes the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# napari saves its settings (window geometry, at every viewer's close) and its icon cache in the user's
# folders: each test process gets folders of its own, so two workers never write one file at once and the
# suite leaves a user's napari as it found it. Set before napari.settings is imported (napari reads it then).
_NAPARI_HOME = Path(tempfile.mkdtemp(prefix="fedmix-tests-napari-"))
atexit.register(shutil.rmtree, _NAPARI_HOME, ignore_errors=True)
os.environ["NAPARI_CONFIG"] = str(_NAPARI_HOME / "settings.yaml")
os.environ["XDG_CACHE_HOME"] = str(_NAPARI_HOME / "cache")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first, file order otherwise: with one test per unit of work (`make test`
    runs ``-n 2 --dist loadgroup``) each worker starts with one of them, instead of one worker running them
    back to back while the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


NO_SCREEN = ("this test opens Qt windows and there is no screen: DISPLAY is not set and pytest-xvfb found no "
             "Xvfb to start one. Install Xvfb and the X libraries Qt needs (the apt-get line in .ci/run), or run "
             "the suite under xvfb-run")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Without a screen Qt aborts the whole test process (under xdist: a worker crash and an INTERNALERROR
    that name nothing); a widget test fails instead, saying what to install. Tests without Qt still run."""
    screen = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    if "qapp" in getattr(item, "fixturenames", ()) and not screen and sys.platform.startswith("linux"):
        pytest.fail(NO_SCREEN, pytrace=False)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """A test that sets torch's thread count (``--threads 1`` run in-process sets it for the whole process)
    leaves the next test the count it found."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def grey_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(48, 64), dtype=np.uint8)


@pytest.fixture
def lesion_mask() -> np.ndarray:
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 15:30] = 1
    return mask


@pytest.fixture
def site(tmp_path: Path):
    from fedmix_engine.data.site_store import SiteStore

    store = SiteStore.create(tmp_path / "site", ["lesion"])
    yield store
    store.close()


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark(name: str) -> Iterator[ModuleType]:
    """A script of benchmarks/ imported as a module; its ``from common import …`` needs benchmarks/ on the path."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def quality() -> Iterator[ModuleType]:
    yield from _benchmark("quality")


@pytest.fixture(scope="module")
def alignment() -> Iterator[ModuleType]:
    yield from _benchmark("alignment")


@pytest.fixture(scope="module")
def disagreement() -> Iterator[ModuleType]:
    yield from _benchmark("disagreement")


@pytest.fixture(scope="module")
def selection() -> Iterator[ModuleType]:
    yield from _benchmark("selection")


@pytest.fixture(scope="module")
def video_frames() -> Iterator[ModuleType]:
    yield from _benchmark("video_frames")


@pytest.fixture(scope="module")
def speed() -> Iterator[ModuleType]:
    yield from _benchmark("speed")
