"""Device choice, mixed precision and memory release: the only place that knows about CUDA and MPS.

Written so that the GPU paths run where a GPU exists and their *selection logic* is testable on a
CPU-only machine (``cuda_available``, ``device_count``, ``bf16_supported``, ``mps_available`` and
``probe`` can be injected).

Apple-silicon GPUs (MPS) are used only when asked for (``mps``): ``auto`` says it found one and stays on
the CPU. No Mac was at hand to verify training on MPS, and its copies have had silent-correctness bugs
(pytorch/pytorch#139550, #189690: ``non_blocking`` copies to MPS); so ``to_device`` copies
asynchronously (from pinned memory) only to CUDA.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedmix_engine.errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES_HELP = "use auto, cpu, cuda, cuda:N or mps (an Apple GPU)"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    """Where and how to compute, and why (shown to the user)."""

    device: torch.device
    precision: str  # the precision actually used
    note: str
    pl_batch_size: int  # pseudo-label/prediction batch size for this device (chosen by measurement)
    requested: str = "auto"  # as asked: a GPU named and not used is worth saying where nothing else says the device

    @property
    def gpu_not_used(self) -> bool:
        """A GPU was named (``cuda``, ``cuda:1``, ``mps``) and the CPU computes: absent, or unable to compute."""
        return self.requested not in ("auto", "cpu") and self.device.type == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_mps(self) -> bool:
        return self.device.type == "mps"


def to_device(tensor: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    """``tensor`` on the plan's device. To CUDA from pinned (page-locked) memory and asynchronously, so the
    copy runs beside the GPU's work (torch keeps the pinned block until the copy is done); to MPS
    synchronously (its ``non_blocking`` copies can corrupt)."""
    if plan.is_cuda:
        return tensor.pin_memory().to(plan.device, non_blocking=True)
    return tensor.to(plan.device)


def plan_device(requested: str = "auto", precision: str = "fp32", cuda_available: Callable[[], bool] | None = None,
                bf16_supported: Callable[[], bool] | None = None,
                device_count: Callable[[], int] | None = None,
                mps_available: Callable[[], bool] | None = None,
                probe: Callable[[torch.device], str | None] | None = None) -> DevicePlan:
    """Resolve ``auto|cpu|cuda|cuda:N|mps`` and a precision into a plan, falling back to CPU with a note.

    Mixed precision is a CUDA feature here: on CPU autocast is slower for convolutions, so bf16/fp16
    requests on CPU (and on MPS, unverified) fall back to fp32. fp16 on GPU uses a gradient scaler; bf16
    does not need one. Pseudo-label batch size: 4 on CPU (measured on a 2-core EPYC at the reference
    width, 128²: batch 1 / 4 / 16 gave 6.0 / 6.3 / 5.3 and 5.3 / 7.0 / 6.9 images/s in two runs), 32 on
    CUDA (large batches keep it busy); on MPS the CPU's 4, as nothing was measured there
    (``TrainConfig.pl_batch_size`` sets another). A GPU chosen or named that cannot compute
    (``probe``, by default :func:`unusable_reason`) gives the CPU, with the reason in the note.
    """
    cuda_available = cuda_available or torch.cuda.is_available
    device_count = device_count or torch.cuda.device_count
    mps_available = mps_available or torch.backends.mps.is_available
    probe = probe or unusable_reason
    bf16_supported = bf16_supported or (lambda: torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if precision not in PRECISIONS:
        raise InputError("precision", f"'{precision}' is not one of {', '.join(PRECISIONS)}")
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        device = torch.device("cuda") if cuda_available() else torch.device("cpu")
        if device.type == "cuda":
            note = "GPU found"
        elif mps_available():
            note = "Apple GPU found but not used unless asked for (device mps): training on the CPU"
        else:
            note = "no GPU found: training on the CPU"
    elif requested == "cpu":
        device, note = torch.device("cpu"), "CPU requested"
    elif requested == "mps":
        if mps_available():
            device, note = torch.device("mps"), "Apple GPU (mps) requested"
        else:
            device, note = torch.device("cpu"), "mps requested but no Apple GPU is available: using the CPU"
    elif requested.startswith("cuda"):
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise InputError("device", f"'{requested}' is not a device; {DEVICES_HELP}") from None
        if not cuda_available():
            device, note = torch.device("cpu"), f"{requested} requested but no CUDA GPU is available: using the CPU"
        elif (device.index or 0) >= (count := device_count()):
            # torch would accept it here and fail at the first tensor moved there, mid-run
            raise InputError("device", f"'{requested}': this machine has {count} CUDA GPU(s), "
                                       f"cuda:0 to cuda:{count - 1}")
        else:
            note = f"{requested} requested"
    else:
        raise InputError("device", f"'{requested}' is not a device; {DEVICES_HELP}")
    if device.type != "cpu" and (problem := probe(device)):
        device, note = torch.device("cpu"), f"{note}, but it cannot compute here ({problem}): using the CPU"
    used = precision
    if device.type != "cuda" and precision != "fp32":
        used, note = "fp32", f"{note}; {precision} autocast is for CUDA GPUs only, using fp32"
    elif device.type == "cuda" and precision == "bf16" and not bf16_supported():
        used, note = "fp16", f"{note}; this GPU has no bf16, using fp16 with loss scaling"
    return DevicePlan(device, used, note, pl_batch_size=32 if device.type == "cuda" else 4, requested=requested)


def unusable_reason(device: torch.device) -> str | None:
    """Why a GPU that torch lists cannot compute, or None. torch lists a card it has no kernels for, and
    its first operation fails ('no kernel image is available for execution on the device'): Maxwell and
    Pascal cards, common in clinics, under the CUDA 12.8+ builds of torch 2.8 on (pytorch/pytorch#157517);
    a broken driver fails alike. One small convolution there tells (milliseconds once the GPU is set up;
    not remembered, so a GPU that was full a minute ago is asked again)."""
    try:
        x = torch.ones(1, 1, 4, 4, device=device)
        torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3, device=device)).sum().item()
    except Exception as exc:  # whatever the failure (a RuntimeError, torch's AcceleratorError), the GPU is unusable
        first_line = next(iter(str(exc).strip().splitlines()), "no message")
        return f"{type(exc).__name__}: {first_line}"
    return None


def autocast(plan: DevicePlan) -> contextlib.AbstractContextManager:
    """Autocast context for the plan (a no-op in fp32)."""
    if plan.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float16
    return torch.autocast(device_type=plan.device.type, dtype=dtype)


def grad_scaler(plan: DevicePlan) -> torch.amp.GradScaler:
    """Loss scaling for fp16; disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler(plan.device.type, enabled=plan.precision == "fp16")


def release_memory(plan: DevicePlan) -> None:
    """Give cached GPU memory back to the driver (so the napari viewer and other apps keep theirs).

    CPU memory needs nothing: a full ``gc.collect()`` there holds the GIL for hundreds of
    milliseconds in a big process such as napari (measured: a 338 ms GUI stall), for no gain.
    """
    if plan.is_cuda and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    elif plan.is_mps:
        gc.collect()
        torch.mps.empty_cache()


@contextlib.contextmanager
def on_device(plan: DevicePlan) -> Iterator[DevicePlan]:
    """Run a block of GPU work and release memory afterwards, also on error or cancel."""
    try:
        yield plan
    finally:
        release_memory(plan)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or the MPS allocator's (a plain RuntimeError: it raises no other type)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (  # torch.OutOfMemoryError from 2.5 on: the same class
        isinstance(exc, RuntimeError) and str(exc).startswith("MPS backend out of memory"))


