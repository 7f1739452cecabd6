"""`vitbudget eval --task saliency`: a dense head's maps under each method, against the unmodified model's."""
from __future__ import annotations

import argparse
from pathlib import Path
import shlex
import sys

from ..defaults import DEFAULT_DENSE_MODEL, DEFAULT_PHOTOS
from ..errors import ConfigError
from ..io import OutputDir, write_json, write_text
from .options import apply_run_config, check_unused_options, method_options, resolve_default

OUTPUT_FILES = ["results.json", "results.md", "maps.png"]
PICTURES = 6  # photos drawn in maps.png


def refuse_classification_flags(args: argparse.Namespace) -> None:
    """Flags of classification eval that have no meaning for a dense head: an error, never silently ignored."""
    given = [flag for flag, bad in (("--arch", args.arch is not None), ("--num-classes", args.num_classes is not None),
                                    ("--split", args.split != "test"), ("--dtype", args.dtype != "fp32"), ("--compile", args.compile),
                                    ("--allow-class-mismatch", getattr(args, "allow_class_mismatch", False)))
             if bad]
    if given:
        raise ConfigError(f"{', '.join(given)} do(es) not apply to --task {args.task} (photos are every image under --data; fp32, eager)")


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..data.letterbox import Box, LetterboxTransform, crop_to_photo
    from ..data.loader import subset_indices
    from ..data.photos import PhotoFolder
    from ..eval.dense import dense_table, evaluate_dense
    from ..eval.machine import machine_info
    from ..methods import build_method
    from ..models.heads import load_dense_model
    from ..report.dense_pictures import save_dense_maps
    from ..report.token_pictures import denormalize

    apply_run_config(args, method_list=True)
    refuse_classification_flags(args)
    if distributed.context().world > 1:
        raise ConfigError(f"--task {args.task} runs in one process (not under torchrun)")
    out = OutputDir(args.out, OUTPUT_FILES)
    model_path = resolve_default(args.model, DEFAULT_DENSE_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_PHOTOS, "data")
    model, head = load_dense_model(model_path, args.task)
    model = model.to(args.device)
    names = list(dict.fromkeys(["baseline", *(args.method or [])]))
    check_unused_options(args, names)
    methods = {name: build_method(name, model, **method_options(args, name)) for name in names}
    for line in model.info.notes:
        print(line, file=sys.stderr)
    dataset = PhotoFolder(data_path, LetterboxTransform(model.cfg.img_size, model.info.preprocess))
    indices = subset_indices(len(dataset), args.limit)
    results, maps = evaluate_dense(methods, head, dataset, indices, batch_size=args.batch_size, workers=args.workers,
                                   device=args.device, speed=not args.no_speed, progress=not args.quiet,
                                   latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats)
    shown = indices[:PICTURES]
    photos = []
    for i in shown:
        image, box = dataset[i]
        photos.append(crop_to_photo(torch_image(denormalize(image[None], model.info.preprocess)[0]), Box.from_tensor(box)).permute(1, 2, 0).numpy())
    report = {
        "command": "vitbudget " + shlex.join(sys.argv[1:]),
        "task": args.task,
        "model": {"path": str(model_path), "name": model.info.name, "config": model.cfg.to_dict(), "head": type(head).__name__},
        "data": {"path": str(data_path), "images": len(indices), "of": len(dataset), "limit": args.limit},
        "reference": "each method's maps against the unmodified model's (baseline), over the photo's part of each letterboxed map",
        "machine": machine_info(args.device),
        "methods": results,
    }
    table = dense_table(results)
    with out.publish() as stage:
        write_json(stage / "results.json", report)
        write_text(stage / "results.md", f"`{report['command']}` — {args.task}, {len(indices)} photos, {report['machine']['cpu']}\n\n{table}")
        save_dense_maps(photos, {name: [m[k] for k in range(len(shown))] for name, m in maps.items()}, stage / "maps.png",
                        titles=[Path(dataset.name(i)).name for i in shown], label=args.task)
    print(table)
    print(f"wrote {', '.join(str(out.path / name) for name in OUTPUT_FILES)}")
    return 0


def torch_image(array):
    """(H, W, 3) array -> (3, H, W) tensor, so the photo is cropped like the maps."""
    import torch

    return torch.from_numpy(array).permute(2, 0, 1)
