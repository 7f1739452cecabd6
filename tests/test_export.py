"""Export: every fixed-count method as ONNX (onnxruntime, CPU) and as a torch.export program
reproduces its PyTorch logits on batch sizes other than the traced one, and the exported graph
really runs fewer tokens where the method removes them.

onnx, onnxscript and onnxruntime are the `export` extra; scripts/run.sh installs it, so a
missing package fails these tests rather than skipping them.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, requires_export
from vitbudget import ConfigError, InputError, save_model
from vitbudget.cli import main
from vitbudget.export import block_tokens, export_method, load_exported, read_metadata
from vitbudget.runconfig import RunConfig, write_run_config
from vitbudget.export.onnx_file import write_onnx
from vitbudget.export.pt2_file import write_pt2
from vitbudget.export.trace import EXAMPLE_BATCH, trace
from vitbudget.methods import build_method, save_method
from vitbudget.models.vit import unchecked_values

pytestmark = [requires_export, pytest.mark.slow]  # every export traces a model (seconds); skips by hand without the `export` extra; fails in CI (VITBUDGET_REQUIRE_ANCHORS=1)
try:
    import onnx
except ImportError:
    onnx = None

ATOL = 1e-4  # the issue's tolerance; observed differences are ~1e-7

# The tiny model has 3 blocks and 16 patches: stages 1,2 prune inside it. A-ViT halts within it
# at gamma 1, beta 0 (h = sigmoid(x0) ~ 0.5 per block), so its dense mask really acts.
CASES = {
    "baseline": ("baseline", {}),
    "evit-fuse": ("evit", {"rho": 0.7, "stages": "1,2", "fuse": True}),
    "tome": ("tome", {"r": 3}),
    "mctf": ("mctf", {"r": 2}),
    "zerotprune": ("zerotprune", {"rho": 0.7, "stages": "1,2"}),
    "pitome": ("pitome", {"ratio": 0.75}),
    "tofu": ("tofu", {"r": 3}),
    "dynamicvit": ("dynamicvit", {"rho": 0.7, "stages": "1,2"}),
    "spot": ("spot", {"rho": 0.7, "stages": "1,2"}),
    "spot_heuristic": ("spot_heuristic", {"rho": 0.6, "stages": "1,2"}),
    "abs-entropy": ("abs", {"alpha": 0.5}),
    "abs-random": ("abs", {"alpha": 0.5, "score": "random"}),
    "depth": ("depth", {}),
    "avit-dense": ("avit", {"dense": True, "gamma": 1.0, "beta": 0.0}),
}
REMOVES_TOKENS = {"evit-fuse", "tome", "mctf", "zerotprune", "pitome", "tofu", "dynamicvit", "spot", "spot_heuristic"}


def eager_widths(method, images) -> dict[str, list[int]]:
    """Tokens each block ran in the PyTorch run (its record's widths: A-ViT dense counts masked tokens too)."""
    with torch.no_grad():
        record = method(images).record
    return {"attention": [int(w) for w in record.attn_width], "mlp": [int(w) for w in record.mlp_width]}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_method_reproduces_pytorch(case, tmp_path):
    name, options = CASES[case]
    method = build_method(name, make_model(), **options).eval()
    program = trace(method)
    write_onnx(program, tmp_path / "m.onnx", {"method": name})
    write_pt2(program, tmp_path / "m.pt2", {"method": name})
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)]  # neither is the traced 2
    expected_tokens = eager_widths(method, batches[0])
    if name == "mctf":  # one-step-ahead: norm1 first runs on the tokens entering the block (q, k), before they merge
        expected_tokens["attention"] = [17] + expected_tokens["mlp"][:-1]
    for path in (tmp_path / "m.onnx", tmp_path / "m.pt2"):
        run = load_exported(path)
        for images in batches:  # twice per file: nothing inside may change between calls
            with torch.no_grad():
                reference = method(images).logits
            torch.testing.assert_close(run(images), reference, atol=ATOL, rtol=0)
        tokens = block_tokens(path)
        assert tokens == expected_tokens, path.suffix
        if case in REMOVES_TOKENS:
            assert tokens["mlp"][-1] < 17, f"{case}: the exported graph keeps all 17 tokens"
        if name == "avit":  # dense: halted tokens are masked, never removed
            assert set(tokens["attention"]) == {17}
    assert EXAMPLE_BATCH not in {b.shape[0] for b in batches}


def test_exported_stages_have_fewer_tokens(tmp_path):
    """EViT at blocks 1 and 2 keeps ceil(0.7 * 16) = 12 then ceil(0.7 * 12) = 9 patches (+ CLS), in the file's own shapes."""
    method = build_method("evit", make_model(), rho=0.7, stages="1,2").eval()
    result = export_method(method, tmp_path / "evit.onnx")
    assert block_tokens(result.path) == {"attention": [17, 17, 13], "mlp": [17, 13, 10]}
    assert result.metadata["tokens"] == block_tokens(result.path)


