"""Defaults that work without the project's shared/ folder: CIFAR-10 from its official source
(served here by a local HTTP server on 127.0.0.1, never the internet) and models named by a
Hugging Face hub id, read from a pre-populated cache with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vitbudget.cli import main
from vitbudget.data import ImageFolder
from vitbudget.data import download as dl
from vitbudget.errors import CheckpointError, DataError
from vitbudget.models import VisionTransformer, load_model, named_config, save_model

from conftest import TINY, anchor, importable, requires_transformers

requires_hub = anchor("huggingface_hub", lambda: importable("huggingface_hub"), "pip install huggingface_hub")


def fake_cifar_archive(path: Path, per_batch: int = 10) -> tuple[str, dict[str, np.ndarray]]:
    """A cifar-10-python.tar.gz with the official layout and tiny batches; returns its MD5 and the pixels."""
    rng = np.random.default_rng(0)
    pixels = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [*dl.BATCHES["train"], *dl.BATCHES["test"]]:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            pixels[name] = data
            blob = pickle.dumps({b"data": data, b"labels": [i % 10 for i in range(per_batch)]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest(), pixels


@pytest.fixture
def served(tmp_path):
    """(url, md5, pixels) of a fake archive on a local HTTP server that counts its requests."""
    root = tmp_path / "www"
    root.mkdir()
    md5, pixels = fake_cifar_archive(root / "cifar-10-python.tar.gz")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", md5, pixels, hits
    finally:
        server.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITBUDGET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def use_source(monkeypatch, url: str, md5: str) -> None:
    source = dl.Source("cifar10", url, md5, dl.CIFAR10.classes)
    monkeypatch.setitem(dl.SOURCES, "cifar10", source)


def test_cifar10_downloaded_checked_and_converted(served, cache, monkeypatch):
    url, md5, pixels, hits = served
    use_source(monkeypatch, url, md5)
    train = ImageFolder("cifar10", "train")
    test = ImageFolder("cifar10", "test")
    assert (len(train), len(test)) == (50, 10)
    assert train.classes == sorted(dl.CIFAR10.classes) and [label for _, label in test.samples] == list(range(10))
    # pixels survive exactly (PNG is lossless), in the official CHW -> HWC order, under the official class names
    path, label = test.samples[0]
    assert Path(path).parent.name == dl.CIFAR10.classes[0] == test.classes[label]
    assert np.array_equal(np.asarray(Image.open(path)), pixels["test_batch"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    requests = len(hits)
    ImageFolder("cifar10", "test")  # cached: no second download
    assert len(hits) == requests == 1


def test_cifar10_checksum_mismatch_keeps_nothing(served, cache, monkeypatch):
    url, _, _, _ = served
    use_source(monkeypatch, url, "0" * 32)
    with pytest.raises(DataError, match="MD5"):
        ImageFolder("cifar10", "test")
    assert not any((cache / "downloads").iterdir()) and not (cache / "datasets").exists()


def test_cifar10_unreachable_is_one_error_line(cache, monkeypatch, capsys, tmp_path):
    use_source(monkeypatch, "http://127.0.0.1:9/cifar-10-python.tar.gz", dl.CIFAR10.md5)  # port 9: nothing listens
    code = main(["eval", "--data", "cifar10", "--model", str(tmp_path / "missing.safetensors"), "--no-speed", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("vitbudget: error:")


def test_default_data_outside_repository_is_cifar10(served, cache, monkeypatch, tmp_path, capsys):
    """No shared/ folder: `eval` with no --data evaluates on CIFAR-10 fetched into the cache."""
    url, md5, _, _ = served
    use_source(monkeypatch, url, md5)
    monkeypatch.setattr("vitbudget.defaults.shared_dir", lambda: None)
    vit = VisionTransformer(TINY)
    vit.info.classes = list(dl.CIFAR10.classes)
    save_model(vit, tmp_path / "m.safetensors")
    code = main(["eval", "--model", str(tmp_path / "m.safetensors"), "--no-speed", "--quiet", "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "downloaded once into the cache" in captured.err
    assert json.loads((tmp_path / "o/results.json").read_text())["data"]["path"] == "cifar10"


def populate_hub_cache(hub: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    revision = "0" * 40
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, blob in files.items():
        (snapshot / name).write_bytes(blob)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@requires_hub
@requires_transformers
@pytest.mark.slow
def test_hub_id_loads_a_transformers_model_offline(offline_hub, tmp_path):
    from test_hf import CASES, build_hf

    architecture, config, _ = CASES["dinov2-classifier"]
    directory = tmp_path / "hfvit"
    build_hf(architecture, config()).save_pretrained(directory)
    populate_hub_cache(offline_hub, "org/tiny-vit", {p.name: p.read_bytes() for p in directory.iterdir()})
    from_hub = load_model("hf-hub:org/tiny-vit")
    local = load_model(directory)
    x = torch.randn(2, 3, local.cfg.img_size, local.cfg.img_size)
    assert torch.equal(from_hub(x), local(x))


@requires_hub
@pytest.mark.slow
def test_hub_id_loads_a_timm_model_offline(offline_hub, tmp_path):
    cfg = named_config("deit_tiny_patch16_224", num_classes=7)
    vit = VisionTransformer(cfg).eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    config = json.dumps({"architecture": "deit_tiny_patch16_224.fb_in1k", "num_classes": 7}).encode()
    populate_hub_cache(offline_hub, "timm/deit_tiny_patch16_224.fb_in1k", {"config.json": config, "model.safetensors": weights.read_bytes()})
    loaded = load_model("hf-hub:timm/deit_tiny_patch16_224.fb_in1k")
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded(x), vit(x))


@requires_hub
def test_uncached_hub_id_offline_is_one_clear_error(offline_hub, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_model("hf-hub:org/absent")
    code = main(["eval", "--model", "hf-hub:org/absent", "--no-speed", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "not in the Hugging Face cache" in err[0]
    assert not (tmp_path / "o").exists()
