"""Bad input that used to crash or hang: each run ends in one `vitbudget: error: ...` line and writes nothing.

Hugging Face directories are written here without transformers (the hub's tensor names, tiny
shapes), so these tests need neither the extra nor the 88 MB reference model.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model, requires_corruptions
from test_cli import run_cli
from vitbudget import ConfigError, DataError, distributed, load_model, save_model
from vitbudget.data import ImageFolder

EVAL = ["--no-speed", "--quiet", "--workers", "0"]


def one_error_line(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitbudget: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def write_hf_dinov2(path: Path, *, depth: int = 1, width: int = 8, patch: int = 4, img: int = 8, config: dict | None = None,
                    processor: dict | None = None, weights: tuple[int, int] | None = None) -> Path:
    """A `save_pretrained`-style Dinov2Model directory; `config` entries set to None are removed;
    `weights` = (depth, width) writes tensors of another shape than the config says."""
    path.mkdir(parents=True)
    hf = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": width, "num_hidden_layers": depth,
          "num_attention_heads": 2, "mlp_ratio": 4, "image_size": img, "patch_size": patch, "layer_norm_eps": 1e-6, **(config or {})}
    (path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    depth, width = weights or (depth, width)
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"embeddings.cls_token": t(1, 1, width), "embeddings.mask_token": t(1, width),
             "embeddings.position_embeddings": t(1, (img // patch) ** 2 + 1, width),
             "embeddings.patch_embeddings.projection.weight": t(width, 3, patch, patch),
             "embeddings.patch_embeddings.projection.bias": t(width), "layernorm.weight": t(width), "layernorm.bias": t(width)}
    for i in range(depth):
        layer = f"encoder.layer.{i}."
        for name, shape in [("norm1", (width,)), ("norm2", (width,)), ("attention.attention.query", (width, width)),
                            ("attention.attention.key", (width, width)), ("attention.attention.value", (width, width)),
                            ("attention.output.dense", (width, width)), ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))]:
            state[layer + name + ".weight"], state[layer + name + ".bias"] = t(*shape), t(shape[0])
        state[layer + "layer_scale1.lambda1"], state[layer + "layer_scale2.lambda1"] = t(width), t(width)
    save_file(state, str(path / "model.safetensors"))
    return path


def test_fake_hf_directory_loads(tmp_path):
    """The fixture is a valid directory, so the failures below are the bad fields' doing; accepted variants."""
    assert load_model(write_hf_dinov2(tmp_path / "ok")).cfg.depth == 1
    model = load_model(write_hf_dinov2(tmp_path / "variants", processor={"image_mean": 0.5, "size": [8, 8]}))
    assert model.info.preprocess.mean == (0.5, 0.5, 0.5) and model.info.preprocess.resize == "squash"  # as transformers reads them


@pytest.mark.parametrize("config, processor, message", [
    ({"hidden_size": None}, None, "Dinov2Model config lacks 'hidden_size'"),
    ({"mlp_ratio": None}, None, "Dinov2Model config lacks 'intermediate_size'"),
    ({"hidden_size": 0, "mlp_ratio": None, "intermediate_size": 32}, None, "hidden_size must be an integer >= 1, got 0"),
    ({"num_hidden_layers": "12"}, None, "num_hidden_layers must be an integer >= 1, got '12'"),
    ({"hidden_act": ["gelu"]}, None, r"activation \['gelu'\] is not supported"),
    (None, {"image_mean": "0.5"}, "image_mean must be a number or one number per channel, got '0.5'"),
    (None, {"image_std": [0.5, "x", 0.5]}, "image_std entry must be a finite number, got 'x'"),
    (None, {"size": -3}, "size shortest_edge must be an integer >= 1, got -3"),
    (None, {"size": [8, 8, 8]}, r"size must be an integer, \[height, width\] or a dict"),
    (None, {"size": {"height": -8, "width": -8}}, "size must be an integer >= 1, got -8"),
    (None, {"size": 8, "do_center_crop": True, "crop_size": "big"}, "crop_size must be an integer"),
    (None, {"rescale_factor": "1/255"}, "rescale_factor must be a finite number, got '1/255'"),
    (None, {"resample": [3]}, "resample must be a PIL resampling number or a name"),
    (None, {"size": {"height": 10, "width": 10}}, r"image processor input size 10 is not a positive multiple of patch size 4 \(nearest: 8 or 12\)"),
], ids=["no-hidden-size", "no-intermediate-size", "hidden-size-0", "layers-a-string", "activation-a-list", "mean-a-string",
        "std-entry-a-string", "size-negative", "size-list-of-3", "size-dict-negative", "crop-a-string", "rescale-a-string",
        "resample-a-list", "size-not-a-patch-multiple"])
