"""Make a small segmentation set (ADE20K layout) from unlabelled photos with the saliency model's own maps.

    python scripts/saliency_pseudo_masks.py MODEL_DIR PHOTOS OUT [--train 200] [--threshold 0.5]

MODEL_DIR: a model with a saliency head (e.g. shared/models/vits14_saliency); PHOTOS: a folder or .tar.gz
(e.g. shared/data/imagenet-sample-250.tar.gz). Each photo's unmodified-model saliency map, cropped back and
resized to the photo (bilinear), thresholded: 1 = salient (> threshold), 0 = background. The first --train
photos in sorted order go to training/, the rest to validation/; photos are copied as they are.

What it can show: how well a linear probe on the patch grid reproduces the decoder's salient region, and how
much a token method's grid degrades that. What it cannot: segmentation quality against human labels; the
labels come from the same unmodified model the baseline is (a ceiling set by the decoder, not by truth).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitbudget.data.letterbox import Box, LetterboxTransform, crop_to_photo  # noqa: E402
from vitbudget.data.photos import PhotoFolder  # noqa: E402
from vitbudget.eval.dense import DensePipeline  # noqa: E402
from vitbudget.methods import build_method  # noqa: E402
from vitbudget.models.heads import load_dense_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("photos")
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model, head = load_dense_model(args.model)
    pipe = DensePipeline(build_method("baseline", model), head).eval()
    photos = PhotoFolder(args.photos, LetterboxTransform(model.cfg.img_size, model.info.preprocess))
    out = Path(args.out)
    salient = []
    with torch.inference_mode():
        for start in range(0, len(photos), args.batch_size):
            items = [photos[i] for i in range(start, min(start + args.batch_size, len(photos)))]
            maps, _ = pipe(torch.stack([x for x, _ in items]))
            for k, (m, (_, box)) in enumerate(zip(maps, items)):
                i = start + k
                split = "training" if i < args.train else "validation"
                mask = (crop_to_photo(m, Box.from_tensor(box), photo_size=True) > args.threshold).numpy().astype(np.uint8)
                salient.append(float(mask.mean()))
                src = photos.files[i]
                for sub in ("images", "annotations"):
                    (out / sub / split).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / "images" / split / src.name)
                Image.fromarray(mask, mode="L").save(out / "annotations" / split / (src.stem + ".png"))
            print(f"{min(start + args.batch_size, len(photos))}/{len(photos)}", file=sys.stderr)
    print(f"wrote {len(photos)} photos to {out}: {min(args.train, len(photos))} training, {max(len(photos) - args.train, 0)} validation; "
          f"salient fraction of pixels: mean {np.mean(salient):.3f}, {sum(s == 0 for s in salient)} photos with none")


if __name__ == "__main__":
    main()
