"""napari-fedmix: the napari side of FedMix. Thin: widgets and commands that call ``fedmix_engine``."""

__version__ = "0.1.0"
