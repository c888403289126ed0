"""Training-side subcommands of ``fedmix-engine`` (simulate, predict), kept apart from the data
commands so that ``fedmix-engine site ...`` never imports torch."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the training-side subcommands."""
