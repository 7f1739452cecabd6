"""Models named by a Hugging Face hub id: `hf-hub:ORG/NAME[@REVISION]`.

Files come through `huggingface_hub`'s own cache, so its settings hold: HF_HOME / HF_HUB_CACHE
say where, HF_HUB_OFFLINE=1 uses only what is cached (an uncached id is then an error, never a
network call), HF_TOKEN authenticates. Both layouts on the hub load: a transformers directory
(config.json with `model_type`) and a timm one (config.json with `architecture`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, ConfigError

PREFIX = "hf-hub:"
FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"]


def is_hub_id(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def fetch(source: str) -> Path:
    """The local snapshot directory of `hf-hub:ORG/NAME[@REVISION]` (weights as safetensors only)."""
    repo_id, _, revision = source[len(PREFIX):].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"a hub model is named hf-hub:ORG/NAME, got {source!r}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ConfigError("hf-hub: models need the huggingface_hub package: pip install 'vitbudget[hf]'") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=FILES))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{source}: not in the Hugging Face cache and the hub cannot be reached "
                              "(HF_HUB_OFFLINE is set, or no network); download it once online") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot fetch from the Hugging Face hub: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def timm_architecture(directory: Path) -> str | None:
    """The timm model name of a timm-layout hub directory, None for a transformers one."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    arch = config.get("architecture") if isinstance(config, dict) else None
    return arch if isinstance(arch, str) and "model_type" not in config else None
