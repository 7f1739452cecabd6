"""`vitbudget viz`: draw which tokens a method chose, per image, as a PNG."""
from __future__ import annotations

import argparse

import torch

from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import ensure_writable_dir
from ..methods import load_method
from .options import add_method_option_flags, method_help, method_name, method_options, resolve_default


def add_parser(sub) -> argparse.ArgumentParser:
    vz = sub.add_parser("viz", help="draw which tokens a method chose, per image, as PNG",
                        description="Run a method on a few images and draw its token map (selected / halted / dropped tokens).",
                        epilog="example:\n  vitbudget viz --method abs --alpha 0.2 --num-images 8 --out runs/viz",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    vz.add_argument("--method", required=True, type=method_name, metavar="NAME", help=method_help("method whose choices to draw"))
    vz.add_argument("--model", default=None, help="checkpoint (default: the shared reference model)")
    vz.add_argument("--data", default=None, help="ImageFolder directory or archive (default: shared CIFAR-10)")
    vz.add_argument("--split", default="test", help="split folder (default: test)")
    vz.add_argument("--num-images", type=int, default=8, help="images to draw (default 8)")
    vz.add_argument("--out", default="runs/viz", help="output directory (default runs/viz)")
    add_method_option_flags(vz)
    return vz


def run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, ImageFolder, subset_indices
    from ..models import load_model
    from ..report import denormalize, save_token_maps

    out_dir = ensure_writable_dir(args.out)
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    model = load_model(model_path)
    method = load_method(model_path, args.method, **method_options(args, args.method))
    dataset = ImageFolder(resolve_default(args.data, DEFAULT_DATA, "data"), args.split, EvalTransform(model.cfg.img_size, model.info.preprocess))
    if args.num_images <= 0:
        raise ConfigError(f"--num-images must be positive, got {args.num_images}")
    indices = subset_indices(len(dataset), args.num_images)
    images = torch.stack([dataset[i][0] for i in indices])
    labels = [dataset.targets[i] for i in indices]
    with torch.inference_mode():
        out = method(images)
    token_map = method.token_map(out)
    if token_map is None:
        raise ConfigError(f"method {args.method!r} draws no token map")
    names = dataset.classes
    preds = out.logits.argmax(1).tolist()
    titles = [f"{names[t]} → {names[p]}" for t, p in zip(labels, preds)]
    desc = ", ".join(f"{k}={v}" for k, v in method.describe().items() if k != "method")
    path = out_dir / f"{args.method}_tokens.png"
    save_token_maps(denormalize(images, model.info.preprocess), token_map, model.cfg.patch_size, path,
                    titles=titles, suptitle=f"{args.method} ({desc}) — true → predicted")
    print(f"wrote {path}")
    return 0
