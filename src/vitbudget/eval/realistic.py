"""The workload of `vitbudget speed`: methods x batch sizes x eager / compiled, on realistic shapes.

Every entry of one batch size is timed round-robin with the others (`speed.time_interleaved`),
so their ratios share the machine's noise. Per row: rel. FLOPs from the tokens the method ran
on that batch (`runtime.cost`), ideal speed-up = 1 / rel. FLOPs, measured speed-up = median
over rounds of baseline time / method time (the baseline of the same kind, eager or compiled),
fraction of ideal = speed-up x rel. FLOPs. The baseline is the runner with no method; timm's
own forward on the same weights is a row of its own where timm is installed, so what the
runtime costs beside timm is visible.

Methods with learned parts (DynamicViT, SPOT predictors) run with random-init parts unless the
checkpoint holds them: their token counts are fixed by rho, so their speed does not depend on the
weights. A-ViT's speed depends on where tokens halt: it replays a stated halting profile
(`methods.avit.HaltingReplay`), never a trained model's, and is labelled so.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..devices import autocast
from ..methods import build_method, get_spec
from ..methods.avit import AViTOptions, HaltingReplay, draw_halting_depths
from ..methods.base import Method
from ..methods.compiled import CompiledMethod, compile_support
from ..runtime.cost import dense_macs, macs_per_image
from .speed import fraction_of_ideal, paired_ratio, time_interleaved

TIMM = "timm"  # the label of timm's own forward


@dataclass(frozen=True)
class HaltingProfile:
    """A-ViT's replayed halting: patch-token depths ~ N(mean, std) blocks, rounded and clipped; CLS runs all."""

    mean: float = 8.0
    std: float = 2.0
    seed: int = 0

    def describe(self) -> str:
        return f"replayed halting profile: patch-token depths ~ N({self.mean:g}, {self.std:g}) blocks, rounded, clipped to [1, depth]; CLS runs every block"


@dataclass
class Entry:
    """One thing to time: a label, the callable, how it was made."""

    label: str
    method: str
    fn: Callable[[Tensor], Any]
    compiled: bool
    eager: Method | None  # the eager method (token counts and FLOPs are read off it); None for timm
    options: dict[str, Any] = field(default_factory=dict)
    weights: str = "as loaded"
    note: str = ""


def build_entries(
    model: nn.Module, methods: Sequence[str], options: dict[str, dict[str, Any]], *, compiled: bool = False,
    timm_model: nn.Module | None = None, weights: str = "random init", halting: HaltingProfile = HaltingProfile(),
    trained: dict[str, Method] | None = None,
) -> list[Entry]:
    """Entries for `methods` on `model` (the baseline first), eager and, with `compiled`, compiled too.

    trained: methods loaded with their own trained parts (from a method checkpoint), used as is.
    """
    names = list(dict.fromkeys(["baseline", *methods]))
    entries = []
    for name in names:
        opts = options.get(name, {})
        method = (trained or {}).get(name)
        part_weights = weights
        if method is None:
            if name == "avit":
                method = _replay(model, opts, halting)
            else:
                method = build_method(name, model, **opts)
            if get_spec(name).trains:  # learned parts: random init here unless the checkpoint has them
                part_weights = f"{weights}; predictors random init"
        method.eval()
        note = halting.describe() if name == "avit" else ""
        entries.append(Entry(name, name, method, False, method, opts, part_weights, note))
        if compiled:
            reason = compile_support(method)
            if reason is None:
                entries.append(Entry(name, name, CompiledMethod(method), True, method, opts, part_weights, note))
    if timm_model is not None:
        entries.insert(1, Entry(TIMM, TIMM, timm_model.eval(), False, None, {}, weights, "timm's own VisionTransformer.forward, same weights"))
        if compiled:
            entries.insert(2, Entry(TIMM, TIMM, torch.compile(timm_model, fullgraph=True, dynamic=False), True, None, {}, weights,
                                    "timm's own VisionTransformer.forward, same weights"))
    return entries


def _replay(model: nn.Module, opts: dict[str, Any], halting: HaltingProfile) -> HaltingReplay:
    n = model.cfg.num_patches + model.num_prefix_tokens
    return HaltingReplay(model, AViTOptions(**opts), draw_halting_depths(1, n, model.cfg.depth, halting.mean, halting.std, halting.seed))


def prepare_batch(entries: Sequence[Entry], batch: int, halting: HaltingProfile) -> None:
    """Per batch size: A-ViT's replay gets a profile for `batch` images (drawn with the profile's seed)."""
    for e in entries:
        if isinstance(e.eager, HaltingReplay):
            cfg = e.eager.model.cfg
            n = cfg.num_patches + e.eager.model.num_prefix_tokens
            e.eager.set_depths(draw_halting_depths(batch, n, cfg.depth, halting.mean, halting.std, halting.seed))


