"""A package offering a network through the ``fedmix_engine.models`` entry point, installed the way
pip leaves one on disk (a module and its ``*.dist-info`` folder on the import path), where
importlib.metadata finds it, in this process and in the processes a test starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import federation_helpers
from fedmix_engine.model import config as model_config

NETWORK = '''
import torch


class TinyConv(torch.nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(in_channels, 6, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(6, num_classes, 1))

    def forward(self, x):
        return self.body(x)


def build(config):
    return TinyConv(config.in_channels, config.num_classes)
'''

ENTRY_POINTS = """[fedmix_engine.models]
tiny-conv = fedmix_tinynet:build
broken = fedmix_tinynet_broken:build
not-a-builder = fedmix_tinynet:__doc__
"""


def install_network_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``fedmix-tinynet 0.1`` (networks ``tiny-conv``, ``broken``: its import fails, ``not-a-builder``)
    on the import path of this process and, through the returned environment (also the server
    helpers'), of the processes a test starts; this process's registry is put back afterwards."""
    packages = tmp_path / "site-packages"
    packages.mkdir()
    (packages / "fedmix_tinynet.py").write_text(NETWORK)
    (packages / "fedmix_tinynet_broken.py").write_text("raise ImportError('needs timm, which is not installed')\n")
    info = packages / "fedmix_tinynet-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedmix-tinynet\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setattr(model_config, "_REGISTRY", {"unet": model_config._unet})  # none another test registered
    env = {**federation_helpers.ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(packages),
                                                                                 os.environ.get("PYTHONPATH")]))}
    monkeypatch.setattr(federation_helpers, "ENV", env)  # the server process finds the package too
    return env
