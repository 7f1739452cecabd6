"""`vitbudget make-counting`: procedural CLEVR-Count-like scenes of 3-10 shapes as an ImageFolder."""
from __future__ import annotations

import argparse

from .options import bounded, nonnegative_int, positive_int

MIN_SIZE, MAX_SIZE = 16, 1024  # the renderer needs 16 px; 1024 px x 22 000 scenes is already 60 GB of pixels
image_side = bounded(int, f"an image side from {MIN_SIZE} to {MAX_SIZE} pixels", lambda v: MIN_SIZE <= v <= MAX_SIZE)

EPILOG = """examples:
  vitbudget make-counting --out ~/.cache/vitbudget/counting-32
  vitbudget train --recipe count_vit_p4 --data ~/.cache/vitbudget/counting-32 --out runs/count_vit

Writes OUT/{train,test}/<count>/<index>.png with classes 03..10 (3 to 10 objects, balanced).
Deterministic in --seed; an existing complete output with the same arguments is reused."""


def add_parser(sub) -> argparse.ArgumentParser:
    mc = sub.add_parser("make-counting", help="generate a CLEVR-Count-like data set of 3-10 shapes",
                        description="Generate procedural counting scenes as an ImageFolder with train/ and test/ splits.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mc.add_argument("--out", required=True, help="output directory")
    mc.add_argument("--train", type=positive_int, default=20000, help="training images (default 20000)")
    mc.add_argument("--test", type=positive_int, default=2000, help="test images (default 2000)")
    mc.add_argument("--size", type=image_side, default=32, help=f"image side in pixels, {MIN_SIZE} to {MAX_SIZE} (default 32)")
    mc.add_argument("--seed", type=nonnegative_int, default=0, help="seed (default 0)")
    mc.add_argument("--quiet", action="store_true", help="no progress bars")
    return mc


def run(args: argparse.Namespace) -> int:
    import time

    from ..data.counting import make_counting

    start = time.perf_counter()
    out = make_counting(args.out, train=args.train, test=args.test, size=args.size, seed=args.seed, progress=not args.quiet)
    print(f"wrote {out}/{{train,test}}/<count>/ ({args.train} + {args.test} images, {args.size} px) in {time.perf_counter() - start:.0f} s")
    return 0
