"""Which torch device a run may use, checked before any work (torch's own errors come late and long)."""
from __future__ import annotations

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
