"""Hugging Face transformers ViTs mapped onto ours, tensor for tensor.

Supported architectures (the tests build each from a small random config and compare outputs):
ViTModel / ViTForImageClassification, DeiTModel / DeiTForImageClassification /
DeiTForImageClassificationWithTeacher, Dinov2Model / Dinov2ForImageClassification,
Dinov2WithRegistersModel / Dinov2WithRegistersForImageClassification, and CLIPVisionModel.

transformers is an optional extra: `from_hf(model)` takes a live model, while
`load_model(directory)` reads a `save_pretrained` directory (config.json, the weights,
preprocessor_config.json) without importing transformers. Both the hub's tensor names
(`encoder.layer.0.attention.attention.query`) and transformers 5's (`layers.0.attention.q_proj`)
are read.

How the weights map (strictly: every tensor is used, or named below as left out and why):
- q, k and v projections are concatenated into timm's fused `qkv`.
- A model without a classification head returns pooled features: the final-normed CLS token,
  which is `last_hidden_state[:, 0]` of ViTModel / DeiTModel and `pooler_output` of Dinov2Model
  and CLIPVisionModel. The dense + tanh `pooler` of ViTModel / DeiTModel is left out (it is not
  applied; most users read `last_hidden_state[:, 0]`), and so is `mask_token` (masked image
  modelling only).
- DeiTForImageClassification's distillation token, read by no head, is a register token (same
  layout: after CLS, with a position embedding); DeiTForImageClassificationWithTeacher keeps it as
  `dist_token` with `head_dist` (logits are the mean of the two heads, as Hugging Face computes).
- DINOv2 with registers gives CLS a position embedding and the registers none: that is timm's
  `no_embed_class` with CLS's position folded into the CLS token (as timm's own converter does).
- Dinov2ForImageClassification reads [CLS, mean of patch tokens]: global_pool 'token_avg'.
- CLIPVisionModel: `pre_layrnorm` (sic) is the pre-norm, `post_layernorm` the final norm, the
  patch embedding has no bias, and the activation is the config's (quick_gelu for OpenAI CLIP).

Input size: the native grid (config.image_size) maps exactly. `img_size=` (or, for a directory,
the image processor's crop size) resamples the position embeddings once, exactly as the Hugging
Face model interpolates them on the fly at that size; the note is kept in `model.info.extra`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, InputError
from .config import ModelInfo, Preprocess, ViTConfig
from .vit import VisionTransformer
from .weights import load_state_dict_strict, read_state_dict


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class Family:
    prefix: str  # base_model_prefix in the classification models' state dicts
    antialias: bool  # how the model interpolates position embeddings at another size
    mean_std: tuple  # its image processor's default normalisation, used when none is given


FAMILIES = {
    "vit": Family("vit", antialias=False, mean_std=((0.5,) * 3, (0.5,) * 3)),
    "deit": Family("deit", antialias=False, mean_std=IMAGENET),
    "dinov2": Family("dinov2", antialias=False, mean_std=IMAGENET),
    "dinov2_with_registers": Family("dinov2_with_registers", antialias=True, mean_std=IMAGENET),
    "clip_vision_model": Family("vision_model", antialias=False, mean_std=OPENAI_CLIP),
}

# architecture -> (model_type, head): 'features' = no head, 'token' = classifier on CLS,
# 'teacher' = CLS head + distillation head, 'token_avg' = classifier on [CLS, mean of patches]
ARCHITECTURES = {
    "ViTModel": ("vit", "features"),
    "ViTForImageClassification": ("vit", "token"),
    "DeiTModel": ("deit", "features"),
    "DeiTForImageClassification": ("deit", "token"),
    "DeiTForImageClassificationWithTeacher": ("deit", "teacher"),
    "Dinov2Model": ("dinov2", "features"),
    "Dinov2ForImageClassification": ("dinov2", "token_avg"),
    "Dinov2WithRegistersModel": ("dinov2_with_registers", "features"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "token_avg"),
    "CLIPVisionModel": ("clip_vision_model", "features"),
}

REFUSED = {
    "CLIPModel": "pass model.vision_model (a CLIPVisionModel): its pooled features are what the image tower computes before the text-aligned projection",
    "CLIPVisionModelWithProjection": "pass model.vision_model (a CLIPVisionModel); the image projection (visual_projection) is not mapped",
    "CLIPForImageClassification": "its classifier reads un-normalised mean patch tokens (post_layernorm unused), which our ViT does not mirror",
    "ViTForMaskedImageModeling": "masked image modelling models are not supported; load the ViTModel part",
    "DeiTForMaskedImageModeling": "masked image modelling models are not supported; load the DeiTModel part",
    "Dinov2Backbone": "backbone (multi-stage feature map) models are not supported; load it as Dinov2Model",
    "Dinov2WithRegistersBackbone": "backbone (multi-stage feature map) models are not supported; load it as Dinov2WithRegistersModel",
}
UNSUPPORTED_TYPES = {
    "beit": "BEiT uses relative position bias, which our ViT (absolute position embeddings) does not have",
    "data2vec-vision": "Data2Vec-vision uses relative position bias, which our ViT (absolute position embeddings) does not have",
    "clip": ("a full CLIPModel (image and text towers); pass model.vision_model (a CLIPVisionModel), e.g. "
             "vb.from_hf(CLIPVisionModel.from_pretrained(path)); its features are the image tower's, before the text-aligned projection"),
    "vit_mae": "ViT-MAE uses fixed sine-cosine position embeddings and random masking in its forward",
}

ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's enum values in image processor files

LAYER = r"(?:encoder\.layers?|layers)\.(\d+)\."
_RULES: list[tuple[str, str]] = [
    (r"embeddings\.(?:cls_token|class_embedding)", "cls_token"),
    (r"embeddings\.distillation_token", "<distillation>"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.(?:position_embeddings|position_embedding\.weight)", "pos_embed"),
    (r"embeddings\.(?:patch_embeddings\.projection|patch_embedding)\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"(?:layernorm|post_layernorm)\.(weight|bias)", r"norm.\1"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
    (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
    (LAYER + r"(?:layernorm_before|norm1|layer_norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (LAYER + r"(?:layernorm_after|norm2|layer_norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (LAYER + r"attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.qkv.\3@\2"),
    (LAYER + r"(?:attention|self_attn)\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.qkv.\3@\2"),
    (LAYER + r"(?:attention\.output\.dense|attention\.o_proj|self_attn\.out_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (LAYER + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
]
LEFT_OUT = {
    r"embeddings\.mask_token": "the masked-image-modelling token (unused at inference)",
    r"embeddings\.position_ids": "an index buffer",
    r"pooler\.dense\.(?:weight|bias)": "the dense + tanh pooler (features are the final-normed CLS token)",
}
QKV_ORDER = {"q": 0, "query": 0, "k": 1, "key": 1, "v": 2, "value": 2}


# -- config ------------------------------------------------------------------------------------
def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"only square sizes are supported: {what} is {list(value)}")
        value = value[0]
    return _integer(value, what)


def _integer(value: Any, what: str, low: int = 1) -> int:
    """A JSON integer >= low; otherwise a ConfigError naming the field (not a ValueError or ZeroDivisionError later)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{what} must be an integer >= {low}, got {value!r:.60}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r:.60}")
    return float(value)


