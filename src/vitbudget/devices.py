"""Which torch device a run may use, checked before any work (torch's own errors come late and long)."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from .errors import ConfigError

SUPPORTED = "cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | torch.device) -> torch.device:
    """`spec` as a torch.device that exists on this machine; ConfigError saying why not otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(spec)!r}; use {SUPPORTED}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "built with CUDA, but no GPU is visible"
            raise ConfigError(f"device {str(spec)!r} needs CUDA, and this torch {torch.__version__} is {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(spec)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {str(spec)!r} needs Apple's MPS, which this machine or torch build lacks; use --device cpu")
        return device
    raise ConfigError(f"device {str(spec)!r} is not supported; use {SUPPORTED}")


# -- reduced precision --------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """'fp32', 'bf16' or 'fp16' as a torch dtype; ConfigError otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device | str, dtype: torch.dtype | str = torch.float32):
    """Mixed precision for inference or training on `device`: matrix products in `dtype`, the rest as
    torch's autocast rules say (softmax, norms and losses in float32); a no-op for float32.

    The runtime keeps what could underflow in float32 itself (masked softmax with its ε terms,
    explicit attention probabilities), so every method runs under it unchanged.
    """
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device = torch.device(device)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for GPUs; on the CPU use bf16")
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- running out of memory ----------------------------------------------------------------------
def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA), or the RuntimeError the CPU / MPS allocators raise."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text or "not enough memory" in text)


@contextlib.contextmanager
def out_of_memory(device: torch.device | str, hint: str) -> Iterator[None]:
    """Turn running out of memory inside the block into one ConfigError line saying which setting to lower.

    torch's allocator errors are long and name no flag; a batch too big for the device is the
    user's setting, not a vitbudget bug.
    """
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        asked = re.search(r"tried to allocate ([0-9.]+ ?[KMGT]i?B|\d+ bytes)", str(exc), re.IGNORECASE)
        detail = f" (tried to allocate {asked.group(1)})" if asked else ""
        raise ConfigError(f"out of memory on {device}{detail}: {hint}") from None