def test_metadata_travels_in_both_formats(tmp_path):
    model = make_model()
    model.info.name = "tiny"
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    model.info.preprocess.mean = (0.1, 0.2, 0.3)
    method = build_method("tome", model, r=2)
    for suffix in ("onnx", "pt2"):
        result = export_method(method, tmp_path / f"tome.{suffix}", source="ckpt.safetensors")
        assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
        meta = read_metadata(result.path)
        assert meta["classes"] == model.info.classes
        assert meta["preprocess"]["mean"] == [0.1, 0.2, 0.3] and meta["preprocess"]["img_size"] == 32
        assert meta["method"] == {"name": "tome", "options": {"r": 2, "score_fp32": False}}
        assert meta["model"]["name"] == "tiny" and meta["model"]["source"] == "ckpt.safetensors"
        assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["vitbudget_version"]
        assert 0 < meta["rel_flops"] < 1
        assert load_exported(result.path).metadata == meta
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "tome.onnx")).metadata_props}
    assert props["classes"][0] == "class00"  # plain metadata_props: readable without vitbudget


def test_onnx_merge_uses_scatter_add_never_a_mean_reduction(tmp_path):
    method = build_method("tome", make_model(), r=3)
    export_method(method, tmp_path / "tome.onnx", verify=False)
    reductions = [a.s.decode() for n in onnx.load(str(tmp_path / "tome.onnx")).graph.node
                  if n.op_type.startswith("Scatter") for a in n.attribute if a.name == "reduction"]
    assert "mean" not in reductions


def test_avit_removing_path_explains_why_it_cannot_export(tmp_path):
    method = build_method("avit", make_model())
    with pytest.raises(ConfigError, match="data-dependent shapes.*--dense true"):
        export_method(method, tmp_path / "avit.onnx")
    assert not (tmp_path / "avit.onnx").exists()


def test_input_value_check_stays_for_eager_users_and_leaves_the_traced_region():
    model = make_model()
    bad = torch.full((1, 3, 32, 32), float("nan"))
    with pytest.raises(InputError, match="NaN"):
        model(bad)
    with unchecked_values(model):
        assert torch.isnan(model(bad)).all()  # no check inside: tracing sees no host sync
        with pytest.raises(InputError, match="NaN"):
            model.check_input(bad, values=True)  # the caller's eager check
    with pytest.raises(InputError, match="NaN"):
        model(bad)  # restored


def test_export_cli(tmp_path, capsys):
    model = make_model()
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    ckpt = save_model(model, tmp_path / "tiny.safetensors")
    avit = save_method(build_method("avit", model), tmp_path / "avit.safetensors")
    out = tmp_path / "evit.pt2"
    code = main(["export", "--model", str(ckpt), "--method", "evit", "--rho", "0.5", "--stages", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "[17, 17, 9]" in stdout and "max |logits - PyTorch logits|" in stdout
    assert read_metadata(out)["method"]["options"] == {"rho": 0.5, "stages": "1", "fuse": False, "fuse_normalize": False}
    config = write_run_config(tmp_path / "c.json", RunConfig("evit", {"rho": 0.5, "stages": "1"}, model=str(ckpt)))
    assert main(["export", "--config", str(config), "--out", str(tmp_path / "config.pt2")]) == 0  # the setting `tune` chose
    assert read_metadata(tmp_path / "config.pt2")["method"] == read_metadata(out)["method"]
    capsys.readouterr()
    for argv, message in [
        (["--out", str(tmp_path / "x.txt")], "cannot tell the format"),
        (["--model", str(avit), "--method", "avit", "--out", str(tmp_path / "a.onnx")], "--dense true"),
        (["--alpha", "0.3", "--out", str(tmp_path / "b.onnx")], "--alpha apply to none"),
    ]:
        assert main(["export", "--model", str(ckpt), *argv]) == 1  # a later --model wins
        err = capsys.readouterr().err
        assert err.startswith("vitbudget: error:") and message in err and err.count("\n") == 1


def test_onnx_speed_script_tiny(tmp_path):
    """benchmarks/onnx_speed.py end to end on the toy setting (what the lead's timing run executes)."""
    from conftest import load_script

    script = load_script("onnx_speed")
    result = script.main(["--tiny", "--methods", "evit", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "evit"} and rows["baseline"]["rel_flops"] == 1.0
    evit = rows["evit"]
    assert evit["tokens"][-1] < evit["tokens"][0] and evit["max_abs_diff"] < ATOL
    for key in ("ort_b1", "ort_b64", "eager_b1", "eager_b64"):
        assert evit[key]["fraction_of_ideal"] == pytest.approx(evit[key]["speedup"] * evit["rel_flops"])
        assert rows["baseline"][key]["speedup"] == 1.0
    assert "| tiny | evit rho 0.7 |" in (tmp_path / "onnx_speed.md").read_text()
