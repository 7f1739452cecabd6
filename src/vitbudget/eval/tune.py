"""The tuner: which method and setting meets a speed (or FLOPs) target on this machine, most accurately.

A user does not want a ρ or an r; they want "1.5× faster on my hardware, losing as little as
possible". The tuner measures candidates and recommends one:

* candidates: the baseline, the training-free reducers over a grid (EViT, the SPOT heuristic and
  Zero-TPrune over ρ, ToMe, ToFu and MCTF over r scaled to the model's patches per merging block,
  PiToMe over its keep ratio, threshold merging over its threshold), each of them followed by ABS (stacks),
  and trained method checkpoints the user passes (with their stacks);
* accuracy on a held-out part of the TRAINING split, never the test split (`data.holdout_indices`:
  disjoint from every `--train-limit L` subset, at every training seed, while L <= N - holdout).
  A model trained on the whole split has seen them: the numbers are then optimistic, and only
  their order matters; the chosen setting is measured once on the test split afterwards;
* speed on this machine at the user's batch size: first predicted for every candidate by the
  machine's latency model (`latency_model`, one block's time against its token count, measured
  once and cached), then the promising candidates timed round-robin with the library's timer
  (`eval.speed.time_interleaved`), as speed-up = median over rounds of baseline time / candidate
  time (`eval.speed.paired_ratio`); the table shows prediction and measurement side by side;
* recommendation: the most accurate candidate that meets the target in these measurements
  (speed-up >= target, and/or relative FLOPs <= target), ties broken by speed, never one
  measured slower than the unmodified model at this batch size (marked in the table instead).

Accuracy results are kept in a state file as they come, keyed by the checkpoints' contents, so a
killed run resumes; timing is always redone (it must be round-robin within one run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import holdout_indices
from ..data.archive import file_sha256
from ..devices import out_of_memory
from ..errors import ConfigError, VitbudgetError
from ..io import write_json
from ..methods import build_method, load_method
from ..methods.labels import display_name, setting_label
from ..runtime.cost import dense_macs
from . import metrics
from .evaluate import predict
from .latency_model import executed_widths, load_or_measure
from .speed import fraction_of_ideal, paired_ratio, time_interleaved

RHOS = (0.5, 0.6, 0.7, 0.8, 0.9)
TOME_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)  # r = fraction * patches / depth: 1.0 merges all patches by the last block
PITOME_RATIOS = (0.975, 0.95, 0.925, 0.9, 0.875)  # kept per block; the reference's evaluations use 0.9-0.975
# Key cosine similarity above which a pair merges (no decay). Its scale is the model's: on the 32-px toy
# model 0.9 already merges to 0.32x FLOPs, on the pretrained ViT-S/14 anything below ~0.99 merges half the
# tokens in every block (0.995: 0.79x, 0.998: 0.92x), so the grid spans both.
THRESH_THR0S = (0.998, 0.995, 0.99, 0.95, 0.9, 0.8)
FAMILIES = ("evit", "spot_heuristic", "tome", "mctf", "zerotprune", "pitome", "tofu", "thresh")
SLOWER = "slower than the unmodified model"  # the mark of a candidate that is never recommended
PROMISING = 0.9  # time a candidate whose predicted speed-up reaches this fraction of the target (the prediction is an upper bound; margin for noise)


@dataclass(frozen=True)
class Candidate:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # its own checkpoint (a trained method); None = the tuned model

    @property
    def key(self) -> str:
        return json.dumps([self.method, self.options, self.model], sort_keys=True)


def tome_rs(num_patches: int, depth: int) -> list[int]:
    """ToMe's r grid for this model: r = f * patches / depth for f in TOME_FRACTIONS, 1 <= r <= patches / 2."""
    return sorted({min(num_patches // 2, max(1, round(f * num_patches / depth))) for f in TOME_FRACTIONS})


def default_candidates(cfg, *, families: Sequence[str] = FAMILIES, stacks: bool = True, stack_alpha: float = 0.2,
                       checkpoints: Sequence[tuple[str, str]] = ()) -> list[Candidate]:
    """Baseline, each family over its grid (+ ABS), then each (checkpoint, method) given (+ ABS if it reduces tokens)."""
    from ..methods import make_options
    from ..methods.registry import names_of

    make_options("abs", {"alpha": stack_alpha})  # a bad --stack-alpha is an error, not a family that does not apply
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} cannot be swept (training-free families: {', '.join(FAMILIES)})")
    out = [Candidate("Baseline", "baseline")]
    settings = []
    for family in families:
        if family in ("tome", "tofu"):
            settings += [(family, {"r": r}) for r in tome_rs(cfg.num_patches, cfg.depth)]
        elif family == "mctf":  # merges in every block but the first (its default --activate-layer)
            settings += [("mctf", {"r": r}) for r in tome_rs(cfg.num_patches, max(1, cfg.depth - 1))]
        elif family == "pitome":
            settings += [("pitome", {"ratio": ratio}) for ratio in PITOME_RATIOS]
        elif family == "thresh":
            settings += [("thresh", {"thr0": thr}) for thr in THRESH_THR0S]
        else:
            settings += [(family, {"rho": rho}) for rho in RHOS]
    for method, options in settings:
        out.append(Candidate(f"{display_name(method)} {setting_label(options)}", method, options))
        if stacks:
            opts = {**options, "alpha": stack_alpha}
            out.append(Candidate(f"{display_name(method + '+abs')} {setting_label(opts)}", method + "+abs", opts))
    checkpoints = list(dict.fromkeys(checkpoints))  # the same checkpoint twice is measured once
    for (path, method), name in zip(checkpoints, checkpoint_names([p for p, _ in checkpoints])):
        out.append(Candidate(f"{display_name(method)} ({name})", method, {}, path))
        if stacks and method in names_of("reducer"):
            out.append(Candidate(f"{display_name(method + '+abs')} ({name}) α {stack_alpha:g}", method + "+abs", {"alpha": stack_alpha}, path))
    return out


def checkpoint_names(paths: Sequence[str]) -> list[str]:
    """A short name per checkpoint path for its label: the folder's name, or where two folders share a
    name, the path below what the clashing ones have in common (labels key the results: they must differ)."""
    full = [Path(p).absolute() for p in paths]
    short = [p.parent.name or p.stem for p in full]
    names = []
    for path, name in zip(full, short):
        clash = sorted({q for q, n in zip(full, short) if n == name})
        if len(clash) > 1:
            name = path.with_suffix("").relative_to(os.path.commonpath(clash)).as_posix()
        names.append(name)
    owners: dict[str, set[Path]] = {}
    for path, name in zip(full, names):
        owners.setdefault(name, set()).add(path)
    return [str(path) if len(owners[name]) > 1 else name for path, name in zip(full, names)]  # still alike: the whole path


def meets(row: dict[str, Any], target_speedup: float | None, target_flops: float | None) -> bool:
    ok = True
    if target_speedup is not None:
        ok = ok and row.get("speedup") is not None and row["speedup"] >= target_speedup
    if target_flops is not None:
        ok = ok and row["rel_flops"] <= target_flops
    return ok


def recommend(rows: dict[str, dict[str, Any]], target_speedup: float | None, target_flops: float | None) -> str | None:
    """The most accurate candidate meeting the target and not measured slower than the baseline (ties: the faster, then the cheaper)."""
    ok = [label for label, r in rows.items() if r["meets"] and not r.get("slower_than_baseline")]
    if not ok:
        return None
    return max(ok, key=lambda lb: (rows[lb]["top1_mean"], rows[lb].get("speedup") or 0.0, -rows[lb]["rel_flops"]))


class TuneState:
    """Accuracy per candidate, saved as it comes so a killed run resumes (atomic JSON)."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]):
        self.path, self.fingerprint, self.done = path, fingerprint, {}
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.done = saved.get("done", {})

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, {"fingerprint": self.fingerprint, "done": self.done})


def content_digest(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint's bytes: the file and its JSON sidecar, or every file of a (Hugging Face) directory.

    Results cached for a checkpoint are keyed by it: a checkpoint rewritten in place, even with
    the same size and modification time, is measured again.
    """
    from ..models.loading import sidecar_path

    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root, sidecar_path(root)]
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{file_sha256(f)}\0".encode())
    return digest.hexdigest()


def fingerprint(model_path: str, dataset, indices: Sequence[int], extra: dict[str, Any]) -> dict[str, Any]:
    """What the cached accuracies depend on besides each candidate: the tuned model's contents, the images and their labels."""
    images = hashlib.sha256(json.dumps([list(dataset.samples[i]) for i in indices]).encode()).hexdigest()[:16]
    return {"model": str(Path(model_path).resolve()), "model_sha256": content_digest(model_path), "images": images, **extra}


def check_same_classes(model, other, where: str) -> None:
    """A checkpoint candidate must predict the tuned model's classes, in its order: the labels are the tuned model's."""
    ours, theirs = model.info.classes, other.info.classes
    if other.cfg.num_classes != model.cfg.num_classes or (ours is not None and theirs is not None and list(ours) != list(theirs)):
        def say(m):
            return f"{m.cfg.num_classes} outputs" + (f" ({', '.join(m.info.classes[:5])}{', ...' if len(m.info.classes) > 5 else ''})" if m.info.classes else "")
        raise ConfigError(f"{where} predicts other classes than --model ({say(other)} against {say(model)}): "
                          "its held-out accuracy would mean nothing")


def tune(
    model, model_path: str, dataset, indices: Sequence[int], candidates: Sequence[Candidate], *,
    target_speedup: float | None = None, target_flops: float | None = None, batch_size: int = 1, device: str = "cpu",
    repeats: int = 30, warmup: int = 3, eval_batch_size: int = 256, workers: int | None = None, progress: bool = True,
    state_path: Path | None = None, build: Callable[[Candidate], Any] | None = None, speed: bool = True, time_all: bool = False,
) -> dict[str, Any]:
    """Measure every candidate (accuracy on `indices`, speed at `batch_size`) and recommend one.

    `model` is the loaded tuned model (training-free candidates share it); `build(candidate)` may
    replace how a candidate becomes a Method (the CLI passes one that honours --arch). `speed=False`
    skips timing (a FLOPs target only: on a shared machine, or where timing is done elsewhere).
    With timing, every candidate's speed-up is first predicted from the machine's latency model
    (`latency_model`: cached per machine and shape) and only the promising ones are timed: those
    that meet a FLOPs target and whose predicted speed-up (an upper bound: it leaves the method's
    own bookkeeping out) reaches PROMISING x a speed target; `time_all` times every candidate.
    Accuracy is saved to `state_path` as it comes; the file stays for the caller to remove once the
    results are safely written (a rerun, with any target, then skips the accuracy pass).
    """
    if target_speedup is None and target_flops is None:
        raise ConfigError("give a target: --target-speedup X (measured, on this machine) and/or --target-flops F (relative FLOPs)")
    if not speed and target_speedup is not None:
        raise ConfigError("--target-speedup needs the speed measurement; drop --no-speed, or give --target-flops only")
    for name, value in (("--target-speedup", target_speedup), ("--target-flops", target_flops)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a positive number, got {value}")
    if batch_size <= 0 or repeats <= 0 or warmup < 0:
        raise ConfigError(f"--batch-size and --repeats must be positive and --warmup >= 0, got {batch_size}, {repeats}, {warmup}")
    if speed and batch_size > len(indices):
        raise ConfigError(f"--batch-size {batch_size} exceeds the {len(indices)} held-out images the timing batches are made of; "
                          "lower it, or raise --holdout")
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"candidate labels must differ (they key the results): {sorted({lb for lb in labels if labels.count(lb) > 1})}")
    build = build or (lambda c: load_method(c.model, c.method, **c.options) if c.model else build_method(c.method, model, **c.options))
    methods, skipped = {}, {}
    for cand in candidates:  # build everything first: a bad checkpoint or option fails before any work
        try:
            methods[cand.label] = build(cand).to(device).eval()
        except ConfigError as exc:
            if cand.model is not None or cand.method == "baseline":
                raise
            skipped[cand.label] = str(exc)  # a family that does not apply to this model (e.g. no class token)
        if cand.model is not None:
            check_same_classes(model, methods[cand.label].model, f"--checkpoint {cand.model!r}")
    if "Baseline" not in methods:
        raise ConfigError("the candidates must include the baseline (label 'Baseline')")
    state = TuneState(state_path, fingerprint(model_path, dataset, indices, {"device": str(device)}))
    digests = {c.model: content_digest(c.model) for c in candidates if c.model is not None}
    base_macs = dense_macs(model.cfg)
    bar = tqdm(total=len(methods), desc="accuracy (held-out train images)", unit="cand", disable=not progress)
    rows: dict[str, dict[str, Any]] = {}
    correct: dict[str, np.ndarray] = {}
    for cand in candidates:
        if cand.label not in methods:
            continue
        key = json.dumps([cand.key, digests.get(cand.model)])  # a checkpoint rewritten since is measured again
        cached = state.done.get(key)
        if cached is None:
            with out_of_memory(device, f"lower --eval-batch-size (now {eval_batch_size})"):
                pred = predict(methods[cand.label], dataset, indices, eval_batch_size, workers, device, progress, desc=cand.label)
            summary = pred.summary(base_macs)
            cached = {"summary": summary, "correct": (pred.logits.argmax(1) == pred.labels).int().tolist()}
            state.done[key] = cached
            state.save()
        correct[cand.label] = np.asarray(cached["correct"], bool)
        s = cached["summary"]
        rows[cand.label] = {"method": cand.method, "options": cand.options, "model": cand.model, "top1_mean": s["top1"],
                            "ece": s["ece"], "nll": s["nll"], "gflops": s["gflops"], "rel_flops": s["rel_flops"]}
        bar.update(1)
    bar.close()
    for label, row in rows.items():
        row["mcnemar_p_vs_baseline"] = None if label == "Baseline" else metrics.mcnemar(correct[label], correct["Baseline"])["p_value"]
    timing: dict[str, dict[str, float]] = {}
    if speed:
        with out_of_memory(device, f"lower --batch-size (now {batch_size})"):
            predicted = predict_speedups({lb: methods[lb] for lb in rows}, model, dataset, indices, batch_size, device, progress)
            for label, row in rows.items():
                row["predicted_speedup"] = predicted[label]
            timed = [lb for lb, row in rows.items()
                     if time_all or lb == "Baseline" or promising(row, target_speedup, target_flops)]
            timing = measure_speedups({lb: methods[lb] for lb in timed}, dataset, indices, batch_size=batch_size, device=device,
                                      repeats=repeats, warmup=warmup, progress=progress)
    for label, row in rows.items():
        row["timed"] = label in timing
        row.update(timing.get(label, dict.fromkeys(("speedup", "speedup_q25", "speedup_q75", "latency_ms", "images_per_s"))))
        row["fraction_of_ideal"] = None if row["speedup"] is None else fraction_of_ideal(row["speedup"], row["rel_flops"])
        row["slower_than_baseline"] = None if row["speedup"] is None else row["speedup"] < 1.0
        row["meets"] = meets(row, target_speedup, target_flops)
    chosen = recommend(rows, target_speedup, target_flops)
    return {"rows": rows, "recommended": chosen, "skipped": skipped, "target_speedup": target_speedup, "target_flops": target_flops,
            "batch_size": batch_size if speed else None, "device": str(device), "repeats": repeats if speed else 0, "images": len(indices),
            "prediction_error": prediction_error(rows)}


def promising(row: dict[str, Any], target_speedup: float | None, target_flops: float | None) -> bool:
    """Worth timing: meets the FLOPs target, and its predicted speed-up (an upper bound) reaches PROMISING x the speed target."""
    if target_flops is not None and row["rel_flops"] > target_flops:
        return False
    return target_speedup is None or row["predicted_speedup"] >= PROMISING * target_speedup


def predict_speedups(methods: dict[str, Any], model, dataset, indices: Sequence[int], batch_size: int, device: str,
                     progress: bool = True) -> dict[str, float]:
    """Each candidate's speed-up predicted by the latency model from the widths its blocks ran on one held-out batch."""
    curve, _ = load_or_measure(model, batch_size, device, progress=progress)
    images = torch.stack([dataset[indices[j % len(indices)]][0] for j in range(batch_size)]).to(device)
    times = {label: curve.predict(executed_widths(method, images)) for label, method in methods.items()}
    return {label: times["Baseline"] / t for label, t in times.items()}


def prediction_error(rows: dict[str, dict[str, Any]]) -> float | None:
    """Median relative error of the predicted speed-up against the measured one, over the timed candidates."""
    errors = [abs(r["predicted_speedup"] - r["speedup"]) / r["speedup"] for label, r in rows.items()
              if label != "Baseline" and r.get("speedup") is not None and r.get("predicted_speedup") is not None]
    return statistics.median(errors) if errors else None


def measure_speedups(methods: dict[str, Any], dataset, indices: Sequence[int], *, batch_size: int, device: str, repeats: int,
                     warmup: int = 3, progress: bool = True) -> dict[str, dict[str, float]]:
    """Round-robin timing at `batch_size` over up to 16 distinct batches of held-out images (256 images at most).

    speed-up = median over rounds of (baseline time / candidate time) in that round: the median of
    per-round ratios, so each ratio compares two calls under the same load (not a ratio of medians).
    """
    count = max(1, min(16, 256 // batch_size, len(indices) // batch_size))
    take = [indices[(i * batch_size + j) % len(indices)] for i in range(count) for j in range(batch_size)]
    images = torch.stack([dataset[i][0] for i in take]).to(device)
    inputs = list(images.split(batch_size))
    time_interleaved(methods, inputs, warmup=warmup, repeats=0)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in tqdm(range(repeats), desc=f"speed (batch {batch_size}, {len(methods)} candidates round-robin)", unit="round", disable=not progress):
        for name, ts in time_interleaved(methods, [inputs[r % len(inputs)]], warmup=0, repeats=1).items():
            times[name] += ts
    base = times["Baseline"]
    out = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        out[name] = {"speedup": paired_ratio(base, ts), "speedup_q25": float(np.percentile(ratios, 25)),
                     "speedup_q75": float(np.percentile(ratios, 75)), "latency_ms": 1000 * statistics.median(ts),
                     "images_per_s": batch_size / statistics.median(ts)}
    return out


def tune_table(result: dict[str, Any]) -> str:
    """Markdown: every candidate, the recommended one in bold, sorted by measured speed-up."""
    target = []
    if result["target_speedup"] is not None:
        target.append(f"speed-up ≥ {result['target_speedup']:g}× at batch {result['batch_size']}")
    if result["target_flops"] is not None:
        target.append(f"rel. FLOPs ≤ {result['target_flops']:g}")
    timed = result["repeats"] > 0
    lines = [
        f"Target: {' and '.join(target)}. Accuracy on {result['images']} held-out training images; "
        + (f"speed on this machine ({result['device']}, batch {result['batch_size']}, {result['repeats']} round-robin rounds).\n"
           if timed else "speed not measured (--no-speed).\n"),
        "| candidate | top-1 % | ECE % | rel. FLOPs | predicted speed-up | measured speed-up (quartiles over rounds) | fraction of ideal | meets target | McNemar p vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(result["rows"].items(), key=lambda kv: (kv[1]["speedup"] or 0.0, kv[1].get("predicted_speedup") or 0.0, -kv[1]["rel_flops"]))
    for label, r in rows:
        name = f"**{label}** (recommended)" if label == result["recommended"] else label
        p = r["mcnemar_p_vs_baseline"]
        speedup = "–" if r["speedup"] is None else f"{r['speedup']:.3f}× ({r['speedup_q25']:.2f}–{r['speedup_q75']:.2f})"
        if r["speedup"] is None and r.get("predicted_speedup") is not None:
            speedup = "not timed (cannot meet the target)"
        predicted = "–" if r.get("predicted_speedup") is None else f"{r['predicted_speedup']:.3f}×"
        ideal = "–" if r["fraction_of_ideal"] is None else f"{r['fraction_of_ideal']:.2f}"
        verdict = ("yes" if r["meets"] else "no") + (f"; {SLOWER}: not recommended" if r.get("slower_than_baseline") else "")
        lines.append(f"| {name} | {r['top1_mean']:.2f} | {r['ece']:.2f} | {r['rel_flops']:.3f}× | {predicted} | {speedup} | "
                     f"{ideal} | {verdict} | {'–' if p is None else f'{p:.3g}'} |")
    if result["skipped"]:
        lines.append("\nNot applicable to this model: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()))
    if result.get("prediction_error") is not None:
        lines.append(f"\nLatency model: predicted speed-ups (block time against token count on this machine, the method's own "
                     f"bookkeeping left out) are off the measured ones by {100 * result['prediction_error']:.1f} % (median over the timed "
                     "candidates); candidates it rules out are not timed (`--time-all` times every one).")
    lines.append("\nFraction of ideal = measured speed-up × relative FLOPs (1 = the time saved is all the FLOPs saved). "
                 + (f"A candidate {SLOWER} at this batch size is never recommended. " if timed else "")
                 + "Wide quartiles mean a noisy machine: time again with more --repeats on an idle one. "
                 "Held-out accuracy ranks candidates; measure the chosen one on the test split: `vitbudget eval --config config.json`.")
    return "\n".join(lines) + "\n"


class NoCandidateMeetsTarget(VitbudgetError):
    """No candidate reached the target in the tuner's measurements."""


__all__ = ["Candidate", "NoCandidateMeetsTarget", "checkpoint_names", "content_digest", "default_candidates", "holdout_indices", "measure_speedups", "recommend", "tune",
           "tune_table", "tome_rs"]