@torch.inference_mode()
def rel_flops(entry: Entry, images: Tensor) -> float:
    """Mean FLOPs per image the method needs on `images` (its real tokens), relative to the dense model."""
    if entry.eager is None:
        return 1.0
    out = entry.eager(images)
    cfg = entry.eager.base_cfg
    return float(macs_per_image(cfg, out.record).mean()) / dense_macs(cfg)


def measure(
    entries: Sequence[Entry], batch_sizes: Sequence[int], image_shape: tuple[int, int, int], *, device: torch.device,
    dtype: torch.dtype = torch.float32, repeats: int = 20, warmup: int = 3, halting: HaltingProfile = HaltingProfile(),
    inputs_per_batch: int = 4, seed: int = 0, progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per entry and batch size; all entries of a batch size timed round-robin together."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for batch in batch_sizes:
        prepare_batch(entries, batch, halting)
        count = inputs_per_batch if batch <= 8 else 2  # distinct inputs, cycled (large batches: memory)
        inputs = [torch.randn(batch, *image_shape, generator=g).to(device) for _ in range(count)]
        with autocast(device, dtype):
            flops = {e.label: rel_flops(e, inputs[0]) for e in entries if not e.compiled}
            fns = {_key(e): e.fn for e in entries}
            times = time_interleaved(fns, inputs, warmup=warmup, repeats=repeats)
        rows += rows_for_batch(entries, times, flops, batch)
        if progress is not None:
            progress(f"batch {batch}: timed {len(entries)} entries x {repeats} rounds")
    return rows


def _key(entry: Entry) -> str:
    return f"{entry.label}/{'compiled' if entry.compiled else 'eager'}"


def rows_for_batch(entries: Sequence[Entry], times: dict[str, list[float]], flops: dict[str, float], batch: int) -> list[dict[str, Any]]:
    """Rows from one round-robin's times: speed-ups against the baseline of the same kind (eager / compiled)."""
    rows = []
    for e in entries:
        ts = times[_key(e)]
        base = times[f"baseline/{'compiled' if e.compiled else 'eager'}"]
        rel = flops[e.label]
        speedup = 1.0 / paired_ratio(ts, base)
        median = statistics.median(ts)
        row = {
            "method": e.method, "label": e.label, "options": e.options, "batch_size": batch, "compiled": e.compiled,
            "rel_flops": rel, "ideal_speedup": 1.0 / rel, "speedup": speedup,
            "fraction_of_ideal": fraction_of_ideal(speedup, rel) if e.label not in ("baseline", TIMM) else None,
            "latency_ms": 1000 * median, "p10_ms": 1000 * sorted(ts)[len(ts) // 10], "p90_ms": 1000 * sorted(ts)[(9 * len(ts)) // 10],
            "throughput_img_s": batch / median, "repeats": len(ts), "weights": e.weights, "note": e.note,
        }
        if e.compiled:  # what compiling bought, for this entry
            row["speedup_vs_eager"] = 1.0 / paired_ratio(ts, times[f"{e.label}/eager"])
        rows.append(row)
    return rows


def speed_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table of `vitbudget speed`: one line per method x batch size x compiled."""
    head = ["method", "batch", "compiled", "rel. FLOPs", "ideal speed-up", "ms / batch", "img/s", "speed-up", "fraction of ideal",
            "compiled vs eager", "weights"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        frac = "–" if r["fraction_of_ideal"] is None else f"{r['fraction_of_ideal']:.2f}"
        vs = f"{r['speedup_vs_eager']:.2f}×" if "speedup_vs_eager" in r else "–"
        label = r["label"] + (" ¹" if r["method"] == "avit" else "") + (" (vs runner)" if r["label"] == TIMM else "")
        lines.append(f"| {label} | {r['batch_size']} | {'yes' if r['compiled'] else 'no'} | {r['rel_flops']:.3f} | "
                     f"{r['ideal_speedup']:.2f}× | {r['latency_ms']:.2f} | {r['throughput_img_s']:.1f} | {r['speedup']:.2f}× | {frac} | {vs} | "
                     f"{r['weights']} |")
    notes = sorted({r["note"] for r in rows if r["method"] == "avit" and r["note"]})
    tail = "".join(f"\n¹ A-ViT: {n}." for n in notes)
    return "\n".join(lines) + "\n" + tail + ("\n" if tail else "") + (
        "\nSpeed-up: median over rounds of the baseline's time / the method's (same kind, eager or compiled); "
        "fraction of ideal = speed-up × rel. FLOPs. Token counts of these methods are fixed by their options, "
        "so random-init weights time the same as trained ones.\n")
