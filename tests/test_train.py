"""Training: the smoke recipe learns, checkpoints are atomic, a killed run resumes to the same weights."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY
from vitbudget import CheckpointError, ConfigError, load_model
from vitbudget.train import Trainer, get_recipe
from vitbudget.train.optim import lr_at, param_groups

pytestmark = pytest.mark.slow  # training runs, subprocesses: the whole module is outside the fast loop

SMOKE = dict(train_limit=None, eval_limit=None, final_eval_limit=None, epochs=2, batch_size=8, save_every_steps=3)


def smoke(**overrides):
    return get_recipe("smoke", **{**SMOKE, **overrides})


def test_smoke_training_learns_and_writes_a_model(tmp_path, image_folder):
    result = Trainer(smoke(epochs=6), image_folder, tmp_path / "run", workers=0, progress=False).fit()
    model = load_model(result.model_path)
    assert model.info.classes[0] == "class00"
    assert result.log[-1]["train_loss"] < result.log[0]["train_loss"]
    assert result.metrics["top1"] > 30  # 10 colour-coded classes: chance is 10 %


def test_killed_run_resumes_to_identical_weights(tmp_path, image_folder):
    recipe = smoke()
    full = Trainer(recipe, image_folder, tmp_path / "full", workers=0, progress=False).fit()

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 7:  # after the checkpoint at step 6, before the one at step 9
            raise Killed

    with pytest.raises(Killed):
        Trainer(recipe, image_folder, tmp_path / "resumed", workers=0, progress=False).fit(on_step=kill_at)
    trainer = Trainer(recipe, image_folder, tmp_path / "resumed", workers=0, progress=False)
    assert trainer.try_resume() and trainer.step == 6
    resumed = Trainer(recipe, image_folder, tmp_path / "resumed", workers=0, progress=False).fit()
    a, b = load_model(full.model_path).state_dict(), load_model(resumed.model_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["train_loss"] for e in full.log] == [e["train_loss"] for e in resumed.log]


def test_resume_refuses_a_different_recipe(tmp_path, image_folder):
    Trainer(smoke(), image_folder, tmp_path / "r", workers=0, progress=False).fit(stop_at_step=3)
    with pytest.raises(CheckpointError, match="different recipe .*lr"):
        Trainer(smoke(lr=1e-4), image_folder, tmp_path / "r", workers=0, progress=False).fit()


def test_fine_tuning_groups_freeze_and_teacher(tmp_path, image_folder):
    first = Trainer(smoke(epochs=1), image_folder, tmp_path / "a", workers=0, progress=False).fit()
    student, teacher = load_model(first.model_path), load_model(first.model_path)
    frozen_before = student.patch_embed.proj.weight.detach().clone()
    recipe = smoke(epochs=1, freeze=["patch_embed"], lr_scales=[("head", 10.0)], distill_weight=0.5)
    trainer = Trainer(recipe, image_folder, tmp_path / "b", init=student, teacher=teacher, workers=0, progress=False)
    groups = trainer.optimizer.param_groups
    assert {g["lr_scale"] for g in groups} == {1.0, 10.0}
    trainer.fit()
    assert torch.equal(student.patch_embed.proj.weight, frozen_before)
    with pytest.raises(ConfigError, match="no teacher"):
        Trainer(recipe, image_folder, tmp_path / "c", init=load_model(first.model_path), workers=0, progress=False)


def test_schedule_and_weight_decay_groups():
    recipe = get_recipe("vit_tiny_p4_cifar10")
    spe, total = 390, 2340
    assert lr_at(0, total, spe, recipe) == pytest.approx(recipe.warmup_lr)
    assert lr_at(195, total, spe, recipe) == pytest.approx(recipe.lr)
    assert lr_at(total, total, spe, recipe) == pytest.approx(recipe.min_lr)
    from vitbudget.models import VisionTransformer, ViTConfig

    groups = param_groups(VisionTransformer(ViTConfig.from_dict(recipe.arch)), recipe)
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert all(p.ndim <= 1 or p.shape[:2] == (1, 1) or p.shape[1] == 65 for p in no_decay)  # biases, norms, tokens


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_identical_weights(tmp_path, image_folder):
    """A real `kill -9` mid-run: the same command again finishes with the uninterrupted weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def argv(out):
        return [sys.executable, "-m", "vitbudget", "train", "--recipe", "smoke", "--data", str(image_folder), "--out", str(out),
                "--quiet", "--workers", "0", "--batch-size", "8", "--epochs", "3", "--save-every", "1"]

    subprocess.run(argv(tmp_path / "full"), check=True, capture_output=True)
    proc = subprocess.Popen(argv(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "train_state.pt"
    deadline = time.time() + 60
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed_mid_run = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    subprocess.run(argv(tmp_path / "killed"), check=True, capture_output=True)
    a = load_model(tmp_path / "full" / "model.safetensors").state_dict()
    b = load_model(tmp_path / "killed" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def spot_recipe(**overrides):
    """spot_cifar10 shortened onto a 3-block toy: Gumbel-softmax masks draw from torch's RNG at every step."""
    return get_recipe("spot_cifar10", **{
        "arch": TINY.to_dict(), "method_options": {"rho": 0.7, "stages": "1,2"}, "train_limit": None, "eval_limit": 16,
        "final_eval_limit": 16, "epochs": 2, "batch_size": 8, "save_every_steps": 3, "distill_weight": 0.0, "warmup_epochs": 0.2,
        "lr": 1e-3, **overrides,
    })


def _killed_and_resumed(recipe, data, out, kill_step, workers):
    class Killed(Exception):
        pass

    def kill(step):
        if step == kill_step:
            raise Killed

    with pytest.raises(Killed):
        Trainer(recipe, data, out, workers=workers, progress=False).fit(on_step=kill)
    return Trainer(recipe, data, out, workers=workers, progress=False).fit()


@pytest.mark.slow
def test_stochastic_method_resumes_to_identical_weights_with_workers(tmp_path, image_folder, monkeypatch):
    """SPOT's Gumbel masks consume randomness every step and two loader processes decode: resume must still be exact,
    and it is the restored RNG state that makes it so (without it the weights differ)."""
    recipe = spot_recipe()
    full = Trainer(recipe, image_folder, tmp_path / "full", workers=2, progress=False).fit()
    resumed = _killed_and_resumed(recipe, image_folder, tmp_path / "resumed", kill_step=8, workers=2)  # last checkpoint: step 6
    a, b = load_model(full.model_path).state_dict(), load_model(resumed.model_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from vitbudget.methods.checkpoint import METHOD_PREFIX
    from vitbudget.models.loading import read_state_dict

    predictors = {k: v for k, v in read_state_dict(full.model_path).items() if k.startswith(METHOD_PREFIX)}
    assert predictors and all(torch.equal(v, read_state_dict(resumed.model_path)[k]) for k, v in predictors.items())
    assert [e["train_loss"] for e in full.log] == [e["train_loss"] for e in resumed.log]
    import vitbudget.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "restore_rng_state", lambda state: None)  # the mutation this test guards against
    broken = _killed_and_resumed(recipe, image_folder, tmp_path / "no_rng", kill_step=8, workers=2)
    c = load_model(broken.model_path).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_holds_the_cuda_rng_state_where_cuda_exists(tmp_path, image_folder, monkeypatch):
    """On a CUDA machine every device's RNG state is saved and restored (checked here with a stand-in CUDA)."""
    device_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [device_state.clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    trainer = Trainer(smoke(), image_folder, tmp_path / "r", workers=0, progress=False)
    trainer.fit(stop_at_step=3)
    state = torch.load(trainer.state_path, weights_only=True)
    assert torch.equal(state["torch_rng"], torch.get_rng_state()) and [torch.equal(s, device_state) for s in state["cuda_rng"]] == [True]
    assert Trainer(smoke(), image_folder, tmp_path / "r", workers=0, progress=False).try_resume()
    assert len(restored) == 1 and torch.equal(restored[0][0], device_state) and restored[0][1] == 0


def test_fine_tuning_labels_follow_the_init_models_class_names(tmp_path, image_folder):
    from conftest import make_model
    from vitbudget import DataError

    init = make_model()
    init.info.classes = [f"class{c:02d}" for c in range(10)][::-1]  # output 0 means class09
    trainer = Trainer(smoke(), image_folder, tmp_path / "a", init=init, workers=0, progress=False)
    assert trainer.train_set.targets[0] == 9 and trainer.test_set.targets[-1] == 0
    assert trainer.model.info.classes == init.info.classes  # the saved model keeps its meaning
    init.info.classes = [f"other{c}" for c in range(10)]
    with pytest.raises(DataError, match="not the model's classes"):
        Trainer(smoke(), image_folder, tmp_path / "b", init=init, workers=0, progress=False)


@pytest.mark.parametrize("recipe, scale", [("dynamicvit_cifar10", 100.0), ("spot_cifar10", 10.0)])
def test_predictors_really_step_at_the_recipes_lr_scale(recipe, scale):
    """After set_lr, the predictor groups' lr is scale x the base, and one AdamW step moves them by it:
    with a unit gradient the first step is lr / (1 + eps) per weight, on top of decoupled weight decay."""
    from conftest import make_model
    from vitbudget.methods import build_method
    from vitbudget.train.optim import make_optimizer, set_lr

    r = get_recipe(recipe)
    method = build_method(r.method, make_model(), **{**r.method_options, "stages": "1"}).train()
    optimizer = make_optimizer(method, r)
    set_lr(optimizer, 1e-3)
    params = {name: p for name, p in method.named_parameters() if p.requires_grad}
    assert {name for name in params if "predictors" in name} and {name for name in params if "predictors" not in name}
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    before = {name: p.detach().clone() for name, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for name, p in params.items():
        lr = 1e-3 * (scale if "predictors" in name else 1.0)
        assert lr_of[id(p)] == pytest.approx(lr)
        expected = before[name] * (1 - lr * decay_of[id(p)]) - lr / (1 + 1e-8)
        assert torch.allclose(p.detach(), expected, atol=1e-7, rtol=0), name
