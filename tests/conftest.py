"""Shared fixtures: small real files on disk, never mocks of the file system."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

# The Flower adapter's tests run in their own environment (make test-flower: .venv-flower has flwr,
# whose pinned FastAPI/uvicorn stay out of the napari environment); elsewhere they are not collected.
if importlib.util.find_spec("flwr") is None:
    collect_ignore = ["test_flower.py"]


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
