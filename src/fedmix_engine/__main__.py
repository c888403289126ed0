"""``python -m fedmix_engine …`` is ``fedmix-engine …``: for a service unit or a venv whose bin/ is not on PATH."""

import sys

from fedmix_engine.cli import main

sys.exit(main())
