"""Load and save ViTs: our safetensors + JSON sidecar, timm state-dict files, live timm models."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import OutputDir, write_json
from .config import ModelInfo, Preprocess, ViTConfig, named_config
from .hf import from_hf, is_hf_model, load_hf_directory
from .vit import VisionTransformer

SIDECAR_FORMAT = "vitbudget.checkpoint/1"


def sidecar_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint sidecar {str(path)!r} not found (pass --arch NAME for a plain state dict)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar {str(path)!r} is not valid JSON: {exc}") from exc
    except OSError as exc:  # a directory, no permission
        raise CheckpointError(f"cannot read checkpoint sidecar {str(path)!r}: {exc.strerror or exc}") from exc
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"checkpoint sidecar {str(path)!r} has no 'config' entry")
    return meta


def model_info_from_sidecar(meta: dict[str, Any], default_name: str) -> ModelInfo:
    """ModelInfo from a sidecar; ConfigError for a malformed name, preprocessing or class list."""
    name = meta.get("name", default_name)
    if not isinstance(name, str):
        raise ConfigError(f"sidecar 'name' must be a string, got {name!r:.80}")
    classes = meta.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
            raise ConfigError(f"sidecar 'classes' must be a list of class names, got {classes!r:.80}")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"sidecar 'classes' names a class twice: {sorted({c for c in classes if classes.count(c) > 1})}")
    return ModelInfo(
        name=name,
        preprocess=Preprocess.from_dict(meta.get("preprocess") or meta.get("normalize")),
        classes=classes,
        extra={k: v for k, v in meta.items() if k not in {"config", "preprocess", "normalize", "classes", "name"}},
    )


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


def load_model(source: Any, *, arch: str | None = None, **config_overrides: Any) -> VisionTransformer:
    """Load a ViT from a checkpoint path or a live timm model, in eval mode.

    - `path.safetensors` with `path.json` beside it: our format (config, preprocessing, metadata).
    - a timm state-dict file (.pth/.pt/.bin/.safetensors) with `arch` naming its shape
      (e.g. 'deit_tiny_patch16_224'); `config_overrides` adjust it (num_classes=10, img_size=32...).
    - a `timm.models.VisionTransformer` instance: weights are copied into our model.
    - a Hugging Face `save_pretrained` directory or a live transformers model (see `models.hf`);
      `img_size=` resamples the position embeddings as the model would at that size.
    """
    if is_hf_model(source):
        return from_hf(source, **_hf_overrides(config_overrides))
    if isinstance(source, nn.Module):
        return from_timm(source)
    path = Path(source)
    if arch is None and path.is_dir():
        return load_hf_directory(path, **_hf_overrides(config_overrides))
    if arch is None:
        sidecar = sidecar_path(path)
        meta = read_sidecar(sidecar)
        try:
            config = meta["config"]
            # sidecars from before `patch_bias` existed: the patch conv always had a bias, pre-norm or not
            if isinstance(config, dict) and config.get("pre_norm") and "patch_bias" not in config:
                config = {**config, "patch_bias": True}
            cfg = ViTConfig.from_dict(config)
            cfg = cfg.replace(**config_overrides) if config_overrides else cfg
            info = model_info_from_sidecar(meta, path.stem)
            if info.classes is not None and len(info.classes) != cfg.num_classes:
                raise ConfigError(f"'classes' lists {len(info.classes)} names for {cfg.num_classes} outputs")
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint sidecar {str(sidecar)!r}: {exc}") from None
    else:
        cfg = named_config(arch, **config_overrides)
        info = ModelInfo(name=arch, preprocess=Preprocess(crop_pct=0.875))  # timm's defaults for these models
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("method.")}  # a method's own tensors
    model = VisionTransformer(cfg)
    load_state_dict_strict(model, state, repr(str(path)))
    model.info = info
    return model.eval()


def _hf_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - {"img_size"})
    if unknown:
        raise ConfigError(f"a Hugging Face model takes only img_size= (its config is fixed), got {', '.join(unknown)}")
    return overrides


def save_model(model: VisionTransformer, path: str | os.PathLike, extra_tensors: dict[str, torch.Tensor] | None = None, **metadata: Any) -> Path:
    """Write `path` (.safetensors) and its JSON sidecar together; metadata is merged into the sidecar.

    Both files are written to a staging directory and then moved into place, the sidecar first,
    so a reader that finds the weights also finds their sidecar. extra_tensors (a method's own
    parameters, prefixed) are stored beside the ViT's.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"model files end in .safetensors, got {str(path)!r}")
    out = OutputDir(path.parent, [sidecar_path(path).name, path.name])
    state = {k: v.detach().contiguous().cpu() for k, v in {**model.state_dict(), **(extra_tensors or {})}.items()}
    meta = {
        "format": SIDECAR_FORMAT,
        "name": model.info.name,
        "arch": "vit",
        "config": model.cfg.to_dict(),
        "preprocess": model.info.preprocess.to_dict(),
        "classes": model.info.classes,
        **model.info.extra,
        **metadata,
    }
    with out.publish() as stage:
        write_json(stage / sidecar_path(path).name, meta)
        save_file(state, str(stage / path.name))
    return path