def _required(hf: dict[str, Any], key: str, architecture: str) -> Any:
    if key not in hf:
        raise ConfigError(f"Hugging Face {architecture} config lacks {key!r}")
    return hf[key]


def _num_labels(hf: dict[str, Any]) -> int:
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))  # PretrainedConfig's default


def class_names(hf: dict[str, Any]) -> list[str] | None:
    """id2label in index order, unless it is the placeholder LABEL_0, LABEL_1, ..."""
    labels = hf.get("id2label") or {}
    names = [str(labels.get(i, labels.get(str(i), ""))) for i in range(len(labels))]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def config_from_hf(hf: dict[str, Any], architecture: str) -> ViTConfig:
    """Our ViTConfig for a Hugging Face config dict (`config.json` or `model.config.to_dict()`)."""
    model_type = hf.get("model_type", "")
    if architecture in REFUSED:
        raise ConfigError(f"Hugging Face {architecture} is not supported: {REFUSED[architecture]}")
    if model_type in UNSUPPORTED_TYPES:
        raise ConfigError(f"Hugging Face model type {model_type!r} is not supported: {UNSUPPORTED_TYPES[model_type]}")
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"Hugging Face architecture {architecture or model_type!r} is not supported (not a plain ViT we map); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    family, head = ARCHITECTURES[architecture]
    if model_type and model_type != family:
        raise ConfigError(f"{architecture} with model_type {model_type!r}: expected {family!r}")
    if hf.get("use_swiglu_ffn"):
        raise ConfigError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn, e.g. dinov2-giant) is not supported: our blocks have a two-layer GELU MLP")
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ConfigError(f"Hugging Face activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    dim = _integer(_required(hf, "hidden_size", architecture), "Hugging Face config hidden_size")
    if "mlp_ratio" in hf:
        mlp_ratio = _number(hf["mlp_ratio"], "Hugging Face config mlp_ratio")
    else:
        mlp_ratio = _integer(_required(hf, "intermediate_size", architecture), "Hugging Face config intermediate_size") / dim
    dinov2 = family.startswith("dinov2")
    try:
        classes = 0 if head == "features" else _num_labels(hf)
        return ViTConfig(
            img_size=_square(hf.get("image_size", 224), "Hugging Face config image_size"),
            patch_size=_square(hf.get("patch_size", 16), "Hugging Face config patch_size"),
            in_chans=_integer(hf.get("num_channels", 3), "Hugging Face config num_channels"),
            num_classes=classes,
            global_pool="token_avg" if head == "token_avg" and classes else "token",
            embed_dim=dim,
            depth=_integer(_required(hf, "num_hidden_layers", architecture), "Hugging Face config num_hidden_layers"),
            num_heads=_integer(_required(hf, "num_attention_heads", architecture), "Hugging Face config num_attention_heads"),
            mlp_ratio=mlp_ratio,
            qkv_bias=bool(hf.get("qkv_bias", True)),
            init_values=float(hf.get("layerscale_value", 1.0)) if dinov2 else None,
            reg_tokens=int(hf.get("num_register_tokens", 0)) if family == "dinov2_with_registers" else int(family == "deit" and head != "teacher"),
            dist_token=head == "teacher",
            no_embed_class=family == "dinov2_with_registers",
            pre_norm=family == "clip_vision_model",
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            act_layer=ACTIVATIONS[act],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"Hugging Face {architecture} config is incomplete or invalid: {exc}") from exc


# -- weights -----------------------------------------------------------------------------------
def map_state_dict(state: dict[str, Tensor], architecture: str, cfg: ViTConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Hugging Face tensors -> ours; returns the mapped state and the names left out (LEFT_OUT).

    Any tensor that is neither mapped nor in LEFT_OUT is an error, so nothing is silently dropped;
    a tensor our model needs and the checkpoint lacks surfaces in the strict load that follows.
    """
    family, head = ARCHITECTURES[architecture]
    prefix = FAMILIES[family].prefix + "."
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[int, Tensor]] = {}
    left_out, unknown = [], []
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        target = _target(name)
        if target is None:
            (left_out if any(re.fullmatch(p, name) for p in LEFT_OUT) else unknown).append(key)
            continue
        if target == "<distillation>":
            target = "dist_token" if cfg.dist_token else "reg_token"
        if "@" in target:
            target, part = target.split("@")
            qkv.setdefault(target, {})[QKV_ORDER[part]] = value
            continue
        if target in out:
            raise CheckpointError(f"Hugging Face tensors {key!r} and another both map to {target!r}")
        out[target] = value
    if unknown:
        raise CheckpointError(f"Hugging Face {architecture}: {len(unknown)} tensors do not map onto a ViT, e.g. {', '.join(unknown[:3])}")
    for target, parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise CheckpointError(f"Hugging Face {architecture}: {target} lacks some of its q, k, v parts")
        out[target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    if "cls_token" in out and out["cls_token"].dim() == 1:  # CLIP's class_embedding is (D,)
        out["cls_token"] = out["cls_token"][None, None]
    if "pos_embed" in out and out["pos_embed"].dim() == 2:  # CLIP's nn.Embedding weight is (N, D)
        out["pos_embed"] = out["pos_embed"][None]
    if family == "dinov2_with_registers" and "pos_embed" in out and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]  # registers carry no position: fold CLS's in
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out, sorted(left_out)


def _target(name: str) -> str | None:
    for pattern, target in _RULES:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(target) if "\\" in target else target
    return None


# -- preprocessing -----------------------------------------------------------------------------
def preprocess_from_hf(proc: dict[str, Any]) -> tuple[Preprocess, int | None]:
    """Our Preprocess and input size from an image processor's settings (preprocessor_config.json).

    Each field is checked as the image processor reads it (a number or one per channel for the
    mean and std, an int, [height, width] or a dict for sizes), so a malformed file is one
    ConfigError naming the field.
    """
    if proc.get("do_rescale", True):
        factor = _number(proc.get("rescale_factor", 1 / 255), "image processor rescale_factor")
        if not math.isclose(factor, 1 / 255):
            raise ConfigError(f"image processor rescale_factor {factor} is not 1/255; not supported")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if proc.get("do_normalize", True):
        mean = _per_channel(proc.get("image_mean", 0.5), "image_mean")
        std = _per_channel(proc.get("image_std", 0.5), "image_std")
    resized, resize = None, "shortest"
    size = proc.get("size")
    if proc.get("do_resize", True) and size is not None:
        size = _size_dict(size, "size")
        if "shortest_edge" in size:
            resized = _integer(size["shortest_edge"], "image processor size shortest_edge")
        else:
            resized, resize = _square((size["height"], size["width"]), "image processor size"), "squash"
    crop = _size_dict(proc["crop_size"], "crop_size") if proc.get("do_center_crop", False) and proc.get("crop_size") is not None else None
    if crop is not None and "height" not in crop:
        raise ConfigError(f"image processor crop_size must give height and width, got {proc['crop_size']!r:.60}")
    img_size = _square((crop["height"], crop["width"]), "image processor crop_size") if crop else resized
    crop_pct = img_size / resized if (img_size and resized) else 1.0
    resample = proc.get("resample", 2)
    if isinstance(resample, str):
        interpolation = resample.lower()
    elif isinstance(resample, int) and not isinstance(resample, bool):
        interpolation = RESAMPLE.get(resample, "bilinear")
    else:
        raise ConfigError(f"image processor resample must be a PIL resampling number or a name, got {resample!r:.60}")
    return Preprocess(mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation, resize=resize), img_size


def _per_channel(value: Any, key: str) -> tuple[float, ...]:
    """image_mean / image_std: one number for every channel, or one per channel (as the image processor reads them)."""
    if isinstance(value, (list, tuple)):
        return tuple(_number(v, f"image processor {key} entry") for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"image processor {key} must be a number or one number per channel, got {value!r:.60}")
    return (_number(value, f"image processor {key}"),) * 3


def _size_dict(value: Any, key: str) -> dict[str, Any]:
    """A processor size as transformers' get_size_dict reads it: an int (the shortest edge for `size`, the
    square side for `crop_size`), [height, width], or a dict with shortest_edge or height and width."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict) and ("shortest_edge" in value or {"height", "width"} <= set(value)):
        return value
    raise ConfigError(f"image processor {key} must be an integer, [height, width] or a dict with shortest_edge or height "
                      f"and width, got {value!r:.60}")


# -- entry points ------------------------------------------------------------------------------
def is_hf_model(obj: Any) -> bool:
    config = getattr(obj, "config", None)
    return isinstance(obj, nn.Module) and config is not None and hasattr(config, "model_type") and hasattr(config, "to_dict")


def from_hf(model: nn.Module, img_size: int | None = None, processor: Any = None):
    """Our VisionTransformer with the weights of a live Hugging Face model, in eval mode.

    img_size: run at this input size (position embeddings resampled once, as the model itself
    interpolates them); default: the model's native size, or the processor's crop size.
    processor: an image processor (or its dict) whose mean, std, size and crop to keep.
    """
    if not is_hf_model(model):
        raise ConfigError(f"from_hf takes a transformers PreTrainedModel, got {type(model).__name__}")
    hf = model.config.to_dict()
    proc = processor.to_dict() if hasattr(processor, "to_dict") else processor
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return build(hf, type(model).__name__, model.state_dict(), proc, img_size, name=name, source="the Hugging Face model")


def load_hf_directory(path: str | os.PathLike, img_size: int | None = None):
    """A `save_pretrained` directory (config.json + weights [+ preprocessor_config.json]), no transformers needed."""
    path = Path(path)
    hf = _read_json(path / "config.json", "Hugging Face config")
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else _default_architecture(hf.get("model_type", ""))
    config_from_hf(hf, architecture)  # refuse what does not map before reading any weights
    proc_file = path / "preprocessor_config.json"
    proc = _read_json(proc_file, "image processor config") if proc_file.is_file() else None
    return build(hf, architecture, read_hf_weights(path), proc, img_size, name=path.resolve().name, source=repr(str(path)))


def _default_architecture(model_type: str) -> str:
    for arch, (family, head) in ARCHITECTURES.items():
        if family == model_type and head == "features":
            return arch
    return model_type


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} {str(path)!r} not found (a Hugging Face directory holds config.json and model.safetensors)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} is not a JSON object")
    return data


