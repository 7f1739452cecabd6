"""Tiny stand-ins for the ViT-S/14 saliency model: a random Dinov2-shaped HF directory with a random decoder,
and folders of photos; fast enough for logic tests (the real model's parity is tests/test_saliency.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import make_model
from vitbudget.models import ViTConfig
from vitbudget.models.heads import HEAD_FILES, SaliencyDecoder

TINY_DINO = ViTConfig(img_size=224, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0,
                      init_values=1.0, norm_eps=1e-6)


def hf_dinov2_state(model) -> dict[str, torch.Tensor]:
    """Our ViT's tensors under Hugging Face Dinov2Model names (the inverse of models/hf.py's mapping)."""
    out = {"embeddings.cls_token": model.cls_token, "embeddings.mask_token": torch.zeros(1, model.cfg.embed_dim),
           "embeddings.position_embeddings": model.pos_embed, "layernorm.weight": model.norm.weight, "layernorm.bias": model.norm.bias,
           "embeddings.patch_embeddings.projection.weight": model.patch_embed.proj.weight,
           "embeddings.patch_embeddings.projection.bias": model.patch_embed.proj.bias}
    for i, b in enumerate(model.blocks):
        p = f"encoder.layer.{i}."
        for part, w, bias in zip(("query", "key", "value"), b.attn.qkv.weight.chunk(3), b.attn.qkv.bias.chunk(3)):
            out[p + f"attention.attention.{part}.weight"], out[p + f"attention.attention.{part}.bias"] = w, bias
        names = {"norm1": b.norm1, "norm2": b.norm2, "attention.output.dense": b.attn.proj, "mlp.fc1": b.mlp.fc1, "mlp.fc2": b.mlp.fc2}
        for name, mod in names.items():
            out[p + name + ".weight"], out[p + name + ".bias"] = mod.weight, mod.bias
        out[p + "layer_scale1.lambda1"], out[p + "layer_scale2.lambda1"] = b.ls1.gamma, b.ls2.gamma
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def random_decoder(seed: int = 0) -> SaliencyDecoder:
    torch.manual_seed(seed)
    head = SaliencyDecoder(32, (8, 4, 2)).eval()
    with torch.no_grad():
        for name, buf in head.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_(0, 0.1)
    return head


def write_saliency_dir(root: Path, seed: int = 0) -> Path:
    """A Dinov2Model directory (config.json, model.safetensors) plus saliency_decoder.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_model(TINY_DINO, seed)
    cfg = dict(model_type="dinov2", architectures=["Dinov2Model"], hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               mlp_ratio=2, image_size=224, patch_size=14, num_channels=3, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True)
    (root / "config.json").write_text(json.dumps(cfg))
    save_file(hf_dinov2_state(model), str(root / "model.safetensors"))
    head = random_decoder(seed)
    save_file({k: v.contiguous() for k, v in head.state_dict().items() if "num_batches" not in k}, str(root / HEAD_FILES["saliency"]))
    return root


def write_photos(root: Path, sizes=((60, 90), (100, 50), (300, 400)), seed: int = 0) -> Path:
    """Photos of several sizes (h, w): a bright disc on a noisy background, as JPEG and PNG."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - h * 0.4) ** 2 + (xx - w * 0.6) ** 2) < (min(h, w) * 0.25) ** 2
        pixels = np.clip(rng.normal(60, 20, (h, w, 3)) + 150 * disc[..., None], 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    return root


def one_error_line(capsys) -> str:
    """The one `vitbudget: error:` line a bad input must produce (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("vitbudget: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]
