"""The machine a measurement ran on, recorded next to every number."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    device = torch.device(device)
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict[str, object]) -> str:
    return f"{info.get('gpu') or info['cpu']}, {info['cores']} cores, torch {info['torch']}"


def attention_backend(device: torch.device | str = "cpu") -> str:
    """Which scaled_dot_product_attention kernels torch may pick on `device` (it picks per call by shape and dtype)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"torch SDPA on {device.type} (fused CPU kernel where no probabilities are needed)"
    cuda = torch.backends.cuda
    enabled = [name for name, on in (("flash", cuda.flash_sdp_enabled()), ("memory-efficient", cuda.mem_efficient_sdp_enabled()),
                                     ("cuDNN", cuda.cudnn_sdp_enabled()), ("math", cuda.math_sdp_enabled())) if on]
    return "torch SDPA, enabled kernels: " + ", ".join(enabled)


def write_benchmark_rows(out, stem: str, script: str, argv: list[str], rows: list, table: str) -> None:
    """A benchmark script's results: OUT/stem.json (command, machine, rows) and OUT/stem.md (the
    command and the machine in one line, then `table`), so every number keeps both."""
    import shlex
    import sys

    from ..io import write_json, write_text

    command = f"python {script} " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = {**machine_info(), "threads": torch.get_num_threads()}
    write_json(out / f"{stem}.json", {"command": command, "machine": machine, "rows": rows})
    write_text(out / f"{stem}.md", f"`{command}` — {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, "
                                   f"torch {machine['torch']}\n\n" + table)
