"""Benchmark suites: several methods × seeds on the same images, with significance and speed.

A seed changes only what is random in a method at inference (ABS: the entropy head's
initialisation and the random scorer's draw). Evaluation has no batch interactions (batched
equals one-by-one), so data order cannot change a result and is not a seed's business.
Deterministic methods run once; their value repeats across seeds in paired tests.

A suite is a named list below or a JSON file (`load_suite`), whose entries may each name their
own checkpoint, so trained methods (SPOT, DynamicViT, A-ViT at several target depths) are
compared on the same images and timed round-robin in one run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import distributed
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError
from ..methods import load_method, make_options
from ..methods.compiled import compile_method
from . import metrics
from ..runtime.cost import dense_macs
from .evaluate import measure_speed, predict


@dataclass(frozen=True)
class SuiteEntry:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    seeded: bool = False  # the method has a `seed` option that changes its result
    model: str | None = None  # checkpoint of this entry; None = the suite's --model
    versus: tuple[str, ...] = ()  # labels of other entries to pair this one against (besides the first entry)


BASELINE = SuiteEntry("Baseline", "baseline")

SUITES: dict[str, list[SuiteEntry]] = {
    # ABS paper, Tables 1, 3 and 4: global test-time baselines against ABS.
    "abs": [
        BASELINE,
        SuiteEntry("Multi-Crop", "multicrop"),
        SuiteEntry("Res Scale (1.3x)", "resolution", {"scale": 1.3}),
        SuiteEntry("Res Scale (1.5x)", "resolution", {"scale": 1.5}),
        SuiteEntry("Uniform Depth", "depth"),
        SuiteEntry("ABS (α = 0.2)", "abs", {"alpha": 0.2, "score": "entropy"}, seeded=True),
        SuiteEntry("ABS (α = 0.3)", "abs", {"alpha": 0.3, "score": "entropy"}, seeded=True),
    ],
    # ABS paper, Table 5: scorer × α.
    "abs-ablation": [
        BASELINE,
        SuiteEntry("ABS (Entropy) α 0.1", "abs", {"alpha": 0.1, "score": "entropy"}, seeded=True),
        SuiteEntry("ABS (Entropy) α 0.2", "abs", {"alpha": 0.2, "score": "entropy"}, seeded=True),
        SuiteEntry("ABS (Entropy) α 0.3", "abs", {"alpha": 0.3, "score": "entropy"}, seeded=True),
        SuiteEntry("ABS (AttnVar) α 0.2", "abs", {"alpha": 0.2, "score": "attnvar"}),
        SuiteEntry("ABS (GradSim) α 0.2", "abs", {"alpha": 0.2, "score": "gradsim"}),
        SuiteEntry("ABS (Random) α 0.2", "abs", {"alpha": 0.2, "score": "random"}, seeded=True),
    ],
    # ABS paper, section 5.4 (robustness) and Table 2 (counting): the short list.
    "abs-short": [
        BASELINE,
        SuiteEntry("Res Scale (1.3x)", "resolution", {"scale": 1.3}),
        SuiteEntry("ABS (Entropy) α 0.2", "abs", {"alpha": 0.2, "score": "entropy"}, seeded=True),
        SuiteEntry("ABS (AttnVar) α 0.2", "abs", {"alpha": 0.2, "score": "attnvar"}),
    ],
    # Training-free token reduction on any ViT with a class token (e.g. a new model family).
    "token-reduction": [
        BASELINE,
        SuiteEntry("ToMe r 4", "tome", {"r": 4}),
        SuiteEntry("EViT ρ 0.7", "evit", {"rho": 0.7}),
        SuiteEntry("SPOT heuristic ρ 0.7", "spot_heuristic", {"rho": 0.7}),
    ],
}


def load_suite(name_or_path: str, check_files: bool = True) -> list[SuiteEntry]:
    """A named suite, or a JSON file: {"entries": [{"label", "method", "options"?, "seeded"?, "model"?}, ...]}.

    Everything is checked before any work starts: unknown keys, value types, methods and
    options, duplicate labels, and (unless `check_files` is False, e.g. to validate a committed
    suite whose checkpoints are trained later) missing checkpoints; relative paths are taken
    from the working directory.
    """
    if name_or_path in SUITES:
        return SUITES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"--suite {name_or_path!r} is neither a named suite ({', '.join(sorted(SUITES))}) nor a JSON file")
    try:
        spec = json.loads(path.read_text())
        raw = spec["entries"]
        if not isinstance(raw, list) or not raw:
            raise TypeError("'entries' must be a non-empty list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"suite file {str(path)!r} is not a suite (JSON with a non-empty \"entries\" list): {exc}") from None
    known = {f.name for f in dataclasses.fields(SuiteEntry)}
    entries = []
    for i, item in enumerate(raw):
        where = f"suite file {str(path)!r}, entry {i}"
        if not isinstance(item, dict) or not {"label", "method"} <= set(item):
            raise ConfigError(f"{where}: needs at least \"label\" and \"method\"")
        unknown = sorted(set(item) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        entry = SuiteEntry(**{**item, "versus": tuple(item.get("versus", ()))})
        types = {"label": str, "method": str, "options": dict, "seeded": bool, "model": (str, type(None))}
        wrong = [k for k, kind in types.items() if not isinstance(getattr(entry, k), kind)]
        if wrong:
            raise ConfigError(f"{where}: {', '.join(wrong)} has the wrong type (label, method, model: strings; options: an object; seeded: true/false)")
        make_options(entry.method, {**entry.options, **({"seed": 0} if entry.seeded else {})})  # unknown method/option -> ConfigError
        if check_files and entry.model is not None and not Path(entry.model).is_file():
            raise CheckpointError(f"{where} ({entry.label!r}): checkpoint {entry.model!r} not found")
        entries.append(entry)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"suite file {str(path)!r}: labels must be unique, got {labels}")
    unknown = sorted({v for e in entries for v in e.versus} - set(labels))
    if unknown:
        raise ConfigError(f"suite file {str(path)!r}: \"versus\" names labels that are not entries: {', '.join(map(repr, unknown))}")
    return entries


def check_suite_classes(entries: Sequence[SuiteEntry], model_path: str | os.PathLike, classes: Sequence[str] | None) -> None:
    """Every entry's checkpoint must name the same classes as the suite's model (they share one labelled dataset)."""
    from ..models.loading import read_sidecar, sidecar_path

    for entry in entries:
        if entry.model is None or Path(entry.model) == Path(model_path):
            continue
        theirs = read_sidecar(sidecar_path(entry.model)).get("classes")
        if classes is not None and theirs is not None and list(theirs) != list(classes):
            raise ConfigError(f"suite entry {entry.label!r}: checkpoint {entry.model!r} has classes {theirs} "
                              f"but the suite's model {str(model_path)!r} has {list(classes)}; their top-1 would not be comparable")


def run_suite(
    entries: Sequence[SuiteEntry], model_path: str | os.PathLike, dataset, indices: Sequence[int], *, seeds: Sequence[int] = (0,),
    batch_size: int = 256, workers: int | None = None, device: str = "cpu", speed: bool = True, progress: bool = True,
    latency_repeats: int = 50, throughput_repeats: int = 10, compile: bool = False,
) -> dict[str, Any]:
    """Every entry on the same images; the first entry is the reference for ratios and tests.

    compile: run every method under torch.compile (`methods.compiled`), predictions and speed.

    A feature extractor (no head) has no labels to score: each row reports the cosine similarity
    of its pooled features to the reference entry's (seed 0), per image, averaged; p-values and
    McNemar tests are left out.

    Distributed (torchrun): predictions are shared out and gathered (`predict`), so every rank
    holds the single-process rows; speed is timed on rank 0 only.
    """
    device = resolve_device(device)
    rows: dict[str, dict[str, Any]] = {}
    correct: dict[str, list[np.ndarray]] = {}
    first_logits: dict[str, Any] = {}  # seed 0's logits, for paired calibration tests
    labels = None
    speed_methods = {}
    reference_features = None
    for entry in entries:
        per_seed = []
        for seed in seeds if entry.seeded else seeds[:1]:
            options = {**entry.options, **({"seed": seed} if entry.seeded else {})}
            method = load_method(entry.model or model_path, entry.method, **options).to(device)
            if compile:
                method = compile_method(method)
            pred = predict(method, dataset, indices, batch_size, workers, device, progress, desc=f"{entry.label} s{seed}")
            summary = pred.summary(dense_macs(method.base_cfg))
            if pred.features:
                reference_features = pred.logits if reference_features is None else reference_features
                summary["cosine"] = float(metrics.cosine_similarity(pred.logits, reference_features).mean())
            per_seed.append({"seed": seed if entry.seeded else None, **summary})
            correct.setdefault(entry.label, []).append((pred.logits.argmax(1) == pred.labels).numpy())
            if entry.label not in first_logits:
                first_logits[entry.label], labels = pred.logits, pred.labels
            if entry.label not in speed_methods:
                speed_methods[entry.label] = method
        rows[entry.label] = aggregate(entry, per_seed)
    reference = entries[0].label
    for label, row in rows.items():
        if label == reference or reference_features is not None:
            continue
        ref_top1 = [r["top1"] for r in rows[reference]["per_seed"]]
        top1 = [r["top1"] for r in row["per_seed"]]
        base = np.resize(ref_top1, len(top1))
        row["p_ttest_seeds"] = metrics.paired_ttest(np.array(top1), base) if len(top1) > 1 else None
        row["mcnemar_seed0"] = metrics.mcnemar(correct[label][0], correct[reference][0])
        row["top1_gain"] = row["top1_mean"] - rows[reference]["top1_mean"]
    for entry in entries:
        if entry.versus and reference_features is None:  # features have no labels to pair on
            rows[entry.label]["versus"] = {other: paired(rows[entry.label], rows[other], correct[entry.label][0], correct[other][0],
                                                          first_logits[entry.label], first_logits[other], labels) for other in entry.versus}
    if speed and distributed.context().main:
        for label, entry in measure_speed(speed_methods, dataset, indices, device, latency_repeats=latency_repeats,
                                          throughput_repeats=throughput_repeats, baseline=reference).items():
            rows[label].update(entry)
        ref_ms = rows[reference]["latency_b1_ms"]
        for label, row in rows.items():
            if label != reference:
                row["latency_overhead_pct"] = 100 * (row["latency_ratio"] - 1)
                extra_ms = row["latency_b1_ms"] - ref_ms
                row["gain_per_ms"] = row["top1_gain"] / extra_ms if extra_ms > 0 and "top1_gain" in row else None
    return {"seeds": list(seeds), "images": len(indices), "rows": rows}


def paired(row: dict[str, Any], other: dict[str, Any], correct, correct_other, logits, logits_other, labels) -> dict[str, Any]:
    """One entry against another on the same images: top-1 and ECE differences with paired tests."""
    out: dict[str, Any] = {}
    for key in ("top1", "ece"):
        mine, theirs = [r[key] for r in row["per_seed"]], [r[key] for r in other["per_seed"]]
        n = max(len(mine), len(theirs))
        out[f"{key}_gain"] = row[f"{key}_mean"] - other[f"{key}_mean"]
        out[f"p_ttest_{key}"] = metrics.paired_ttest(np.resize(mine, n), np.resize(theirs, n)) if n > 1 else None
    out["mcnemar_seed0"] = metrics.mcnemar(correct, correct_other)
    out["ece_bootstrap_seed0"] = metrics.ece_difference(logits, logits_other, labels)
    return out


def paired_table(result: dict[str, Any]) -> str:
    """Markdown: each entry against the entries it names in "versus" (empty when none do)."""
    lines = []
    for label, r in result["rows"].items():
        for other, v in r.get("versus", {}).items():
            boot = v["ece_bootstrap_seed0"]
            lines.append(
                f"| {label} | {other} | {v['top1_gain']:+.2f} | {_p(v['p_ttest_top1'])} | {_p(v['mcnemar_seed0']['p_value'])} | "
                f"{v['ece_gain']:+.2f} | {_p(v['p_ttest_ece'])} | {boot['delta']:+.2f} [{boot['ci_low']:+.2f}, {boot['ci_high']:+.2f}], p {_p(boot['p_value'])} |"
            )
    if not lines:
        return ""
    header = ["| method | versus | Δ top-1 (points) | p (t-test over seeds) | p (McNemar, seed 0) | Δ ECE (points) | p (ECE t-test over seeds) | "
              "Δ ECE seed 0 [95 % bootstrap interval], p |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(header + lines) + "\n"


def aggregate(entry: SuiteEntry, per_seed: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"method": entry.method, "options": entry.options, "seeded": entry.seeded, "per_seed": per_seed}
    out["model"] = entry.model
    for key in ("top1", "ece", "nll", "cosine"):
        if key in per_seed[0]:
            out[f"{key}_mean"], out[f"{key}_std"] = metrics.mean_std([r[key] for r in per_seed])
    for key in ("rel_flops", "gflops", "gflops_p05", "gflops_p95", "gflops_executed", "token_depth"):
        out[key] = per_seed[0][key]
    return out


def _p(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def _mean_std(row: dict[str, Any], key: str, digits: int = 2) -> str:
    if f"{key}_mean" not in row:
        return "–"
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["per_seed"]) > 1 else f"{mean:.{digits}f}"


def _opt(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def suite_table(result: dict[str, Any]) -> str:
    """Markdown: the paper's Table 1/4 columns plus our significance and speed columns.

    A feature extractor's rows score cosine similarity to the reference instead of top-1, ECE and NLL.
    """
    features = any("cosine_mean" in r for r in result["rows"].values())
    scores = "cos. sim. to reference" if features else "top-1 % | ECE % | NLL"
    lines = [
        f"| method | seeds | GFLOPs | rel. FLOPs | {scores} | p (t-test over seeds) | p (McNemar, seed 0) | "
        "b1 latency ms | latency overhead % | b64 throughput ratio | top-1 gain per extra ms |",
        "|---|---|---|---|" + "---|" * (1 if features else 3) + "---|---|---|---|---|---|",
    ]
    for label, r in result["rows"].items():
        mcnemar = r.get("mcnemar_seed0")
        score = _mean_std(r, "cosine", 4) if features else f"{_mean_std(r, 'top1')} | {_mean_std(r, 'ece')} | {_mean_std(r, 'nll', 3)}"
        lines.append(
            f"| {label} | {len(r['per_seed'])} | {r['gflops']:.4f} | {r['rel_flops']:.3f}× | {score} | "
            f"{_p(r.get('p_ttest_seeds'))} | {_p(mcnemar['p_value']) if mcnemar else '–'} | "
            f"{_opt(r.get('latency_b1_ms'), '.2f')} | {_opt(r.get('latency_overhead_pct'), '+.1f')} | "
            f"{_opt(r.get('throughput_ratio'), '.3f')} | {_opt(r.get('gain_per_ms'), '+.3f')} |"
        )
    return "\n".join(lines) + "\n"
