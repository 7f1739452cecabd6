"""`vitbudget speed`: wall-clock speed of methods on realistic shapes, as a fraction of the ideal speed-up."""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..defaults import DEFAULT_MODEL
from ..errors import CheckpointError, ConfigError
from ..io import OutputDir, write_json, write_text
from ..methods import METHODS
from ..devices import out_of_memory
from .options import (add_common_flags, add_checkpoint_flags, add_method_option_flags, bounded, check_unused_options, device_arg, method_options,
                      positive_float, positive_int, resolve_default)

DEFAULT_METHODS = "baseline,evit,tome,spot_heuristic,dynamicvit,spot,abs,avit"
OUTPUT_FILES = ["speed.json", "speed.md"]

EPILOG = """examples:
  vitbudget speed --arch deit_small_patch16_224 --r 13 --batch-sizes 1,8,64 --out runs/speed_deit_s
  vitbudget speed --arch deit_tiny_patch16_224 --r 13 --batch-sizes 1 --compile --out runs/speed_deit_t_b1
  vitbudget speed --model runs/ft/spot/model.safetensors --methods baseline,spot --out runs/speed_spot
  vitbudget speed --arch deit_small_patch16_224 --device cuda --dtype bf16 --compile --out runs/speed_gpu

--arch NAME alone builds that timm architecture with random weights (timm's init, seed 0):
the speed of a method with fixed token counts depends on the shapes, not on the weights.
--model PATH times a checkpoint (--arch NAME with it: a plain timm state dict). Methods with
learned parts (dynamicvit, spot) use random-init parts unless --model is a checkpoint of that
method. A-ViT replays a halting profile (--avit-depth, --avit-depth-std), stated in the table.
Writes OUT/speed.json (one row per method x batch size x compiled, plus the machine, versions,
dtype and attention backend) and OUT/speed.md. Every entry of a batch size is timed round-robin
with the others; timm's own forward is a row where timm is installed (--no-timm leaves it out)."""


def method_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected method names from {', '.join(sorted(METHODS))} separated by commas, got {text!r}")
    return list(dict.fromkeys(names))


