"""Publish a trained model for git: float16 safetensors + its sidecar, and the sha256 to quote.

    python scripts/publish_fp16.py runs/vits14_cifar10/model.safetensors models/vits14_cifar10.safetensors

The sidecar keeps everything the training run wrote (config, preprocessing, classes, recipe,
log, metrics) and adds `weights_dtype` and `published_from`; `load_model` casts the weights back
to float32. Refuses a result over 50 MB (the project's limit for weights in git).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from vitbudget.data.archive import file_sha256
from vitbudget.io import OutputDir, write_json
from vitbudget.models.loading import read_sidecar, sidecar_path

LIMIT_BYTES = 50 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a trained model.safetensors (with its .json sidecar)")
    parser.add_argument("target", type=Path, help="where to write the float16 copy (.safetensors)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(args.source)).items()}
    meta = read_sidecar(sidecar_path(args.source))
    meta = {**meta, "weights_dtype": "float16", "published_from": {"path": str(args.source), "sha256": file_sha256(args.source)}}
    out = OutputDir(args.target.parent, [args.target.name, sidecar_path(args.target).name])
    with out.publish() as stage:
        save_file(state, str(stage / args.target.name))
        if (stage / args.target.name).stat().st_size > LIMIT_BYTES:
            raise SystemExit(f"error: {args.target.name} would be over 50 MB")
        write_json(stage / sidecar_path(args.target).name, meta)
    print(json.dumps({"weights": str(args.target), "bytes": args.target.stat().st_size, "sha256": file_sha256(args.target)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
