"""FedMix on Flower: a strategy and a ClientApp for sites that join an existing Flower deployment.

Optional (``pip install "napari-fedmix[flower]"``); nothing else in the engine imports this package
or ``flwr``. Transport only, like the built-in server: aggregation is ``fedmix.aggregation``,
training is ``fedmix.local_update``, and replies are validated with the same checks as uploads to
``fedmix-engine serve`` (``federation.wire``). The Flower App definition lives in
``fedmix_engine.federation.flower.app`` (``serverapp`` and ``clientapp``).
"""

from __future__ import annotations

FLWR_HINT = 'the Flower adapter needs flwr: pip install "napari-fedmix[flower]"'
