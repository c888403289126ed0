"""The npe2 manifest is valid and every python_name in it imports."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import yaml

import napari_fedmix

MANIFEST = Path(napari_fedmix.__file__).parent / "napari.yaml"


def test_manifest_validates_with_npe2() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    assert manifest.name == "napari-fedmix"


def test_every_python_name_imports_and_sample_data_is_layer_data() -> None:
    commands = yaml.safe_load(MANIFEST.read_text())["contributions"]["commands"]
    for command in commands:
        module, _, attr = command["python_name"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), command["python_name"]
    from napari_fedmix.sample_data import sample_site

    layers = sample_site()
    assert [kind for _, _, kind in layers] == ["image", "labels", "shapes"]
    image, mask = layers[0][0], layers[1][0]
    assert image.shape == mask.shape == (192, 192) and mask.max() == 1
    for rect in layers[2][0]:
        (y0, x0), (y1, x1) = rect.min(0), rect.max(0)
        assert np.any(mask[int(y0):int(y1), int(x0):int(x1)])


def test_plugin_settings_are_declared_and_readable(plugin_settings) -> None:
    from napari.settings import get_plugin_settings
    from npe2 import PluginManager, PluginManifest

    from napari_fedmix.settings import plugin_defaults

    manager = PluginManager.instance()
    if "napari-fedmix" not in manager._manifests:  # napari's test fixtures do not discover installed plugins
        manager.register(PluginManifest.from_file(MANIFEST))

    settings = get_plugin_settings("napari-fedmix")
    assert settings.training.device == "auto" and settings.sites.default_site_folder == ""
    settings.training.device = "cpu"
    assert plugin_defaults()["device"] == "cpu"
    settings.training.device = "mps"  # a Mac's GPU
    assert plugin_defaults()["device"] == "mps"