def config_from_timm(timm_model: nn.Module) -> ViTConfig:
    """Read the architecture off a live timm VisionTransformer; refuse what we cannot mirror.

    Covers timm's plain ViT/DeiT, DeiT III (LayerScale, no_embed_class), registers, DINOv2
    (patch 14, LayerScale), CLIP-style pre-norm towers (quick_gelu or GELU) and the distilled
    DeiT (`VisionTransformerDistilled`: a distillation token and a second head).
    """
    try:
        pe = timm_model.patch_embed
        block = timm_model.blocks[0]
        _refuse_unmirrored_timm(timm_model, block)
        img = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size,) * 2
        patch = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size,) * 2
        if img[0] != img[1] or patch[0] != patch[1]:
            raise ConfigError(f"only square inputs and patches are supported, got img {img} patch {patch}")
        ls = getattr(block, "ls1", nn.Identity())
        distilled = getattr(timm_model, "dist_token", None) is not None
        pre_norm = not isinstance(timm_model.norm_pre, nn.Identity)
        patch_bias = pe.proj.bias is not None
        return ViTConfig(
            img_size=int(img[0]),
            patch_size=int(patch[0]),
            in_chans=pe.proj.in_channels,
            num_classes=timm_model.num_classes,
            global_pool=timm_model.global_pool,
            embed_dim=timm_model.embed_dim,
            depth=len(timm_model.blocks),
            num_heads=block.attn.num_heads,
            mlp_ratio=block.mlp.fc1.out_features / timm_model.embed_dim,
            qkv_bias=block.attn.qkv.bias is not None,
            qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
            init_values=float(ls.gamma.detach().flatten()[0]) if hasattr(ls, "gamma") else None,
            class_token=timm_model.cls_token is not None,
            reg_tokens=int(getattr(timm_model, "num_reg_tokens", 0)),
            no_embed_class=bool(getattr(timm_model, "no_embed_class", False)),
            pre_norm=pre_norm,
            fc_norm=_explicit_fc_norm(timm_model),
            norm_eps=block.norm1.eps,
            act_layer=_timm_activation(block.mlp.act),
            dist_token=distilled,
            patch_bias=None if patch_bias == (not pre_norm) else patch_bias,
        )
    except AttributeError as exc:
        raise ConfigError(f"not a timm VisionTransformer: {exc}") from exc


def _timm_activation(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    timm_names = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}  # timm.layers.activations
    if type(act).__name__ in timm_names:
        return timm_names[type(act).__name__]
    raise ConfigError(f"MLP activation {type(act).__name__} is not supported (supported: GELU, GELU tanh, QuickGELU)")


def _refuse_unmirrored_timm(timm_model: nn.Module, block: nn.Module) -> None:
    """timm options our ViT does not have: each is a clear ConfigError instead of a strict-load key dump."""
    if getattr(timm_model, "attn_pool", None) is not None:
        raise ConfigError("timm models with attention pooling ('map', 'prr') are not supported")
    if timm_model.global_pool not in ("token", "avg"):
        raise ConfigError(f"timm global_pool {timm_model.global_pool!r} is not supported (supported: 'token', 'avg')")
    if getattr(timm_model, "pool_include_prefix", False):
        raise ConfigError("timm pool_include_prefix=True is not supported (average pooling reads patch tokens only)")
    if getattr(timm_model, "pos_embed", None) is None:
        raise ConfigError("timm ViTs without learned absolute position embeddings are not supported")
    if not isinstance(getattr(timm_model, "patch_drop", nn.Identity()), nn.Identity):
        raise ConfigError("timm patch dropout is not supported")
    if isinstance(timm_model.norm, nn.Identity) and isinstance(timm_model.fc_norm, nn.Identity):
        raise ConfigError("timm ViTs without a final norm (final_norm=False) are not supported")
    if not isinstance(timm_model.patch_embed.norm, nn.Identity):
        raise ConfigError("timm patch embeddings with a norm layer are not supported")
    for name, module in (("norm1", block.norm1), ("norm2", block.norm2)):
        if not isinstance(module, nn.LayerNorm):
            raise ConfigError(f"only LayerNorm ViT blocks are supported, got {type(module).__name__} as {name}")
    attn, mlp = block.attn, block.mlp
    if attn.qkv.out_features != 3 * timm_model.embed_dim:
        raise ConfigError("timm attention with a head_dim other than embed_dim / num_heads is not supported")
    if attn.proj.bias is None:
        raise ConfigError("timm attention without an output-projection bias (proj_bias=False) is not supported")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ConfigError("timm scale_attn_norm / scale_mlp_norm are not supported")
    if not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2"):
        raise ConfigError(f"only two-layer MLP blocks are supported, got {type(mlp).__name__} (e.g. SwiGLU)")


def _explicit_fc_norm(timm_model: nn.Module) -> bool | None:
    """None where timm's default (fc_norm iff avg pooling) holds, so configs compare equal."""
    has = not isinstance(timm_model.fc_norm, nn.Identity)
    return None if has == (timm_model.global_pool == "avg") else has


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    cfg = config_from_timm(timm_model)
    model = VisionTransformer(cfg)
    state = timm_model.state_dict()
    check_finite(state, "from the timm model")
    load_state_dict_strict(model, state, "from the timm model")
    pretrained = getattr(timm_model, "pretrained_cfg", None) or {}
    if pretrained.get("mean"):
        model.info.preprocess = Preprocess(mean=tuple(pretrained["mean"]), std=tuple(pretrained["std"]), crop_pct=float(pretrained.get("crop_pct", 1.0)))
    model.info.name = pretrained.get("architecture", "timm_vit")
    return model.eval()
