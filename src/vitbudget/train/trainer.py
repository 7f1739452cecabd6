"""The training loop: deterministic data order, periodic atomic checkpoints, exact resume.

Under torchrun the same loop runs data-parallel (DDP): every global batch is split into one
slice per rank, gradients are averaged, and only rank 0 writes checkpoints and logs; the
result is the single-process one up to float summation order (see `vitbudget.distributed`).
"""
from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import distributed
from ..data import EvalTransform, ImageFolder, PadCropFlip, epoch_order, iterate, make_loader, resolve_split_dir, subset_indices
from ..data.stats import STATS_SAMPLE, channel_mean_std, conversion_notes
from ..devices import autocast, resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from ..eval.evaluate import predict
from ..runtime.cost import dense_macs
from ..io import atomic_path, check_output_dir
from ..methods import build_method
from ..methods.base import run_teacher
from ..methods.checkpoint import save_method
from ..models import Preprocess, VisionTransformer, ViTConfig
from .losses import classification_loss, distillation_loss
from .optim import lr_at, make_optimizer, set_lr
from .recipes import Recipe

STATE_FILE = "train_state.pt"
EVAL_SPLITS = ("test", "val", "validation")


def default_eval_split(data: str | os.PathLike) -> str:
    """The held-out split to evaluate on: test/, else val/ or validation/."""
    for split in EVAL_SPLITS:
        try:
            resolve_split_dir(data, split)
            return split
        except DataError:
            continue
    raise DataError(f"no held-out split in {str(data)!r}: expected {'/, '.join(EVAL_SPLITS)}/ beside train/")
MODEL_FILE = "model.safetensors"


@dataclass
class TrainResult:
    model_path: Path
    metrics: dict[str, float]
    log: list[dict[str, Any]]


class TrainStep(nn.Module):
    """The method and its losses as one module: DDP then sees exactly the parameters the loss used,
    whatever the method adds (predictors, extra blocks) or leaves unused in a step."""

    def __init__(self, method: nn.Module, teacher: nn.Module | None, recipe: Recipe):
        super().__init__()
        self.method = method
        self.recipe = recipe
        self._teacher = [teacher]  # not a submodule: frozen, and no business of DDP

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.method(images)
        parts = {"ce": classification_loss(out.logits, targets, self.recipe.label_smoothing)}
        teacher = None
        if self._teacher[0] is not None:
            with torch.no_grad():
                teacher = run_teacher(self._teacher[0], images)
            if self.recipe.distill_weight:
                parts["distill"] = self.recipe.distill_weight * distillation_loss(out.logits, teacher.logits)
        parts.update(self.method.extra_losses(out, targets, teacher))
        return sum(parts.values()), parts


