"""``python -m fedmix_engine …`` is ``fedmix-engine …``: for a service unit or a venv whose bin/ is not on PATH."""

import sys

from fedmix_engine.cli import main

if __name__ == "__main__":  # importing the package's modules (as a test walking them does) runs nothing
    sys.exit(main())
