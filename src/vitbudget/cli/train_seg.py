"""`vitbudget train --task segmentation`: a linear segmentation probe on a frozen ViT, mIoU of baseline vs a method."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..defaults import DEFAULT_DENSE_MODEL
from ..errors import ConfigError
from ..io import OutputDir, write_json, write_text
from .options import check_unused_options, method_options, resolve_default

OUTPUT_FILES = ["seg_head.safetensors", "results.json", "results.md"]
DEFAULTS = {"epochs": 30, "lr": 1e-3, "batch_size": 16, "seed": 0}
NOT_FOR_SEGMENTATION = ("recipe", "arch", "patch_size", "teacher", "distill_weight", "train_limit", "eval_limit", "save_every",
                        "freeze", "lr_scale", "dtype", "eval_split")


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..data.segmentation import SegmentationFolder
    from ..methods import build_method
    from ..models import load_model
    from ..models.heads import SaliencyDecoder, heads_in
    from ..train.segmentation import grids_and_masks, segmentation_miou, train_linear_head
    from safetensors.torch import save_file

    given = ["--" + n.replace("_", "-") for n in NOT_FOR_SEGMENTATION if getattr(args, n, None) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} do(es) not apply to --task segmentation (a linear head on a frozen backbone; see docs/saliency.md)")
    if args.data is None:
        raise ConfigError("--task segmentation needs --data DIR (images/ and annotations/, each with training/ and validation/)")
    if distributed.context().world > 1:
        raise ConfigError("--task segmentation runs in one process (not under torchrun)")
    out = OutputDir(args.out, OUTPUT_FILES)
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
    backbone_path = resolve_default(args.init, DEFAULT_DENSE_MODEL, "init")
    model = load_model(backbone_path)
    size = args.img_size or (SaliencyDecoder.input_size if "saliency" in heads_in(backbone_path) else None)  # the shared model works at 224
    if size and size != model.cfg.img_size:
        model.set_input_size(size)
    model = model.to(args.device)
    names = list(dict.fromkeys(["baseline", *([args.method] if args.method else [])]))
    check_unused_options(args, names)
    methods = {name: build_method(name, model, **method_options(args, name)) for name in names}
    train = SegmentationFolder(args.data, "training", model.cfg.img_size, model.info.preprocess, args.num_classes)
    val = SegmentationFolder(args.data, "validation", model.cfg.img_size, model.info.preprocess, train.num_classes)
    for line in model.info.notes:
        print(line, file=sys.stderr)
    epochs = int(settings["epochs"])
    if epochs != settings["epochs"]:
        raise ConfigError(f"--epochs must be a whole number for --task segmentation, got {settings['epochs']}")
    grids, masks = grids_and_masks(methods["baseline"], train, settings["batch_size"], args.workers, args.device)
    head, losses = train_linear_head(grids, masks, train.num_classes, epochs=epochs, lr=settings["lr"],
                                     batch_size=settings["batch_size"], seed=settings["seed"], device=args.device)
    results = {name: {**m.describe(), **segmentation_miou(m, head, val, settings["batch_size"], args.workers, args.device)}
               for name, m in methods.items()}
    report = {
        "command": "vitbudget " + shlex.join(sys.argv[1:]), "task": "segmentation",
        "backbone": {"path": str(backbone_path), "name": model.info.name, "img_size": model.cfg.img_size, "frozen": True},
        "data": {"path": str(args.data), "training": len(train), "validation": len(val), "num_classes": train.num_classes},
        "head": {"kind": "LinearSegHead (BatchNorm + 1x1 conv, bilinear upsampling)", "trained_on": "baseline patch grids", **settings,
                 "loss_per_epoch": losses},
        "methods": results,
    }
    table = "| method | mIoU | pixel acc. |\n|---|---|---|\n" + "".join(
        f"| {name} | {r['miou']:.4f} | {r['pixel_accuracy']:.4f} |\n" for name, r in results.items())
    with out.publish() as stage:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(stage / "seg_head.safetensors"),
                  metadata={"num_classes": str(train.num_classes), "dim": str(model.cfg.embed_dim)})
        write_json(stage / "results.json", report)
        write_text(stage / "results.md", f"`{report['command']}` — {len(train)} training / {len(val)} validation images, "
                                         f"{train.num_classes} classes\n\n{table}")
    print(table)
    print(f"wrote {', '.join(str(out.path / name) for name in OUTPUT_FILES)}")
    return 0
