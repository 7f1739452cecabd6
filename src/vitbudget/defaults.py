"""Where the embedded defaults live: the shared reference models, the CIFAR-10 archive and sample photos."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "models/vit_tiny_p4_cifar10.safetensors"
DEFAULT_DATA = "data/cifar10-jpeg.tar.gz"
# dense tasks (`--task saliency`): the pretrained ViT-S/14 with its saliency decoder, and unlabelled photos
DEFAULT_DENSE_MODEL = "models/vits14_saliency"
DEFAULT_PHOTOS = "data/imagenet-sample-250.tar.gz"


def shared_dir() -> Path | None:
    """$VITBUDGET_SHARED, else a `shared/` beside the working directory or the repository."""
    if os.environ.get("VITBUDGET_SHARED"):
        return Path(os.environ["VITBUDGET_SHARED"])
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / "../shared", Path.cwd() / "shared", repo / "../shared"):
        if (candidate / "models").is_dir():
            return candidate.resolve()
    return None


def default_path(relative: str) -> str | None:
    shared = shared_dir()
    return str(shared / relative) if shared else None