class Trainer:
    """Train (or fine-tune) a ViT, or a method around one, on an ImageFolder dataset.

    Everything random is a function of the recipe's seed: model init, the order of each epoch
    and each sample's augmentation. A run killed at any point resumes from its last
    checkpoint and ends with the same weights as a run that was never interrupted.

    Launched by torchrun (`distributed.session` joined), it trains with DDP: rank r takes its
    slice of every global batch of `recipe.batch_size`, so the global batch and the learning
    rate schedule stay the recipe's; rank 0 alone writes.
    """

    def __init__(
        self, recipe: Recipe, data: str | os.PathLike, out_dir: str | os.PathLike, *, init: VisionTransformer | None = None,
        teacher: nn.Module | None = None, device: str = "cpu", workers: int | None = None, progress: bool = True,
        eval_split: str | None = None,
    ):
        self.out_dir = check_output_dir(out_dir)  # created by the first checkpoint, so a run that fails to start leaves nothing
        self.device = resolve_device(device)
        self.workers = workers
        self.dist = distributed.context()
        self.local_batch = distributed.local_batch_size(recipe.batch_size, self.dist)
        self.progress = progress and self.dist.main
        self.notes: list[str] = []  # one line per decision the data forced (normalisation, new head, conversions)
        torch.manual_seed(recipe.seed)
        with distributed.local_main_first():  # one process per machine unpacks an archive
            self.train_set = ImageFolder(data, "train")
        classes = self.train_set.classes
        if init is None:
            if not recipe.arch:
                raise ConfigError(f"recipe {recipe.name!r} fine-tunes a checkpoint: pass --init CKPT")
            if recipe.mean is None:  # never another data set's: this one's own statistics
                mean, std = channel_mean_std(self.train_set, recipe.arch["img_size"], progress=self.progress)
                recipe = recipe.replace(mean=mean, std=std)
                source = f"computed from {min(STATS_SAMPLE, len(self.train_set))} of {len(self.train_set)} training images"
            else:
                source = f"recipe {recipe.name!r}"
            model = VisionTransformer(ViTConfig.from_dict(recipe.arch))
            model.info.preprocess = Preprocess(mean=recipe.mean, std=recipe.std)
        else:
            model = init
            source = "the --init checkpoint"
            if recipe.new_head and model.cfg.num_classes != len(classes):
                have = f"{model.cfg.num_classes} outputs" if model.cfg.num_classes else "no head (a feature extractor)"
                self.notes.append(f"note: new head: the checkpoint has {have}, the data {len(classes)} classes: a freshly initialised head is trained")
                model.reset_classifier(len(classes))
                model.info.classes = None  # the new head's classes are the data's folders
                recipe = recipe.replace(arch=model.cfg.to_dict())
        self.recipe = recipe
        pre = model.info.preprocess
        self.notes.append(f"normalisation: mean {tuple(round(v, 4) for v in pre.mean)}, std {tuple(round(v, 4) for v in pre.std)} ({source})")
        model.info.name = recipe.name
        model.info.extra["normalization"] = {"mean": list(pre.mean), "std": list(pre.std), "source": source}
        self.model = model
        size = model.cfg.img_size
        self.train_set.transform = {
            "pad_crop_flip": PadCropFlip(size, pre, padding=max(1, size // 8)), "flip": PadCropFlip(size, pre, padding=0),
            "none": EvalTransform(size, pre),
        }[recipe.augment]
        names = model.info.classes  # fine-tuning a model that names its classes: labels follow those names
        if names is not None:
            self.train_set = ImageFolder(data, "train", self.train_set.transform, label_names=names)
        else:  # a new model (or a new head): its classes are the training folders, and the saved model names them
            if len(classes) != model.cfg.num_classes:
                raise ConfigError(f"the data has {len(classes)} classes but the model has {model.cfg.num_classes} outputs"
                                  + ("" if recipe.new_head else " (the generic `finetune` recipe trains a new head)"))
            names = model.info.classes = classes
        self.eval_split = eval_split or default_eval_split(data)
        self.test_set = ImageFolder(data, self.eval_split, EvalTransform(size, pre), label_names=names)
        self.notes += conversion_notes(self.train_set, size, pre, "training images") + conversion_notes(self.test_set, size, pre, f"{self.eval_split} images")
        model.info.extra["data_notes"] = self.notes
        self.method = build_method(recipe.method, model, **recipe.method_options).to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        teacher_classes = getattr(getattr(self.teacher, "cfg", None), "num_classes", model.cfg.num_classes)
        if teacher_classes != model.cfg.num_classes:
            raise ConfigError(f"the teacher has {teacher_classes} outputs, the model {model.cfg.num_classes}: distillation needs the same classes")
        if recipe.distill_weight and self.teacher is None:
            raise ConfigError("the recipe sets distill_weight but no teacher model was given")
        self.optimizer = make_optimizer(self.method, recipe)  # freezes parameters: before DDP looks at them
        self.autocast = lambda: autocast(self.device, recipe.dtype)  # checks now: fp16 on a CPU is a ConfigError
        self.autocast()
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.dtype == "fp16")
        self.train_step = TrainStep(self.method, self.teacher, recipe)
        self.step_fn: nn.Module = self.train_step
        if self.dist.world > 1:
            # static_graph: DDP learns in the first step which parameters the loss uses (a method may
            # leave some out, e.g. ABS's extra block at alpha 0) and expects the same set every step,
            # as every built-in method's training path has; buffers are alike on every rank (or summed
            # over ranks by the method), so they are not re-broadcast each step
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_fn = DistributedDataParallel(self.train_step, device_ids=ids, static_graph=True, forward_sync_buffers=False)
            if self.dist.rank:  # the model is initialised alike; noise (dropout, Gumbel) differs per rank
                torch.manual_seed(distributed.rank_seed(recipe.seed, self.dist))
        self.train_indices = subset_indices(len(self.train_set), recipe.train_limit)  # the same images at every seed: see subset_indices
        self.steps_per_epoch = len(self.train_indices) // recipe.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch size {recipe.batch_size} exceeds the {len(self.train_indices)} training images")
        self.total_steps = math.ceil(recipe.epochs * self.steps_per_epoch)
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.elapsed = 0.0

    # -- checkpoints --
    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def save_state(self) -> None:
        rank_rng = distributed.all_gather(distributed.rng_states()) if self.dist.world > 1 else None
        if not self.dist.main:
            return
        state = {
            "step": self.step, "recipe": self.recipe.to_dict(), "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(), **rng_state(), "log": self.log, "elapsed": self.elapsed,
            "world_size": self.dist.world, "scaler": self.scaler.state_dict(),
        }
        if rank_rng is not None:
            state["rank_rng"] = rank_rng
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def try_resume(self) -> bool:
        state = distributed.broadcast(self._read_state() if self.dist.main else None)  # rank 0 reads: no shared disk needed
        if state is None:
            return False
        if isinstance(state, str):
            raise CheckpointError(state)
        if state.get("world_size", 1) != self.dist.world:
            raise CheckpointError(
                f"{str(self.state_path)!r} was written by {state.get('world_size', 1)} process(es) and this run has {self.dist.world}; "
                f"resume with {state.get('world_size', 1)} in total (torchrun --nnodes A --nproc_per_node B with A x B = {state.get('world_size', 1)}; "
                "no torchrun for 1): each rank's data slices and random stream are its own")
        saved = Recipe.from_dict(state["recipe"]).to_dict()  # fields added since it was written take their defaults
        if saved != self.recipe.to_dict():
            changed = sorted(k for k in saved if saved[k] != self.recipe.to_dict().get(k))
            raise CheckpointError(f"{str(self.state_path)!r} was written by a different recipe (differs in {', '.join(changed)}); use another --out or delete it")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state)
        if "rank_rng" in state:
            distributed.set_rng_states(state["rank_rng"][self.dist.rank])
        self.step, self.log, self.elapsed = state["step"], state["log"], state["elapsed"]
        return True

    def _read_state(self) -> dict | str | None:
        """The checkpoint, None when there is none, or the error message when it cannot be read."""
        if not self.state_path.is_file():
            return None
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # torch's unpickling errors run to many lines
            detail = type(exc).__name__ if isinstance(exc, pickle.UnpicklingError) or not first else first
            return f"cannot resume from {str(self.state_path)!r}: it is damaged or not a training state ({detail}); delete it to start over"

    # -- loop --
    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's loss (the local batch's); the logged parts are averaged over ranks, i.e. the global batch's."""
        total, parts = self.step_fn(images, targets)
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at step {self.step}: { {k: float(v) for k, v in parts.items()} }")
        return total, distributed.mean_over_ranks({k: float(v.detach()) for k, v in parts.items()})

    def evaluate(self, limit: int | None) -> dict[str, float]:
        indices = subset_indices(len(self.test_set), limit)
        pred = predict(self.method, self.test_set, indices, batch_size=256, workers=self.workers, device=self.device, progress=False,
                       dtype=self.recipe.dtype)
        self.method.train()
        return {**pred.summary(dense_macs(self.method.base_cfg)), "eval_images": len(indices)}

    def fit(self, stop_at_step: int | None = None, on_step: Callable[[int], None] | None = None) -> TrainResult | None:
        """Train to the end (or to `stop_at_step`, for tests), checkpointing as it goes."""
        recipe = self.recipe
        self.try_resume()
        self.method.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {recipe.name}", unit="step", disable=not self.progress)
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.train_set.set_epoch(epoch, recipe.seed)
            order = epoch_order(self.train_indices, recipe.seed, epoch)[: self.steps_per_epoch * recipe.batch_size]
            local = distributed.shard_steps(order[start * recipe.batch_size :], recipe.batch_size, self.dist)
            loader = make_loader(self.train_set, local, self.local_batch, self.workers, drop_last=True)
            tick = time.perf_counter()
            for images, targets in iterate(loader):
                images, targets = images.to(self.device), targets.to(self.device)
                set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.steps_per_epoch, recipe))
                with self.autocast():
                    loss, parts = self.loss(images, targets)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if recipe.clip_grad:
                    self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16)
                    nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], recipe.clip_grad)
                self.scaler.step(self.optimizer)  # skips a step whose fp16 gradients overflowed
                self.scaler.update()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                epoch_done = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if epoch_done:
                    self.elapsed += time.perf_counter() - tick
                    tick = time.perf_counter()
                    self.log.append({"epoch": epoch, "step": self.step, "train_loss": parts["ce"], **self.evaluate(recipe.eval_limit), "seconds": round(self.elapsed, 1)})
                    if self.dist.main:
                        bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.log[-1].items() if isinstance(v, float)))
                if epoch_done or self.step % recipe.save_every_steps == 0:
                    self.elapsed += time.perf_counter() - tick
                    tick = time.perf_counter()
                    self.save_state()
                if on_step is not None:
                    on_step(self.step)
                if stop_at_step is not None and self.step >= stop_at_step:
                    bar.close()
                    return None
                if self.step >= self.total_steps:
                    break
        bar.close()
        metrics = self.evaluate(recipe.final_eval_limit)
        path = self.out_dir / MODEL_FILE
        if self.dist.main:
            save_method(self.method, path, recipe=recipe.to_dict(), log=self.log, metrics=metrics, train_seconds=round(self.elapsed, 1),
                        processes=self.dist.world)
        distributed.barrier()  # the model exists before any rank reports it
        return TrainResult(path, metrics, self.log)


def rng_state() -> dict[str, Any]:
    """The torch RNG streams training draws from (dropout, DropPath, Gumbel noise): CPU, and every CUDA device.

    Data order and augmentation need none: they are functions of (seed, epoch, index).
    """
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `rng_state`; CUDA streams are restored where this machine has those devices (training on the CPU draws none)."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        for index, device_state in enumerate(state["cuda_rng"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
