"""FedMix engine: Qt-free, napari-free core of napari-fedmix.

Heavy modules (torch) are imported by the submodules that need them, so that
``import fedmix_engine`` stays cheap for the CLI and the napari plugin.
"""

from fedmix_engine.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
