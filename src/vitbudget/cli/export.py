"""`vitbudget export`: a checkpoint with its method as one ONNX file, `torch.export` program or OpenVINO IR."""
from __future__ import annotations

import argparse
import json

from ..defaults import DEFAULT_MODEL
from ..export import FORMATS
from ..export.onnx_file import MAX_OPSET, MIN_OPSET
from ..methods import build_method, load_method
from .options import (add_common_flags, add_checkpoint_flags, add_config_flag, add_method_option_flags, apply_run_config, bounded, check_unused_options,
                      device_arg, method_help, method_name, method_options, resolve_default)

EPILOG = """examples:
  vitbudget export --method evit --rho 0.7 --out evit.onnx                  # shared reference model
  vitbudget export --model runs/ft/spot/model.safetensors --method spot --out spot.pt2
  vitbudget export --model deit_s.pth --arch deit_small_patch16_224 --method tome --r 13 --format onnx --out tome.onnx
  vitbudget export --method avit --dense true --model runs/avit_d6/model.safetensors --out avit.onnx
  vitbudget export --method tome --r 4 --out tome.xml                      # OpenVINO IR: tome.xml + tome.bin
  vitbudget export --method tome --r 4 --quantize int8 --out tome_int8.onnx  # + int8 weights (onnxruntime dynamic quantization)
  vitbudget export --config runs/tune/config.json --out tuned.onnx          # the setting `vitbudget tune` chose

The file takes a float32 batch "images" (batch, 3, H, W), normalised as its metadata says, and
returns "logits"; the batch size is free. Metadata (preprocessing, class names, method and options,
tokens per block, FLOPs, vitbudget version) is in ONNX metadata_props, or in the .pt2 archive as
vitbudget.json, or in the OpenVINO IR's rt_info; read any with vitbudget.export.read_metadata.
Before the file is published it is run on 3 random images and compared with PyTorch. ONNX needs
pip install 'vitbudget[export]'; OpenVINO also pip install 'vitbudget[openvino]'. Methods whose
token counts depend on the pixels (A-ViT's removing path, avit+abs) are refused: export A-ViT
with --dense true."""


def add_parser(sub) -> argparse.ArgumentParser:
    ex = sub.add_parser("export", help="export a model with its method to ONNX, torch.export or OpenVINO (fixed token counts)",
                        description="Trace a checkpoint with a method into one file that runs without vitbudget.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ex)
    add_common_flags(ex, out=None, out_help="output file (.onnx, .pt2 or .xml)")
    ex.add_argument("--method", default=None, type=method_name, metavar="NAME", help=method_help("method to export with the model (default baseline)"))
    ex.add_argument("--format", default=None, choices=list(FORMATS), help="file format (default: from --out's suffix, .onnx, .pt2 or .xml)")
    ex.add_argument("--opset", type=bounded(int, f"an ONNX opset from {MIN_OPSET} to {MAX_OPSET}", lambda v: MIN_OPSET <= v <= MAX_OPSET),
                    default=None, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: the exporter's, 20 with torch 2.13)")
    ex.add_argument("--quantize", default=None, choices=["int8"], help="ONNX only: int8 weights for every matrix product "
                    "(onnxruntime dynamic quantization, activations quantized per call), stacked on the method's token savings")
    ex.add_argument("--no-verify", action="store_true", help="skip running the exported file against PyTorch")
    add_config_flag(ex)
    add_method_option_flags(ex)
    return ex


def run(args: argparse.Namespace) -> int:
    from ..export import check_request, export_method, format_of
    from ..export.quantize import check_quantize
    from ..models import load_model

    fmt = format_of(args.out, args.format)  # before any loading: a bad name or opset fails at once
    check_request(fmt, args.out, args.opset)
    check_quantize(args.quantize, fmt)
    apply_run_config(args)
    args.method = args.method or "baseline"
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    check_unused_options(args, [args.method])
    if args.arch is None:
        method = load_method(model_path, args.method, img_size=args.img_size, **method_options(args, args.method))
    else:
        overrides = {"num_classes": args.num_classes} if args.num_classes else {}
        model = load_model(model_path, arch=args.arch, **overrides)
        if args.img_size is not None and args.img_size != model.cfg.img_size:
            model.set_input_size(args.img_size)
        method = build_method(args.method, model, **method_options(args, args.method))
    result = export_method(method.to(args.device), args.out, fmt, source=str(model_path), verify=not args.no_verify, opset=args.opset,
                           quantize=args.quantize)
    meta = result.metadata
    print(f"wrote {result.path} ({result.format}): {meta['method']['name']} {json.dumps(meta['method']['options'])}")
    print(f"tokens entering each block's attention in the exported graph: {meta['tokens']['attention']}")
    print(f"GFLOPs per image {meta['gflops']:.4f} ({meta['rel_flops']:.3f}x the model without the method)")
    if result.max_abs_diff is None:
        print("not checked against PyTorch" + ("" if args.no_verify else " (onnxruntime is not installed)"))
    elif fmt == "openvino":
        print(f"max |logits - PyTorch logits| = {result.max_abs_diff:.2e} on 3 random images (OpenVINO CPU, f32); weights in {result.path.with_suffix('.bin')}")
    else:
        quantized = " (int8 weights: quantization error included)" if args.quantize else ""
        print(f"max |logits - PyTorch logits| = {result.max_abs_diff:.2e} on 3 random images{quantized}")
    return 0