def batch_list(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive batch sizes separated by commas, got {text!r}")
    return list(dict.fromkeys(sizes))


def add_parser(sub) -> argparse.ArgumentParser:
    sp = sub.add_parser("speed", help="speed of methods on realistic shapes: fraction of the ideal speed-up, eager and compiled",
                        description="Time methods round-robin against the baseline (and timm) at several batch sizes.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(sp)
    add_common_flags(sp, out="runs/speed", dtype="fp32")
    sp.add_argument("--methods", type=method_list, default=method_list(DEFAULT_METHODS), help=f"comma-separated methods (default {DEFAULT_METHODS})")
    sp.add_argument("--batch-sizes", type=batch_list, default=[1, 8, 64], help="comma-separated batch sizes (default 1,8,64)")
    sp.add_argument("--compile", action="store_true", help="also time every method under torch.compile (fullgraph; A-ViT stays eager)")
    sp.add_argument("--repeats", type=positive_int, default=20, help="timed rounds per batch size, round-robin (default 20)")
    sp.add_argument("--warmup", type=bounded(int, "an integer >= 1", lambda v: v >= 1), default=3,
                    help="untimed rounds first (compilation happens here; default 3)")
    sp.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's, the physical cores)")
    sp.add_argument("--avit-depth", type=positive_float, default=None, help="A-ViT replay: mean patch-token depth in blocks (default two thirds of the depth)")
    sp.add_argument("--avit-depth-std", type=bounded(float, "a finite number >= 0", lambda v: v >= 0 and v == v and v != float("inf")),
                    default=2.0, help="A-ViT replay: standard deviation of patch-token depths in blocks (default 2)")
    sp.add_argument("--no-timm", action="store_true", help="leave out timm's own forward")
    sp.add_argument("--quiet", action="store_true", help="no progress lines")
    add_method_option_flags(sp)
    return sp


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..devices import resolve_dtype
    from ..eval.machine import attention_backend, describe_machine, machine_info
    from ..eval.realistic import HaltingProfile, build_entries, measure, speed_markdown

    out = OutputDir(args.out, OUTPUT_FILES)  # checked now, written only when everything succeeded
    check_unused_options(args, args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    model, source, weights = _model(args)
    depth = model.cfg.depth
    halting = HaltingProfile(mean=args.avit_depth if args.avit_depth is not None else 2.0 * depth / 3.0, std=args.avit_depth_std)
    if not 1 <= halting.mean <= depth:
        raise ConfigError(f"--avit-depth must be in [1, {depth}] blocks for this {depth}-block model, got {halting.mean}")
    timm_model, timm_note = (None, "left out (--no-timm)") if args.no_timm else _timm_twin(model)
    model, timm_model = model.to(device), timm_model.to(device) if timm_model is not None else None
    options = {name: method_options(args, name) for name in args.methods}
    trained = _trained_methods(args, source, options) if weights == "checkpoint" else {}
    entries = build_entries(model, args.methods, options, compiled=args.compile, timm_model=timm_model, weights=weights,
                            halting=halting, trained={k: v.to(device) for k, v in trained.items()})
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    cfg = model.cfg
    with out_of_memory(device, f"lower --batch-sizes (now {','.join(map(str, args.batch_sizes))})"):
        rows = measure(entries, args.batch_sizes, (cfg.in_chans, cfg.img_size, cfg.img_size), device=device, dtype=dtype,
                       repeats=args.repeats, warmup=args.warmup, halting=halting, progress=say)
    machine = machine_info(device)
    command = "vitbudget " + shlex.join(sys.argv[1:])
    report = {
        "command": command, "model": {"source": source, "name": model.info.name, "weights": weights, "config": cfg.to_dict()},
        "machine": machine, "versions": _versions(__version__), "device": str(device), "dtype": args.dtype,
        "attention_backend": attention_backend(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "warmup": args.warmup, "timm": timm_note, "avit_halting": {"mean": halting.mean, "std": halting.std, "seed": halting.seed,
                                                                    "description": halting.describe()},
        "rows": rows,
    }
    table = speed_markdown(rows)
    header = (f"`{command}` — {model.info.name or source}, {weights}; {describe_machine(machine)}, {torch.get_num_threads()} threads, "
              f"{args.dtype}, attention: {report['attention_backend']}; timm row: {timm_note}\n\n")
    with out.publish() as stage:
        write_json(stage / "speed.json", report)
        write_text(stage / "speed.md", header + table)
    print(table)
    print(f"wrote {', '.join(str(out.path / name) for name in OUTPUT_FILES)}")
    return 0


def _model(args: argparse.Namespace):
    """(model, source, weights): --arch alone = random init of that architecture; otherwise a checkpoint."""
    from ..models import VisionTransformer, load_model, named_config

    overrides = {"num_classes": args.num_classes} if args.num_classes else {}
    if args.model is None and args.arch is not None:
        torch.manual_seed(0)
        model = VisionTransformer(named_config(args.arch, **overrides, **({"img_size": args.img_size} if args.img_size else {}))).eval()
        model.info.name = args.arch
        return model, args.arch, "random init"
    path = resolve_default(args.model, DEFAULT_MODEL, "model")
    model = load_model(path, arch=args.arch, **overrides)
    if args.img_size is not None and args.img_size != model.cfg.img_size:
        model.set_input_size(args.img_size)
    return model, str(path), "checkpoint"


def _timm_twin(model):
    """timm's own VisionTransformer with `model`'s weights, or (None, why not)."""
    from ..models.timm_compat import timm_available, timm_vit

    if not timm_available():
        return None, "left out (timm is not installed)"
    try:
        twin = timm_vit(model.cfg)
        twin.load_state_dict(model.state_dict(), strict=True)
    except Exception as exc:  # noqa: BLE001 - any mismatch: the table says why the row is missing
        return None, f"left out (timm cannot build this model: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    import timm

    return twin.eval(), f"timm {timm.__version__} VisionTransformer.forward on the same weights"


def _trained_methods(args: argparse.Namespace, source: str, options: dict) -> dict:
    """Methods whose trained parts the checkpoint holds (a DynamicViT or SPOT checkpoint), loaded with them."""
    from ..methods import get_spec
    from ..methods import load_method

    found = {}
    if args.arch is not None:
        return found
    for name in [n for n in args.methods if get_spec(n).trains]:
        try:
            found[name] = load_method(source, name, img_size=args.img_size, **options.get(name, {}))
        except CheckpointError:  # not this method's checkpoint: random-init parts, same speed
            continue
    return found


def _versions(vitbudget_version: str) -> dict[str, str]:
    import platform

    from ..models.timm_compat import timm_available

    versions = {"vitbudget": vitbudget_version, "torch": torch.__version__, "python": platform.python_version()}
    if timm_available():
        from importlib.metadata import version

        versions["timm"] = version("timm")
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions
