"""`vitbudget corrupt`: common-corruption copies (CIFAR-10-C style) of an ImageFolder split."""
from __future__ import annotations

import argparse

from ..defaults import DEFAULT_DATA
from ..errors import ConfigError
from ..io import check_output_dir, removed_if_empty_on_error
from .options import nonnegative_int, positive_int, resolve_default

EPILOG = """examples:
  vitbudget corrupt --out ~/.cache/vitbudget/cifar10c-s3-2000 --limit 2000     # 15 corruptions of the shared test set
  vitbudget corrupt --data imgs/ --split val --out corrupted --corruptions fog,snow --severity 5
  vitbudget eval --data ~/.cache/vitbudget/cifar10c-s3-2000 --split fog --out runs/fog   # evaluate one corruption

Writes OUT/<corruption>/<class>/<image>.png (lossless), one ImageFolder per corruption, so the
corruption's name is the --split to evaluate it. Needs the optional package imagecorruptions-imaug
(pip install 'vitbudget[robustness]'). It implements the ImageNet-C constants: at 32 px these are
harsher than the published CIFAR-10-C at the same severity (see vitbudget/data/corruptions.py).
--limit keeps the same images as `vitbudget eval --limit`. A finished corruption is not redone."""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..data.corruptions import CORRUPTIONS

    co = sub.add_parser("corrupt", help="write common-corruption copies (CIFAR-10-C style) of an ImageFolder split",
                        description="Apply common corruptions (imagecorruptions-imaug) to every image of a split, reproducibly.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("--data", default=None, help=f"ImageFolder directory or .tar/.tar.gz of one; default: shared {DEFAULT_DATA}")
    co.add_argument("--split", default="test", help="split folder inside --data; '.' for --data itself (default: test)")
    co.add_argument("--out", required=True, help="output directory: OUT/<corruption>/<class>/<image>.png")
    co.add_argument("--corruptions", default=None, help=f"comma-separated names (default: all 15: {','.join(CORRUPTIONS)})")
    co.add_argument("--severity", type=positive_int, default=3, help="1 to 5 (default 3)")
    co.add_argument("--limit", type=positive_int, default=None, help="corrupt a fixed pseudo-random subset of this many images (as eval --limit)")
    co.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the corruptions' randomness (default 0)")
    co.add_argument("--quiet", action="store_true", help="no progress bars")
    return co


def run(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from ..data import resolve_split_dir
    from ..data.corruptions import check_corruption, corrupt_folder, parse_corruptions
    from ..data.corruptions import package_version as corruptions_version

    names = parse_corruptions(args.corruptions)
    check_corruption(names[0], args.severity)
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    src = resolve_split_dir(resolve_default(args.data, DEFAULT_DATA, "data"), args.split)
    out_dir = check_output_dir(args.out)  # each corruption's tree is created, atomically, once it is complete
    start = time.perf_counter()
    with removed_if_empty_on_error(out_dir):
        for name in tqdm(names, desc="corruptions", unit="corruption", disable=args.quiet, leave=False):  # the summary below replaces it
            corrupt_folder(src, out_dir / name, name, args.severity, args.seed, args.limit, progress=not args.quiet)
    print(f"wrote {len(names)} corruption(s) at severity {args.severity} of {src} to {out_dir}/<corruption>/ "
          f"in {time.perf_counter() - start:.0f} s (imagecorruptions-imaug {corruptions_version()})")
    print(f"evaluate one with: vitbudget eval --data {out_dir} --split {names[0]}")
    return 0
