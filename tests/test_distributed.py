"""torchrun with 2 gloo processes on the CPU: training equals the single-process run with the same
global batch, a killed run resumes exactly, and evaluation equals the 1-process evaluation.

Tolerances: evaluation is exact (every batch holds the same images as in one process, results are
gathered back in order). Training matches to 1e-5 absolute on every weight after 5 AdamW steps
(observed 3e-6): DDP averages the two half-batch gradients, the single process sums the whole
batch at once, so float32 sums differ in their last bits, which AdamW's normalisation carries on.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from vitbudget import save_model
from vitbudget.cli import main
from vitbudget.distributed import Context, deal_batches, shard_steps
from vitbudget.models.loading import read_state_dict
from vitbudget.train import Trainer, get_recipe

pytestmark = pytest.mark.slow  # spawns gloo process groups: the whole module is outside the fast loop

TRAIN_ATOL = 1e-5
TRAIN = ["--recipe", "smoke", "--quiet", "--workers", "0", "--batch-size", "8", "--epochs", "1"]


def torchrun(*argv: str, nproc: int = 2, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`torchrun --standalone --nproc_per_node N -m vitbudget ...` (a free port; one thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "vitbudget", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_process(data: Path, out: Path, **changes) -> dict[str, torch.Tensor]:
    recipe = get_recipe("smoke", epochs=1, batch_size=8)
    recipe = recipe.replace(**changes) if changes else recipe
    result = Trainer(recipe, data, out, workers=0, progress=False).fit()
    return read_state_dict(result.model_path)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst:.2e} > {atol:.0e}"


def test_work_is_split_as_one_process_would_do_it():
    order = list(range(100, 124))  # 3 global batches of 8
    halves = [shard_steps(order, 8, Context(rank, 2)) for rank in range(2)]
    assert halves[0] == [100, 101, 102, 103, 108, 109, 110, 111, 116, 117, 118, 119]
    assert sorted(halves[0] + halves[1]) == order
    batches = [deal_batches(range(10), 4, Context(rank, 3)) for rank in range(3)]
    assert batches == [[(0, [0, 1, 2, 3])], [(1, [4, 5, 6, 7])], [(2, [8, 9])]]
    with pytest.raises(Exception, match="multiple of 3"):
        shard_steps(order, 8, Context(0, 3))


@pytest.mark.parametrize("extra, changes", [
    ([], {}),
    # A-ViT: its KL loss is a statistic of the whole batch (taken over both ranks), a frozen group,
    # and halting within the 2 blocks (gamma 1, beta 0)
    (["--method", "avit", "--distr-weight", "1", "--gamma", "1", "--beta", "0", "--freeze", "patch_embed"],
     dict(method="avit", method_options={"distr_weight": 1.0, "gamma": 1.0, "beta": 0.0}, freeze=["patch_embed"])),
    # ABS at alpha 0: its extra block is a trainable parameter no loss ever uses
    (["--method", "abs", "--alpha", "0"], dict(method="abs", method_options={"alpha": 0.0})),
], ids=["smoke", "avit-frozen-group", "abs-unused-block"])
def test_two_process_training_equals_one_process(tmp_path, image_folder, extra, changes):
    one = single_process(image_folder, tmp_path / "one", **changes)
    torchrun("train", *TRAIN, *extra, "--data", str(image_folder), "--out", str(tmp_path / "two"))
    two = read_state_dict(tmp_path / "two" / "model.safetensors")
    assert_same_weights(one, two, TRAIN_ATOL)
    start = initial_weights()
    assert any(not torch.equal(one[k], start[k]) for k in start), "training did not move the weights"
    assert json.loads((tmp_path / "two" / "model.json").read_text())["processes"] == 2


def initial_weights() -> dict[str, torch.Tensor]:
    """The smoke recipe's initial ViT (its seed fixes it)."""
    from vitbudget.models import ViTConfig, VisionTransformer

    torch.manual_seed(get_recipe("smoke").seed)
    return VisionTransformer(ViTConfig.from_dict(get_recipe("smoke").arch)).state_dict()


def test_killed_two_process_run_resumes_to_identical_weights(tmp_path, image_folder, capsys):
    # DynamicViT trains with Gumbel noise: exact resume needs each rank's random stream back
    args = [*TRAIN, "--epochs", "2", "--save-every", "1", "--method", "dynamicvit", "--stages", "1", "--data", str(image_folder)]
    torchrun("train", *args, "--out", str(tmp_path / "full"))
    proc = torchrun("train", *args, "--out", str(tmp_path / "killed"), wait=False)
    state = tmp_path / "killed" / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed_mid_run = proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # as a scheduler pre-empting the job: torchrun kills both ranks, then exits
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    assert torch.load(state, weights_only=True)["world_size"] == 2
    shutil.copytree(tmp_path / "killed", tmp_path / "one_process")
    torchrun("train", *args, "--out", str(tmp_path / "killed"))
    assert_same_weights(read_state_dict(tmp_path / "full" / "model.safetensors"), read_state_dict(tmp_path / "killed" / "model.safetensors"), 0.0)
    # one process cannot continue it: each rank's data slices and random stream are its own
    assert main(["train", *args, "--out", str(tmp_path / "one_process")]) == 1
    err = capsys.readouterr().err
    assert "vitbudget: error: " in err and "written by 2 process(es) and this run has 1" in err


