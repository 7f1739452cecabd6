"""Wall-clock latency and throughput, interleaved across methods so ratios share the same noise."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch import Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_interleaved(
    fns: dict[str, Callable[[Tensor], object]], inputs: Sequence[Tensor], warmup: int = 3, repeats: int = 20, rotate: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of every fn, measured round-robin (A B C A B C ...); round r uses inputs[r % len].

    Round-robin makes every method see the same background load, so ratios to the baseline
    are fair on a shared, noisy machine even when absolute times drift. rotate: round r starts
    at entry r % len (A B C, B C A, C A B ...), so no entry always runs first or after the same
    one: for differences of about 1 %, where a fixed position's cache state would show.
    """
    device = inputs[0].device
    for fn in fns.values():
        for r in range(warmup):
            fn(inputs[r % len(inputs)])
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start = time.perf_counter()
            fn(x)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def speed_report(times: dict[str, list[float]], batch: int, baseline: str | None = None) -> dict[str, dict[str, float]]:
    """Median ms per batch, images/s, and the ratio to `baseline` of each (median of per-round ratios)."""
    report = {}
    for name, ts in times.items():
        entry = {
            "median_ms": 1000 * statistics.median(ts),
            "p10_ms": 1000 * sorted(ts)[len(ts) // 10],
            "p90_ms": 1000 * sorted(ts)[(9 * len(ts)) // 10],
            "images_per_s": batch / statistics.median(ts),
            "repeats": len(ts),
        }
        if baseline is not None and baseline in times:
            entry["time_ratio"] = paired_ratio(ts, times[baseline])
        report[name] = entry
    return report


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of time / reference time (rounds were interleaved, so each pair shares its load)."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def fraction_of_ideal(speedup: float, rel_flops: float) -> float:
    """How much of the FLOPs saving became wall-clock: measured speed-up / ideal speed-up (1 / rel. FLOPs)."""
    return speedup * rel_flops
