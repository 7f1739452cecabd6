"""`vitbudget viz`: draw which tokens a method chose, per image, as a PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import OutputDir
from ..methods import build_method, load_method
from ..models.hub import is_hub_id
from .options import add_class_mismatch_flag, add_method_option_flags, method_help, method_name, method_options, open_dataset, positive_int, resolve_default


def add_parser(sub) -> argparse.ArgumentParser:
    vz = sub.add_parser("viz", help="draw which tokens a method chose, per image, as PNG",
                        description="Run a method on a few images and draw its token map (selected / halted / dropped tokens).",
                        epilog="example:\n  vitbudget viz --method abs --alpha 0.2 --num-images 8 --out runs/viz",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    vz.add_argument("--method", required=True, type=method_name, metavar="NAME", help=method_help("method whose choices to draw"))
    vz.add_argument("--model", default=None, help="checkpoint (default: the shared reference model)")
    vz.add_argument("--data", default=None, help="ImageFolder directory or archive (default: shared CIFAR-10)")
    vz.add_argument("--split", default="test", help="split folder (default: test)")
    vz.add_argument("--num-images", type=positive_int, default=8, help="images to draw (default 8)")
    vz.add_argument("--img-size", type=positive_int, default=None,
                    help="a Hugging Face directory or hub model only: run at this input size (position embeddings resampled once)")
    vz.add_argument("--out", default="runs/viz", help="output directory (default runs/viz)")
    add_class_mismatch_flag(vz)
    add_method_option_flags(vz)
    return vz


def run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, subset_indices
    from ..models import load_model
    from ..report import denormalize, save_token_maps

    name = f"{args.method}_tokens.png"
    out = OutputDir(args.out, [name])
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    if args.img_size is not None:  # a backbone at the size you ask for: no trained method parameters to restore
        if not (Path(model_path).is_dir() or is_hub_id(model_path)):
            raise ConfigError("--img-size applies to a Hugging Face directory or hf-hub: model; a checkpoint runs at its trained size")
        model = load_model(model_path, img_size=args.img_size)
        method = build_method(args.method, model, **method_options(args, args.method))
    else:
        model = load_model(model_path)
        method = load_method(model_path, args.method, **method_options(args, args.method))
    headless = model.cfg.num_classes == 0  # a backbone: its outputs are features, compared with the unpruned model's
    dataset = open_dataset(resolve_default(args.data, DEFAULT_DATA, "data"), args.split, model,
                           EvalTransform(model.cfg.img_size, model.info.preprocess), args.allow_class_mismatch)
    indices = subset_indices(len(dataset), args.num_images)
    images = torch.stack([dataset[i][0] for i in indices])
    labels = [dataset.targets[i] for i in indices]
    with torch.inference_mode():
        result = method(images)
    token_map = method.token_map(result)
    if token_map is None:
        raise ConfigError(f"method {args.method!r} draws no token map")
    names = model.info.classes if dataset.labels_by_name else dataset.classes  # the name of each label index
    if headless:
        from ..eval.metrics import cosine_similarity

        with torch.inference_mode():
            cosine = cosine_similarity(result.logits, model(images)).tolist()
        titles = [f"{label_name(names, t)} cos {c:.3f}".strip() for t, c in zip(labels, cosine)]
    else:
        preds = result.logits.argmax(1).tolist()
        titles = [f"{label_name(names, t)} → {label_name(names, p)}" for t, p in zip(labels, preds)]
    desc = ", ".join(f"{k}={v}" for k, v in method.describe().items() if k != "method")
    with out.publish() as stage:
        save_token_maps(denormalize(images, model.info.preprocess), token_map, model.cfg.patch_size, stage / name, titles=titles,
                        suptitle=f"{args.method} ({desc}) — " + ("cosine similarity to the unpruned features" if headless else "true → predicted"))
    print(f"wrote {out.path / name}")
    return 0


def label_name(names: list[str], index: int) -> str:
    """A label's class name; outputs beyond the known names (a folder with fewer classes) show as #index."""
    return names[index] if index < len(names) else f"#{index}"