def out_of_memory(plan: DevicePlan, doing: str, advice: str) -> InputError:
    """The error for a GPU that ran out of memory: what was being done, the GPU's size, what to change."""
    size = ""
    if plan.is_cuda and torch.cuda.is_available():
        size = f" ({torch.cuda.get_device_properties(plan.device).total_memory / 2**30:.1f} GiB)"
    return InputError(str(plan.device), f"out of memory{size} {doing}; {advice}")


def forward_in_batches(step: Callable[[slice], torch.Tensor], count: int, batch_size: int,
                       plan: DevicePlan) -> tuple[list[torch.Tensor], int]:
    """``step`` over consecutive slices of ``count`` items: a forward pass, its results on the CPU.

    A GPU out-of-memory error (CUDA's or MPS's; napari and other programs share the card) releases the
    cache and retries the same slice at half the batch, down to one item: a forward pass keeps nothing between
    batches, so the result is the same, only slower. Returns the results and the batch size that
    fitted, for the caller to start from next time."""
    out: list[torch.Tensor] = []
    start = 0
    while start < count:
        stop = min(start + batch_size, count)
        try:
            out.append(step(slice(start, stop)))
            start = stop
            continue
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            # handled outside the except block, so its traceback (and the tensors it holds) is freed first
        release_memory(plan)
        if batch_size == 1:
            raise out_of_memory(plan, "predicting even one image at a time",
                                "close other programs using the GPU, or use the CPU (--device cpu)")
        batch_size = max(1, batch_size // 2)
        log.warning("out of memory on %s: forward passes now in batches of %d", plan.device, batch_size)
    return out, batch_size
