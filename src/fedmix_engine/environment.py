"""What a run ran on: package versions, CPU and GPU.

A CPU simulation repeats bit for bit on one machine but not across machines or torch builds (other
float kernels; many rounds of training amplify the differences), so a run records where it ran, and a
resumed run says when that changed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

import fedmix_engine
from fedmix_engine.config_diff import changed_fields

# what makes the numbers of a run differ when it changes (measured: 1 vs 2 torch threads moved a width-8
# pair by up to 9e-5 within 2 rounds on CPU)
REPRODUCIBILITY_KEYS = ("fedmix_engine", "torch", "numpy", "cpu", "torch_threads", "gpu")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device | None = None) -> dict[str, str | int]:
    """Versions and hardware, as JSON-ready strings; ``gpu`` names the GPU the run uses, if any."""
    on_gpu = device is not None and device.type == "cuda"
    on_mps = device is not None and device.type == "mps"
    return {
        "fedmix_engine": fedmix_engine.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else "Apple GPU (mps)" if on_mps else "none",
    }


def changed_between(before: dict, now: dict) -> list[str]:
    """The reproducibility-relevant fields that differ, as 'key: before → now' (fields ``before`` lacks,
    from a run recorded by an older version, are not compared)."""
    relevant = {key: now.get(key) for key in REPRODUCIBILITY_KEYS if key in before}
    return [f"{key}: {was} → {value}" for key, was, value in changed_fields(before, relevant)]
