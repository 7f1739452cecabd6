"""`vitbudget viz`: draw which tokens a method chose, per image, as a PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import OutputDir
from ..methods import load_method
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
                    help="run at this input size (position embeddings resampled once; default: the model's own)")
    vz.add_argument("--out", default="runs/viz", help="output directory (default runs/viz)")
    add_class_mismatch_flag(vz)
    add_method_option_flags(vz)
    return vz


def run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, ImageFolder, resolve_split_dir, subset_indices
    from ..report import denormalize, save_token_maps

    name = f"{args.method}_tokens.png"
    out = OutputDir(args.out, [name])
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    method = load_method(model_path, args.method, img_size=args.img_size, **method_options(args, args.method))
    model = method.model
    headless = model.cfg.num_classes == 0  # a backbone: its outputs are features, compared with the unpruned model's
    data = resolve_default(args.data, DEFAULT_DATA, "data")
    transform = EvalTransform(model.cfg.img_size, model.info.preprocess)
    if is_flat_photo_folder(resolve_split_dir(data, args.split)):  # photos without class folders: no labels to show
        dataset, labelled = ImageFolder(data, args.split, transform, unlabeled=True), False
    else:
        dataset, labelled = open_dataset(data, args.split, model, transform, args.allow_class_mismatch), not headless
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
        titles = [f"{label_name(names, t) if labelled else ''} → {label_name(model.info.classes or names, p)}" for t, p in zip(labels, preds)]
    desc = ", ".join(f"{k}={v}" for k, v in method.describe().items() if k != "method")
    with out.publish() as stage:
        save_token_maps(denormalize(images, model.info.preprocess), token_map, model.cfg.patch_size, stage / name, titles=titles,
                        suptitle=f"{args.method} ({desc}) — " + ("cosine similarity to the unpruned features" if headless
                                                                          else "true → predicted" if labelled else "predicted"))
    print(f"wrote {out.path / name}")
    return 0


def label_name(names: list[str], index: int) -> str:
    """A label's class name; outputs beyond the known names (a folder with fewer classes) show as #index."""
    return names[index] if index < len(names) else f"#{index}"


def is_flat_photo_folder(root: Path) -> bool:
    """Images directly in the folder and no class sub-folders (e.g. a folder of photos)."""
    from ..data.folder import IMAGE_EXTENSIONS

    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return not any(p.is_dir() for p in entries) and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