def test_bad_hugging_face_directory_one_line(tmp_path, capsys, image_folder, config, processor, message):
    model = write_hf_dinov2(tmp_path / "hf", config=config, processor=processor)
    code, _, err = run_cli(capsys, "eval", "--model", str(model), "--data", str(image_folder), "--out", str(tmp_path / "out"), *EVAL)
    assert code == 1 and not (tmp_path / "out").exists()
    one_error_line(err, message)


# -- weights that do not match their config, input sizes the position embeddings cannot take -----
def classifier_checkpoint(tmp_path: Path, keep=lambda key: True, **config) -> Path:
    """Our safetensors + sidecar of the tiny classifier, tensors filtered by `keep`, sidecar config changed by `config`."""
    path = save_model(make_model(), tmp_path / "tiny.safetensors")
    save_file({k: v for k, v in load_file(str(path)).items() if keep(k)}, str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "config": {**meta["config"], **config}}))
    return path


@pytest.mark.parametrize("case, message", [
    ("hf-12-layer-weights", r"'.*hf' \(Dinov2Model\) does not match the architecture: the weights hold 2 blocks of width 16, the config 1 blocks of width 8;"),
    ("head-only", "does not match the architecture: the weights hold no ViT backbone .*; missing 42 keys"),
    ("config-differs", "does not match the architecture: the weights hold 3 blocks of width 32, the config 5 blocks of width 64;"),
])
def test_weights_that_do_not_match_their_config_one_line(tmp_path, capsys, image_folder, case, message):
    model = {"hf-12-layer-weights": lambda: write_hf_dinov2(tmp_path / "hf", weights=(2, 16)),
             "head-only": lambda: classifier_checkpoint(tmp_path, keep=lambda key: key.startswith("head.")),
             "config-differs": lambda: classifier_checkpoint(tmp_path, depth=5, embed_dim=64)}[case]()
    code, _, err = run_cli(capsys, "eval", "--model", str(model), "--data", str(image_folder), "--out", str(tmp_path / "out"), *EVAL)
    assert code == 1 and not (tmp_path / "out").exists()
    one_error_line(err, message)


def test_input_size_the_position_embeddings_cannot_take(tmp_path, capsys, image_folder):
    model = write_hf_dinov2(tmp_path / "hf", patch=14, img=28)  # the reference's patch size
    code, _, err = run_cli(capsys, "train", "--recipe", "finetune", "--init", str(model), "--img-size", "100", "--data", str(image_folder),
                           "--out", str(tmp_path / "out"), "--quiet", "--workers", "0")
    assert code == 1 and not (tmp_path / "out").exists()
    one_error_line(err, r"input size 100 is not a positive multiple of patch size 14 \(nearest: 98 or 112\)")
    for size in (0, -14, 7):  # 0 was silently ignored, -14 crashed in the resampling
        with pytest.raises(ConfigError, match=f"input size {size} is not a positive multiple of patch size 14"):
            load_model(str(model), img_size=size)


# -- data folders ---------------------------------------------------------------------------------
@contextlib.contextmanager
def fails_within(seconds: int):
    """A hang (the bug this guards against) fails the test instead of blocking the suite."""
    def hung(signum, frame):
        pytest.fail(f"still running after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def small_folder(root: Path, src: Path) -> Path:
    for class_dir in sorted((src / "test").iterdir())[:2]:
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:2]:
            (root / class_dir.name / image.name).write_bytes(image.read_bytes())
    return root


@pytest.mark.parametrize("kind", ["fifo", "broken-link"])
@pytest.mark.slow
def test_non_regular_file_in_a_data_folder_is_refused(tmp_path, capsys, image_folder, kind):
    data = small_folder(tmp_path / "data" / "test", image_folder)
    odd = data / "class01" / "9.png"
    os.mkfifo(odd) if kind == "fifo" else odd.symlink_to(tmp_path / "nowhere.png")
    message = "is not a regular file" if kind == "fifo" else "is a broken symbolic link"
    with pytest.raises(DataError, match=f"{re.escape(str(odd))}' {message}"):
        ImageFolder(data.parent, "test")
    with fails_within(60):
        code, _, err = run_cli(capsys, "eval", "--data", str(data.parent), "--out", str(tmp_path / "out"), *EVAL)
    assert code == 1 and not (tmp_path / "out").exists()
    one_error_line(err, message)


def test_image_folder_order_unchanged(tmp_path, image_folder):
    """The listing walks folders itself now: same order as sorted(os.walk) with sorted names, nested folders included."""
    root = small_folder(tmp_path / "data" / "test", image_folder)
    for sub in ("class00/b", "class00/a/deep", "class00/a-b", "class01/z"):
        small_folder(root / sub, image_folder)
    expected = [os.path.join(d, f) for d, _, names in sorted(os.walk(root)) for f in sorted(names)]
    assert [path for path, _ in ImageFolder(root.parent, "test").samples] == expected and len(expected) == 20


