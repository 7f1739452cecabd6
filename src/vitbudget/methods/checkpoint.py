"""Checkpoints of a method: the ViT under timm names plus the method's own parameters.

One safetensors file holds the backbone's keys unprefixed (so `load_model` still reads it as a
plain ViT) and the method's parameters under `method.`; the sidecar's "method" entry names the
method and its options, so `load_method` rebuilds exactly what was trained.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..models.hub import is_hub_id
from ..models.loading import load_model, load_state_dict_strict, read_sidecar, save_model, sidecar_path
from .base import Method
from .registry import build_method, get_spec

METHOD_PREFIX = "method."


def method_entry(method: Method) -> dict[str, Any]:
    opts = dataclasses.asdict(method.options) if dataclasses.is_dataclass(method.options) else {}
    return {"name": method.name, "options": opts}


def own_state(method: Method) -> dict[str, Any]:
    """The method's parameters and buffers that are not the wrapped ViT's.

    A stack (methods.compose) names the parts that hold tensors of their own (`checkpoint_parts`):
    their own state, prefixed by the part's name (`reducer.`).
    """
    parts = getattr(method, "checkpoint_parts", None)
    if parts is not None:
        return {f"{name}.{k}": v for name, part in parts().items() for k, v in own_state(part).items()}
    return {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}


def save_method(method: Method, path: str | os.PathLike, **metadata: Any) -> Path:
    extra = {METHOD_PREFIX + k: v for k, v in own_state(method).items()}
    return save_model(method.model, path, extra_tensors=extra, method=method_entry(method), **metadata)


def load_method(path: str | os.PathLike, name: str | None = None, *, img_size: int | None = None, **overrides: Any) -> Method:
    """Rebuild the method saved at `path`; `overrides` change inference options (e.g. a threshold).

    img_size: run at another input size than the checkpoint's (position embeddings resampled once).

    Asking for a method the checkpoint was not trained as is an error, unless that method has
    no parameters of its own or builds them from the backbone (`post_hoc = True`, e.g. ABS's
    extra block copied from the last block): training-free methods apply to any ViT checkpoint.
    A stack and its reducer share their trained part: a `spot` checkpoint loads as `spot+abs`
    (with its options) and a `spot+abs` checkpoint as `spot`.
    """
    # a Hugging Face directory or hub id holds no method
    meta = {} if is_hub_id(path) or Path(path).is_dir() else read_sidecar(sidecar_path(path))
    saved = meta.get("method") or {"name": "baseline", "options": {}}
    if not isinstance(saved, dict) or not isinstance(saved.get("name"), str) or not isinstance(saved.get("options", {}), dict):
        raise CheckpointError(f"checkpoint sidecar {str(sidecar_path(path))!r}: 'method' must be "
                              f'{{"name": NAME, "options": {{...}}}}, got {saved!r:.80}')
    saved = {"options": {}, **saved}
    name = name or saved["name"]
    relation = _relation(name, saved["name"])
    options = {**_carried_options(relation, name, saved["options"]), **overrides}
    if not meta:  # a Hugging Face model resamples as the model itself interpolates (models.hf)
        model = load_model(path, **({"img_size": img_size} if img_size else {}))
    else:
        model = load_model(path)
        if img_size is not None and img_size != model.cfg.img_size:
            model.set_input_size(img_size)
    method = build_method(name, model, **options)
    expected = own_state(method)
    if relation is None and getattr(method, "post_hoc", False):
        return method.eval()
    if relation is None and expected:
        raise CheckpointError(
            f"{str(path)!r} holds a {saved['name']!r} checkpoint with no {name!r} parameters ({len(expected)} tensors needed); "
            f"train it with `vitbudget train --method {name}` first"
        )
    if expected:
        from ..models.loading import read_state_dict

        stored = {k[len(METHOD_PREFIX):]: v for k, v in read_state_dict(path).items() if k.startswith(METHOD_PREFIX)}
        if relation == "stack of saved":
            stored = {STACK_PART + k: v for k, v in stored.items()}
        elif relation == "part of saved":
            stored = {k[len(STACK_PART):]: v for k, v in stored.items() if k.startswith(STACK_PART)}
        holder = _OwnState(method)
        load_state_dict_strict(holder, stored, repr(str(path)) + f" ({name} parameters)")
    return method.eval()


STACK_PART = "reducer."


def _relation(requested: str, saved: str) -> str | None:
    """How a checkpoint saved as `saved` serves `requested`: 'same', 'stack of saved' (tome -> tome+abs),
    'part of saved' (tome+abs -> tome), or None (unrelated: only parameter-free methods load)."""
    if requested == saved:
        return "same"
    if "+" in requested and requested.split("+")[0] == saved:
        return "stack of saved"
    if "+" in saved and saved.split("+")[0] == requested:
        return "part of saved"
    return None


def _carried_options(relation: str | None, requested: str, saved: dict[str, Any]) -> dict[str, Any]:
    """The saved options that still apply: all of them for the same method or its stack, the part's for a part."""
    if relation is None:
        return {}
    if relation == "part of saved":
        fields = {f.name for f in dataclasses.fields(get_spec(requested).options)}
        return {k: v for k, v in saved.items() if k in fields}
    return dict(saved)


class _OwnState:
    """Adapter so strict loading checks only the method's own tensors."""

    def __init__(self, method: Method):
        self.method = method

    def state_dict(self):
        return own_state(self.method)

    def load_state_dict(self, state, strict=True):
        parts = getattr(self.method, "checkpoint_parts", None)
        if parts is not None:
            for name, part in parts().items():
                _OwnState(part).load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}, strict)
            return None
        full = {**{f"model.{k}": v for k, v in self.method.model.state_dict().items()}, **state}
        return self.method.load_state_dict(full, strict=strict)
