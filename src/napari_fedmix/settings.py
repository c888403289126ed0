"""The plugin's settings (Preferences › FedMix), with safe defaults when napari cannot provide them."""

from __future__ import annotations


def plugin_defaults() -> dict[str, str]:
    """``device`` and ``default_site_folder`` from napari's plugin settings."""
    try:
        from napari.settings import get_plugin_settings

        settings = get_plugin_settings("napari-fedmix")
        return {"device": settings.training.device, "default_site_folder": settings.sites.default_site_folder}
    except Exception:  # older napari without plugin settings, or the plugin not registered
        return {"device": "auto", "default_site_folder": ""}