def read_hf_weights(path: Path) -> dict[str, Tensor]:
    """model.safetensors, its sharded index, or pytorch_model.bin."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index, "weights index").get("weight_map", {}).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(path / shard))
        return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_state_dict(path / name)
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {str(path)!r}")


def build(hf: dict[str, Any], architecture: str, state: dict[str, Tensor], proc: dict[str, Any] | None, img_size: int | None,
          *, name: str, source: str):
    """Config, strict weight mapping, preprocessing and input size: what from_hf and directories share."""

    cfg = config_from_hf(hf, architecture)
    family = FAMILIES[ARCHITECTURES[architecture][0]]
    try:
        preprocess, proc_size = preprocess_from_hf(proc) if proc else (Preprocess(*family.mean_std), None)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    mapped, left_out = map_state_dict(state, architecture, cfg)
    model = VisionTransformer(cfg)
    load_state_dict_strict(model, mapped, f"{source} ({architecture})")
    extra: dict[str, Any] = {"source": {"format": "huggingface", "architecture": architecture, "model_type": hf.get("model_type")}}
    if left_out:
        extra["source"]["left_out"] = left_out
    target = img_size if img_size is not None else proc_size
    if target is not None and target != cfg.img_size:
        try:
            model.set_input_size(target, antialias=family.antialias)
        except InputError as exc:
            raise ConfigError(f"{source}: {'' if img_size is not None else 'image processor '}{exc}") from None
        extra["source"]["resampled"] = (
            f"position embeddings resampled once from {cfg.grid_size}x{cfg.grid_size} to {model.cfg.grid_size}x{model.cfg.grid_size} "
            f"patches (bicubic{', antialiased' if family.antialias else ''}), as the Hugging Face model interpolates them at {target} px"
        )
    if not proc:
        extra["source"]["preprocess"] = "no image processor given: its family's default mean and std, no crop; pass the processor to keep its own"
    notes = [f"note: {architecture}: {extra['source'][key]}" for key in ("resampled", "preprocess") if key in extra["source"]]
    if left_out:
        notes.append(f"note: {architecture}: not mapped (unused at inference): {', '.join(left_out)}")
    model.info = ModelInfo(name=name, preprocess=preprocess, classes=class_names(hf) if cfg.num_classes else None, extra=extra, notes=notes)
    return model.eval()