def test_two_process_eval_and_bench_equal_one_process(tmp_path, image_folder, capsys):
    model = make_model()
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    ckpt = save_model(model, tmp_path / "tiny.safetensors")
    common = ["--model", str(ckpt), "--data", str(image_folder), "--quiet", "--workers", "0", "--batch-size", "16"]
    evaluate = ["eval", *common, "--method", "evit", "--stages", "1", "--method", "abs", "--no-speed"]
    with one_thread():  # as each torchrun process: the same arithmetic per batch
        assert main([*evaluate, "--out", str(tmp_path / "one")]) == 0
    torchrun(*evaluate, "--out", str(tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["methods"] == two["methods"] and two["processes"] == 2
    a, b = (np.load(tmp_path / d / "predictions.npz") for d in ("one", "two"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)

    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"entries": [{"label": "base", "method": "baseline"},
                                             {"label": "abs", "method": "abs", "options": {"alpha": 0.5}, "seeded": True}]}))
    bench = ["bench", "--suite", str(suite), *common, "--seeds", "2", "--no-speed"]
    with one_thread():
        assert main([*bench, "--out", str(tmp_path / "bench1")]) == 0
    torchrun(*bench, "--out", str(tmp_path / "bench2"))
    one, two = (json.loads((tmp_path / d / "bench.json").read_text()) for d in ("bench1", "bench2"))
    assert one["splits"] == two["splits"] and two["processes"] == 2
    assert one["splits"]["test"]["rows"]["abs"]["mcnemar_seed0"] is not None


def _ratio_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank r holds 2 + 3r rows ("kept tokens" vary per rank); the loss is their mean over all ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vitbudget.distributed import global_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 1))
    rows = RATIO_ROWS[sum(2 + 3 * r for r in range(rank)) : sum(2 + 3 * r for r in range(rank + 1))]
    total = model(rows).square().sum()
    loss = global_sum(total) / global_sum(torch.tensor(float(len(rows))))
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": model.module.weight.grad}, out)
    dist.destroy_process_group()


RATIO_ROWS = torch.arange(21.0).reshape(7, 3) / 10


def test_losses_over_the_global_batch_have_the_single_process_gradient(tmp_path):
    """A mean over items whose count differs per rank (A-ViT's halting distribution, DynamicViT's
    kept tokens) taken with `global_sum` gives exactly the one-process loss and gradient under DDP."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ratio_worker, args=(2, port, str(tmp_path / "rank0.pt")), nprocs=2)
    torch.manual_seed(0)
    single = torch.nn.Linear(3, 1)
    loss = single(RATIO_ROWS).square().sum() / len(RATIO_ROWS)
    loss.backward()
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    torch.testing.assert_close(got["loss"], loss.detach())
    torch.testing.assert_close(got["grad"], single.weight.grad)


DISTIL = dict(method="dynamicvit", method_options={"rho": 0.5, "stages": "1"}, epochs=1, batch_size=8)


def _distil_trainer(data: str, out: Path) -> Trainer:
    """The smoke ViT trained as DynamicViT with token distillation from a fixed other ViT."""
    from vitbudget.models import ViTConfig, VisionTransformer

    recipe = get_recipe("smoke").replace(**DISTIL)
    torch.manual_seed(1)
    teacher = VisionTransformer(ViTConfig.from_dict(recipe.arch))
    return Trainer(recipe, data, out, teacher=teacher, workers=0, progress=False)


def _distil_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed global batch of 8 and the patches each image keeps at stage 1 (-1 pads: 2 to 16 kept,
    so the ranks' halves hold different numbers of kept tokens)."""
    g = torch.Generator().manual_seed(0)
    images, targets = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10
    keep = torch.full((8, 16), -1)
    for i, n in enumerate([2, 3, 16, 5, 9, 12, 14, 7]):
        keep[i, :n] = torch.randperm(16, generator=g)[:n]
    return images, targets, keep


def _distil_step(trainer: Trainer, rows: slice) -> dict:
    """One training loss and backward on `rows` of the global batch (fixed kept patches instead of
    Gumbel samples): the logged loss parts and the gradients the optimiser would use."""
    images, targets, keep = _distil_batch()
    trainer.method.fixed_keep = [keep[rows]]
    with one_thread():
        total, parts = trainer.loss(images[rows], targets[rows])
        total.backward()
    trainer.method.fixed_keep = None
    return {"parts": parts, "grads": {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None}}


def _distil_worker(rank: int, world: int, port: int, data: str, tmp: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(tmp) / f"rank{rank}"  # each rank its own --out: rank 1's must stay empty
    step = _distil_step(_distil_trainer(data, out), slice(4 * rank, 4 * rank + 4))
    _distil_trainer(data, out).fit()  # a new DDP: the fixed masks leave the predictor unused, Gumbel sampling does not
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    if rank == 0:
        torch.save(step, Path(tmp) / "rank0.pt")
    dist.barrier()
    if rank == 1:
        assert written == [], f"rank 1 wrote {written}"
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_token_distillation_and_writes(tmp_path, image_folder):
    """DynamicViT's token distillation is a mean over the kept tokens of the whole global batch: under
    2 gloo ranks the logged loss parts and the DDP-averaged gradients equal one process's on the
    same batch (a loss scaled by the world size would double both). Only rank 0 writes: rank 1,
    given its own output directory, leaves it empty through checkpoints and the final model."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distil_worker, args=(2, port, str(image_folder), str(tmp_path)), nprocs=2)
    two = torch.load(tmp_path / "rank0.pt", weights_only=True)
    one = _distil_step(_distil_trainer(str(image_folder), tmp_path / "one"), slice(0, 8))
    assert one["parts"]["token_distill"] > 0 and one["parts"].keys() == two["parts"].keys()
    assert two["parts"] == pytest.approx(one["parts"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (tmp_path / "rank0" / "model.safetensors").is_file()