# -- vitbudget corrupt ----------------------------------------------------------------------------
def screen(text: str) -> list[str]:
    """The lines a terminal shows after `text` (carriage returns, newlines, cursor-up): progress bars included."""
    rows, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[A|\r|\n|[^\r\n\x1b]", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            rows += [[] for _ in range(row + 1 - len(rows))]
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        else:
            rows[row] += [" "] * (col + 1 - len(rows[row]))
            rows[row][col] = token
            col += 1
    return [line for line in ("".join(r).strip() for r in rows) if line]


def test_corrupt_garbled_archive_one_line(tmp_path, capsys):
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "corrupt", "--data", str(archive), "--out", str(tmp_path / "out"), "--corruptions", "fog")
    assert code == 1 and not (tmp_path / "out").exists()
    one_error_line(err, r"cannot unpack .*data.tar.gz': it is damaged or not a .tar / .tar.gz archive")


@requires_corruptions
@pytest.mark.slow
def test_corrupt_unreadable_image_one_line(tmp_path, capsys, image_folder):
    data = small_folder(tmp_path / "data" / "test", image_folder)
    (data / "class01" / "9.png").write_bytes(b"not an image")
    code, _, err = run_cli(capsys, "corrupt", "--data", str(data.parent), "--out", str(tmp_path / "out"), "--corruptions", "fog,snow")
    assert code == 1 and not (tmp_path / "out").exists()  # not even the empty folder
    lines = screen(err)
    assert len(lines) == 1, lines  # the progress bars are gone too
    one_error_line(lines[0], "cannot read image .*9.png'")


# -- torchrun: one line per run, not one per rank ---------------------------------------------------
@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank 1 of 2 under torchrun, with the agent's store served here."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "FAILURE_WAIT_S", 0.3)
    return store


def test_rank_reports_only_a_failure_rank_0_does_not_share(torchrun_env, capsys, monkeypatch):
    assert distributed.reports_failure()  # rank 0 did not fail: this rank's own error, it says it
    assert not distributed.broken_by_peer(RuntimeError("Connection closed by peer"))
    torchrun_env.set("vitbudget/failed/0/0", "1")
    assert not distributed.reports_failure()  # rank 0 failed too: the same bad input, reported there
    assert distributed.broken_by_peer(RuntimeError("Connection closed by peer"))
    assert not distributed.broken_by_peer(ValueError("a bug"))
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "eval", "--batch-size", "0")
    assert exit_.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        run_cli(capsys, "eval", "--batch-size", "0")
    one_error_line(capsys.readouterr().err, "argument --batch-size: expected a positive integer, got '0'")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (["--data", "{tmp}/missing"], "dataset .*missing' not found"),
])
def test_two_rank_run_one_line(tmp_path, image_folder, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitbudget", "eval",
           "--data", str(image_folder), *args, "--out", str(tmp_path / "out"), *EVAL]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    ours = [line for line in done.stderr.splitlines() if line.startswith(("vitbudget:", "[rank"))]  # torchrun's own summary follows
    one_error_line("\n".join(ours), message)


# -- other paths found while here ---------------------------------------------------------------------
@pytest.mark.parametrize("entry", [5, {"name": "evit"}, {"name": "evit", "options": 3}], ids=["a-number", "no-options", "options-a-number"])
def test_sidecar_method_entry(tmp_path, capsys, image_folder, entry):
    path = save_model(make_model(), tmp_path / "tiny.safetensors", method=entry)
    code, _, err = run_cli(capsys, "eval", "--model", str(path), "--data", str(image_folder), "--out", str(tmp_path / "out"), *EVAL)
    if entry == {"name": "evit"}:  # options may be left out
        assert code == 0
        return
    assert code == 1 and not (tmp_path / "out").exists()
    one_error_line(err, r"""sidecar .*tiny.json': 'method' must be \{"name": NAME, "options": \{...\}\}, got""")


def test_garbage_training_state_one_line(tmp_path, capsys, image_folder):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_state.pt").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "train", "--recipe", "smoke", "--data", str(image_folder), "--out", str(tmp_path / "run"), "--quiet", "--workers", "0")
    assert code == 1 and sorted(os.listdir(tmp_path / "run")) == ["train_state.pt"] and "Traceback" not in err
    one_error_line(err.splitlines()[-1], r"cannot resume from .*train_state.pt': it is damaged or not a training state \(UnpicklingError\); delete it to start over")
