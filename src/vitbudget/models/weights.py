"""State dicts from files, checked: readable, all tensors, finite; strict loading that names mismatches.

Shared by every loader (our checkpoints, timm files, Hugging Face directories), so none of them
imports another to reach it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: they evaluate to plausible-looking garbage."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {source} holds non-finite values (NaN or Inf) in {len(bad)} tensor(s), "
                              f"e.g. {', '.join(bad[:3])}: it is damaged or its training diverged")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (plain, or under 'model' / 'state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip errors all mean 'unreadable'
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    check_finite(obj, repr(str(path)))
    return obj


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """strict=True loading whose error names the mismatch instead of dumping every key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        difference = _backbone_difference(state, own)
        parts = [difference] if difference else []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]) + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"missing {len(missing)} keys e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(f"checkpoint {source} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _backbone_shape(state: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(blocks, width) a state dict holds: the shape a mismatch message should name first."""
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    proj = state.get("patch_embed.proj.weight")
    return depth, None if proj is None else int(proj.shape[0])


def _backbone_difference(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """'the weights hold 12 blocks of width 384, the config 6 blocks of width 192', when they differ."""
    held, wanted = _backbone_shape(state), _backbone_shape(own)
    if held == wanted:
        return None
    if held == (0, None):
        return "the weights hold no ViT backbone (no patch embedding, no blocks)"
    width = lambda w: f" of width {w}" if w is not None else ""  # noqa: E731
    return f"the weights hold {held[0]} blocks{width(held[1])}, the config {wanted[0]} blocks{width(wanted[1])}"
