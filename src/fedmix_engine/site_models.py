"""Where a site folder keeps its models (``SITE/models``), torch-free so the napari widgets can find
them without loading the engine.

``models/global.safetensors`` is the federation's newest global model (``join``, and napari's Train
in federation mode), ``models/local/`` the site's own local run (napari's Train, locally).
"""

from __future__ import annotations

from pathlib import Path

GLOBAL_MODEL = Path("models") / "global.safetensors"
LOCAL_RUN = Path("models") / "local"
LOCAL_MODEL = LOCAL_RUN / "final.safetensors"


def newest_site_model(site: str | Path) -> Path | None:
    """The model a site trained last, federated or local (whichever file is newer); None before any, so
    prediction can start with it instead of asking for a path inside the site folder."""
    models = [Path(site) / name for name in (GLOBAL_MODEL, LOCAL_MODEL) if (Path(site) / name).is_file()]
    return max(models, key=lambda path: path.stat().st_mtime, default=None)
