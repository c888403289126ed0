"""Write a Flower App directory for FedMix: the ``pyproject.toml`` that ``flwr run`` ships to the SuperLink.

The app's code is this installed package (components name ``fedmix_engine.federation.flower.app``),
so the directory holds only the configuration; every SuperNode needs ``napari-fedmix[flower]``
installed (SuperLink started with ``--disable-runtime-dependency-installation``). Needs no flwr.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedmix_engine.atomic import atomic_write_bytes
from fedmix_engine.errors import InputError
from fedmix_engine.federation.flower.settings import FlowerRunSettings

APP_NAME = "fedmix-flower"
FIRST_LINE = "# A Flower App running FedMix (written by `fedmix-engine flower-app`)."  # rewriting ours is fine


def write_flower_app(directory: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Create ``directory/pyproject.toml``; the run configuration is checked before anything is written."""
    # checked here, naming the key, not on the SuperLink; written whole, with what the overrides imply
    # (class-names set the class count)
    config = FlowerRunSettings.from_run_config(overrides or {}).to_run_config()
    from importlib.metadata import version

    path = Path(directory) / "pyproject.toml"
    if path.is_file() and not path.read_text(errors="replace").startswith(FIRST_LINE):
        raise InputError(path, "is another project's pyproject.toml; write the Flower App into its own folder")
    lines = [FIRST_LINE,
             "# Run: flwr run <this folder> <superlink connection>   (see docs/federation.md)",
             "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"',
             'description = "FedMix: mixed-supervision federated segmentation (napari-fedmix)"',
             'license = "BSD-3-Clause"', f'dependencies = ["napari-fedmix[flower]>={version("napari-fedmix")}"]', "",
             "[tool.flwr.app]", 'publisher = "napari-fedmix"', "",
             "[tool.flwr.app.components]", 'serverapp = "fedmix_engine.federation.flower.app:serverapp"',
             'clientapp = "fedmix_engine.federation.flower.app:clientapp"', "",
             "[tool.flwr.app.config]"]
    lines += [f"{key} = {_toml_scalar(value)}" for key, value in config.items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _toml_scalar(value: Any) -> str:
    """A run-config value in TOML: JSON's scalars are TOML's, but for no deadline, which TOML writes inf."""
    return "inf" if value == math.inf else json.dumps(value)
