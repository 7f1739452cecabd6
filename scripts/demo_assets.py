"""Write the README's end-to-end demo assets, offline: a small image folder and a random Hugging Face DINOv2.

    python scripts/demo_assets.py DIR     # -> DIR/shapes/{train,val}/<class>/*.png and DIR/dinov2-reg-tiny/

shapes: 3 classes (circle, square, triangle), 120 training and 40 validation images per class, of
random non-square sizes (36-59 x 30-51 px), one in four grayscale (L) and one in four RGBA: the
conversions `vitbudget train` notes. dinov2-reg-tiny: a Dinov2WithRegistersModel built from a small
random config (12 blocks, 96 wide, 4 registers, patch 14, 224 px native) and saved with
save_pretrained, plus DINOv2's image-processor settings scaled to a 112 px crop. Needs transformers
for the model only (pip install 'vitbudget[hf]').
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_shapes(root: Path, train: int = 120, val: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for shape in ("circle", "square", "triangle"):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = int(rng.integers(36, 60)), int(rng.integers(30, 52))
                img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 120, 3)))
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(7, min(w, h) // 2 - 2))
                cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
                colour = tuple(int(v) for v in rng.integers(130, 256, 3))
                if shape == "circle":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
                elif shape == "square":
                    draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
                img = img.convert("L") if i % 4 == 1 else img.convert("RGBA") if i % 4 == 2 else img
                img.save(folder / f"{i:04d}.png")


def make_dinov2(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(hidden_size=96, num_hidden_layers=12, num_attention_heads=3, mlp_ratio=4, image_size=224,
                                       patch_size=14, num_register_tokens=4)
    model = Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():  # random weights with non-trivial norms and LayerScale
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    processor = {"do_resize": True, "size": {"shortest_edge": 128}, "do_center_crop": True, "crop_size": {"height": 112, "width": 112},
                 "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "image_processor_type": "BitImageProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    make_shapes(root / "shapes")
    print(f"wrote {root / 'shapes'}")
    make_dinov2(root / "dinov2-reg-tiny")
    print(f"wrote {root / 'dinov2-reg-tiny'}")
