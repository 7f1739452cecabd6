"""`.pt2` files: the `torch.export` program itself, metadata as an extra file in the archive."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .trace import quiet_torch

METADATA_FILE = "vitbudget.json"


def write_pt2(program: torch.export.ExportedProgram, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    with open(path, "wb") as fh, quiet_torch():  # a file object: the temporary name need not end in .pt2
        torch.export.save(program, fh, extra_files={METADATA_FILE: json.dumps(metadata)})


def load_pt2(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is the same problem for the user
        raise CheckpointError(f"cannot read {str(path)!r} as a torch.export program: {exc}") from exc
    return program, json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}


class Pt2Runner:
    """Logits of a loaded `.pt2` program for a (B, C, H, W) batch, any B >= 1."""

    def __init__(self, path: str | os.PathLike):
        program, self.metadata = load_pt2(path)
        self.module = program.module()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.module(images)
