"""Hugging Face ViTs: our mapped model equals the transformers forward (logits or pooled features).

Each model is built offline from a small random config (no hub access) with every parameter
perturbed, so norms, biases, LayerScale and position embeddings all matter. transformers is an
optional extra; `scripts/run.sh test` installs it (and fails if it cannot), so CI runs these.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import requires_transformers
from vitbudget import CheckpointError, ConfigError, from_hf, load_model, run, save_model
from vitbudget.models.hf import preprocess_from_hf

pytestmark = requires_transformers  # skips by hand without the `hf` extra; fails in CI (VITBUDGET_REQUIRE_ANCHORS=1)
try:
    import transformers as T
except ImportError:
    T = None

LAYERS = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3)
VIT_LIKE = dict(LAYERS, intermediate_size=96, image_size=32, patch_size=8)
DINO = dict(LAYERS, mlp_ratio=2, image_size=56, patch_size=14)

# name -> (architecture, config, which output our model must equal)
CASES = {
    "vit-classifier": ("ViTForImageClassification", lambda: T.ViTConfig(num_labels=5, **VIT_LIKE), "logits"),
    "vit-no-qkv-bias": ("ViTForImageClassification", lambda: T.ViTConfig(num_labels=5, qkv_bias=False, **VIT_LIKE), "logits"),
    "vit-features": ("ViTModel", lambda: T.ViTConfig(**VIT_LIKE), "cls"),
    "deit-classifier": ("DeiTForImageClassification", lambda: T.DeiTConfig(num_labels=5, **VIT_LIKE), "logits"),
    "deit-distilled": ("DeiTForImageClassificationWithTeacher", lambda: T.DeiTConfig(num_labels=5, **VIT_LIKE), "logits"),
    "deit-features": ("DeiTModel", lambda: T.DeiTConfig(**VIT_LIKE), "cls"),
    "dinov2-features": ("Dinov2Model", lambda: T.Dinov2Config(**DINO), "pooler"),
    "dinov2-classifier": ("Dinov2ForImageClassification", lambda: T.Dinov2Config(num_labels=4, **DINO), "logits"),
    "dinov2-registers": ("Dinov2WithRegistersModel", lambda: T.Dinov2WithRegistersConfig(num_register_tokens=2, **DINO), "pooler"),
    "dinov2-registers-classifier": ("Dinov2WithRegistersForImageClassification",
                                    lambda: T.Dinov2WithRegistersConfig(num_register_tokens=2, num_labels=4, **DINO), "logits"),
    "clip-vision": ("CLIPVisionModel", lambda: T.CLIPVisionConfig(**VIT_LIKE), "pooler"),
    "clip-vision-gelu": ("CLIPVisionModel", lambda: T.CLIPVisionConfig(hidden_act="gelu", **VIT_LIKE), "pooler"),
}


def build_hf(architecture: str, config, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(T, architecture)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_output(model, x: torch.Tensor, kind: str, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x, **kwargs)
    return {"logits": lambda: out.logits, "pooler": lambda: out.pooler_output, "cls": lambda: out.last_hidden_state[:, 0]}[kind]()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_equals_hugging_face_forward(case, tmp_path):
    architecture, make_config, kind = CASES[case]
    config = make_config()
    hf = build_hf(architecture, config)
    x = torch.randn(3, 3, config.image_size, config.image_size)
    expected = hf_output(hf, x, kind)
    ours = from_hf(hf)
    with torch.no_grad():
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(run(ours, x).logits, expected, atol=1e-5, rtol=1e-5)  # the block runner too
    # a save_pretrained directory (the hub's tensor names, not transformers 5's live ones), no transformers needed to read
    hf.save_pretrained(tmp_path / case)
    loaded = load_model(tmp_path / case)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5, rtol=1e-5)
    assert loaded.info.extra["source"]["architecture"] == architecture
    # and through our own format
    again = load_model(save_model(loaded, tmp_path / "ours.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))


@pytest.mark.parametrize("case, size", [("vit-classifier", 48), ("dinov2-features", 42), ("dinov2-registers", 42), ("deit-distilled", 40)])
def test_other_input_size_equals_the_models_own_interpolation(case, size):
    """img_size= resamples the position embeddings once, exactly as the model interpolates them on the fly."""
    architecture, make_config, kind = CASES[case]
    hf = build_hf(architecture, make_config())
    x = torch.randn(2, 3, size, size)
    flag = {} if case.startswith("dinov2") else {"interpolate_pos_encoding": True}  # DINOv2 always interpolates
    expected = hf_output(hf, x, kind, **flag)
    ours = from_hf(hf, img_size=size)
    assert ours.cfg.img_size == size and "resampled" in ours.info.extra["source"]
    with torch.no_grad():
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_distillation_token_roles():
    """WithTeacher: a distillation token read by its own head; plain DeiT: the same token, read by none (a register)."""
    config = CASES["deit-distilled"][1]()
    teacher = from_hf(build_hf("DeiTForImageClassificationWithTeacher", config))
    assert teacher.cfg.dist_token and teacher.cfg.num_prefix_tokens == 2 and "head_dist.weight" in teacher.state_dict()
    plain = from_hf(build_hf("DeiTForImageClassification", config))
    assert not plain.cfg.dist_token and plain.cfg.reg_tokens == 1 and "head_dist.weight" not in plain.state_dict()


def test_left_out_tensors_are_named_and_unknown_ones_refused(tmp_path):
    hf = build_hf("ViTModel", T.ViTConfig(**VIT_LIKE))
    ours = from_hf(hf)
    assert ours.info.extra["source"]["left_out"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert ours.cfg.num_classes == 0 and ours(torch.randn(1, 3, 32, 32)).shape == (1, 48)
    hf.save_pretrained(tmp_path / "vit")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "vit/model.safetensors")
    save_file({**state, "encoder.layer.0.attention.attention.relative_position_bias": torch.zeros(3)}, tmp_path / "vit/model.safetensors")
    with pytest.raises(CheckpointError, match="do not map onto a ViT.*relative_position_bias"):
        load_model(tmp_path / "vit")
    state.pop("encoder.layer.1.layernorm_after.weight")
    save_file(state, tmp_path / "vit/model.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 keys e.g. blocks.1.norm2.weight"):
        load_model(tmp_path / "vit")


@pytest.mark.parametrize(
    "config, architecture, message",
    [
        (dict(model_type="beit", **VIT_LIKE), "BeitModel", "relative position bias"),
        (dict(model_type="clip", **VIT_LIKE), "CLIPModel", "pass model.vision_model"),
        (dict(model_type="swin", **VIT_LIKE), "SwinModel", "not supported .*not a plain ViT"),
        (dict(model_type="dinov2", use_swiglu_ffn=True, **DINO), "Dinov2Model", "SwiGLU"),
        (dict(model_type="vit", **{**VIT_LIKE, "image_size": [32, 48]}), "ViTModel", r"only square sizes are supported: Hugging Face config image_size is \[32, 48\]"),
        (dict(model_type="vit", hidden_act="relu", **VIT_LIKE), "ViTModel", "activation 'relu' is not supported"),
    ],
)
def test_unsupported_models_are_clear_errors(tmp_path, config, architecture, message):
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    with pytest.raises(ConfigError, match=message):
        load_model(tmp_path)


def test_live_clip_model_with_text_tower_is_refused():
    clip = T.CLIPModel(T.CLIPConfig(vision_config=VIT_LIKE, text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                                              intermediate_size=64), projection_dim=16))
    with pytest.raises(ConfigError, match="pass model.vision_model"):
        from_hf(clip)
    assert from_hf(clip.vision_model).cfg.pre_norm


def test_preprocessing_comes_from_the_image_processor(tmp_path):
    """DINOv2's processor (shortest edge 256, crop 224, bicubic) and ViT's (squash to 224) map onto Preprocess."""
    dino = {"do_resize": True, "size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
            "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "rescale_factor": 1 / 255}
    pre, size = preprocess_from_hf(dino)
    assert size == 224 and pre.crop_pct == pytest.approx(224 / 256) and pre.interpolation == "bicubic" and pre.resize == "shortest"
    assert pre.mean == (0.485, 0.456, 0.406)
    vit = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    pre, size = preprocess_from_hf(vit)
    assert size == 224 and pre.crop_pct == 1.0 and pre.resize == "squash" and pre.std == (0.5, 0.5, 0.5)
    # a directory's processor sets the input size: DINOv2 at 42 px instead of its native 56 px grid
    hf = build_hf("Dinov2Model", CASES["dinov2-features"][1]())
    hf.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino/preprocessor_config.json").write_text(json.dumps({**dino, "size": {"shortest_edge": 48}, "crop_size": {"height": 42, "width": 42}}))
    model = load_model(tmp_path / "dino")
    assert model.cfg.img_size == 42 and model.info.preprocess.crop_pct == pytest.approx(42 / 48)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        assert torch.allclose(model(x), hf_output(hf, x, "pooler"), atol=1e-5, rtol=1e-5)


def test_class_names_from_id2label():
    config = T.ViTConfig(num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2}, **VIT_LIKE)
    assert from_hf(build_hf("ViTForImageClassification", config)).info.classes == ["cat", "dog", "fox"]
    assert from_hf(build_hf("ViTForImageClassification", T.ViTConfig(num_labels=3, **VIT_LIKE))).info.classes is None  # LABEL_0..


def test_eval_command_reads_a_hugging_face_directory(tmp_path, capsys, image_folder):
    """`vitbudget eval --model DIR`: the directory's processor sets the size (resampled, noted); features are scored by cosine."""
    from vitbudget.cli import main

    hf = build_hf("Dinov2WithRegistersModel", CASES["dinov2-registers"][1]())
    hf.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino/preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 28}, "do_center_crop": True,
                                                                        "crop_size": {"height": 28, "width": 28}, "resample": 3}))
    code = main(["eval", "--model", str(tmp_path / "dino"), "--data", str(image_folder), "--method", "tome", "--r", "1", "--no-speed",
                 "--quiet", "--workers", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0
    assert "note: Dinov2WithRegistersModel: position embeddings resampled once from 4x4 to 2x2 patches (bicubic, antialiased)" in err
    assert "not mapped (unused at inference): embeddings.mask_token" in err
    report = json.loads((tmp_path / "out/results.json").read_text())
    assert report["model"]["config"]["img_size"] == 28 and report["methods"]["tome"]["cosine_to_baseline"] <= 1.0


@pytest.mark.slow
def test_img_size_flag_runs_a_directory_and_a_checkpoint_at_another_size(tmp_path, capsys, image_folder):
    """`--img-size` resamples once: a directory as the HF model interpolates, our checkpoint from its trained size."""
    from vitbudget.cli import main

    hf = build_hf("Dinov2Model", CASES["dinov2-features"][1]())
    hf.save_pretrained(tmp_path / "dino")
    code = main(["eval", "--model", str(tmp_path / "dino"), "--img-size", "28", "--data", str(image_folder), "--method", "tome", "--r", "1",
                 "--no-speed", "--quiet", "--workers", "0", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out/results.json").read_text())
    assert report["model"]["config"]["img_size"] == 28
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "dino", img_size=28)(x), hf(pixel_values=x).pooler_output, rtol=0, atol=1e-4)
    save_model(load_model(tmp_path / "dino", img_size=28), tmp_path / "ck.safetensors")
    code = main(["eval", "--model", str(tmp_path / "ck.safetensors"), "--img-size", "42", "--data", str(image_folder), "--no-speed",
                 "--quiet", "--workers", "0", "--out", str(tmp_path / "out42")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out42/results.json").read_text())["model"]["config"]["img_size"] == 42
