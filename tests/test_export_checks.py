"""Export and compile: what is refused up front (one line, nothing written, no tracer output), the
stacks that now export and compile, FLOPs in the metadata equal to evaluation's, and OpenVINO IR."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from conftest import make_model, requires_export, requires_openvino
from vitbudget import ConfigError, save_model
from vitbudget.cli import main
from vitbudget.eval.evaluate import predict
from vitbudget.export import block_tokens, export_method, load_exported, read_metadata
from vitbudget.methods import build_method, save_method
from vitbudget.methods.compiled import CompiledMethod, compile_support

pytestmark = [requires_export, pytest.mark.slow]  # every export traces a model (seconds)
ATOL = 1e-4


def one_error_line(capfd) -> str:
    """stderr (file descriptors too: torch's C++ and logging write there) is exactly one vitbudget error line."""
    err = capfd.readouterr().err
    assert err.startswith("vitbudget: error:") and err.count("\n") == 1, err[:2000]
    return err


@pytest.fixture
def ckpt(tmp_path):
    return str(save_model(make_model(), tmp_path / "model" / "tiny.safetensors"))


@pytest.mark.parametrize("opset", ["3", "15", "17", "24"])
def test_unsupported_opset_is_refused_at_parse_time(opset, ckpt, tmp_path, capfd):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", ckpt, "--opset", opset, "--out", str(tmp_path / "m.onnx")])
    assert exit_.value.code == 2
    assert "ONNX opset from 18 to 23" in one_error_line(capfd)
    assert not (tmp_path / "m.onnx").exists()


def test_opset_is_honoured_and_a_failed_conversion_refused(tmp_path, monkeypatch):
    import onnx

    method = build_method("tome", make_model(), r=2)
    export_method(method, tmp_path / "m.onnx", opset=21, verify=False)
    assert {o.domain: o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import}[""] == 21
    from vitbudget.export import onnx_file  # a converter that silently keeps its own opset (what torch does below 18)

    monkeypatch.setattr(onnx_file, "MIN_OPSET", 15)
    with pytest.raises(ConfigError, match="could not write opset 16"):
        export_method(method, tmp_path / "low.onnx", opset=16, verify=False)
    assert not (tmp_path / "low.onnx").exists()


def test_opset_with_another_format_and_bad_device(ckpt, tmp_path, capfd):
    assert main(["export", "--model", ckpt, "--opset", "20", "--out", str(tmp_path / "m.pt2")]) == 1
    assert "--opset applies to ONNX files only" in one_error_line(capfd)
    with pytest.raises(SystemExit):
        main(["export", "--model", ckpt, "--device", "banana", "--out", str(tmp_path / "m.onnx")])
    assert "unknown device 'banana'" in one_error_line(capfd)


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_full_disk_is_one_line_and_leaves_nothing(suffix, ckpt, tmp_path, capfd, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", full)
    monkeypatch.setattr(torch.export, "save", full)
    out = tmp_path / "out" / f"m.{suffix}"
    assert main(["export", "--model", ckpt, "--method", "tome", "--r", "2", "--out", str(out)]) == 1
    assert "No space left on device" in one_error_line(capfd)
    assert list(out.parent.iterdir()) == []


def test_data_dependent_stacks_are_refused_before_tracing_in_one_line(ckpt, tmp_path, capfd):
    avit = save_method(build_method("avit", make_model()), tmp_path / "avit.safetensors")
    capfd.readouterr()
    for extra in ([], ["--dense", "true"]):
        assert main(["export", "--model", str(avit), "--method", "avit+abs", *extra, "--out", str(tmp_path / "s.onnx")]) == 1
        err = one_error_line(capfd)
        assert "depends on the pixels" in err and "tome+abs" in err
    assert not (tmp_path / "s.onnx").exists()


def test_tracer_output_is_silenced_when_tracing_fails(tmp_path, capfd, monkeypatch):
    """A method that slips past the up-front check fails in the tracer: one line, not its graph dump."""
    from vitbudget.methods.avit import AViT

    monkeypatch.setattr(AViT, "data_dependent_shapes", property(lambda self: None))
    method = build_method("avit", make_model())
    capfd.readouterr()
    with pytest.raises(ConfigError, match="data-dependent"):
        export_method(method, tmp_path / "a.onnx")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_data_dependent_shapes_is_one_property_that_stacks_inherit():
    model = make_model()
    assert build_method("avit", model).data_dependent_shapes
    assert build_method("avit", model, dense=True).data_dependent_shapes is None
    assert "depends on the pixels" in build_method("avit+abs", model, dense=False).data_dependent_shapes  # the stack's own reason
    assert "depends on the pixels" in build_method("avit+abs", model, dense=True).data_dependent_shapes
    assert build_method("avit+abs", model, halting=False).data_dependent_shapes is None  # ABS alone
    for name in ("tome+abs", "evit+abs", "tome", "baseline"):
        options = {"stages": "1,2"} if name.startswith("evit") else {}
        assert build_method(name, model, **options).data_dependent_shapes is None
        assert compile_support(build_method(name, model, **options)) is None


@pytest.mark.parametrize("name,options", [("tome+abs", {"r": 3, "alpha": 0.5}), ("evit+abs", {"rho": 0.7, "stages": "1,2", "alpha": 0.5})])
def test_fixed_count_stacks_export_with_tokens_removed(name, options, tmp_path):
    method = build_method(name, make_model(), **options).eval()
    result = export_method(method, tmp_path / "s.onnx")
    assert result.max_abs_diff < ATOL
    run = load_exported(result.path)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(run(images), method(images).logits, atol=ATOL, rtol=0)
    assert block_tokens(result.path)["mlp"][-1] < 17  # the reducer's savings are in the file


def test_stacks_compile(tmp_path):
    """tome+abs compiles without a graph break (k is known from shapes); avit+abs compiles with breaks allowed."""
    model = make_model()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for name, fullgraph in (("tome+abs", True), ("avit+abs", False)):
        method = build_method(name, model, alpha=0.5).eval()
        torch._dynamo.reset()
        compiled = CompiledMethod(method, backend="eager")
        assert compiled.fullgraph is fullgraph
        with torch.inference_mode():
            torch.testing.assert_close(compiled(images).logits, method(images).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [2.5, "abc", True])
def test_config_with_a_non_integer_r_is_one_line(value, ckpt, tmp_path, capfd):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"format": "vitbudget-run-config", "version": 1, "method": "tome+abs", "options": {"r": value}}))
    assert main(["export", "--model", ckpt, "--config", str(config), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "'r' of 'tome+abs' must be an integer" in one_error_line(capfd)
    assert not (tmp_path / "m.onnx").exists()


def test_metadata_gflops_equal_evaluation(tmp_path):
    """What `eval` reports per image (eval.evaluate.predict) is what the exported file's metadata says."""
    model = make_model()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    dataset = [(image, 0) for image in images]
    for name, options in (("baseline", {}), ("tome", {"r": 3}), ("evit", {"rho": 0.7, "stages": "1,2"}), ("tome+abs", {"r": 2, "alpha": 0.5})):
        method = build_method(name, model, **options)
        meta = export_method(method, tmp_path / f"{name}.pt2", verify=False).metadata
        summary = predict(method, dataset, range(len(dataset)), batch_size=2, workers=0, progress=False).summary(1.0)
        assert meta["gflops"] == pytest.approx(summary["gflops"], rel=1e-12), name
    assert meta["rel_flops"] > 0  # noqa: the loop ran


@requires_openvino
@pytest.mark.parametrize("name,options", [("tome", {"r": 3}), ("evit", {"rho": 0.7, "stages": "1,2"}), ("baseline", {})])
def test_openvino_ir_reproduces_pytorch_with_tokens_removed(name, options, tmp_path):
    method = build_method(name, make_model(), **options).eval()
    result = export_method(method, tmp_path / "m.xml", source="tiny")
    assert result.max_abs_diff is not None and result.max_abs_diff < ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # nothing else left behind
    run = load_exported(result.path)
    g = torch.Generator().manual_seed(6)
    for images in (torch.randn(5, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)):
        with torch.no_grad():
            torch.testing.assert_close(run(images), method(images).logits, atol=ATOL, rtol=0)
    assert read_metadata(result.path) == result.metadata == run.metadata
    tokens = block_tokens(result.path)
    assert tokens == result.metadata["tokens"]
    if name != "baseline":
        assert tokens["mlp"][-1] < 17


@requires_openvino
def test_openvino_cli(ckpt, tmp_path, capsys):
    assert main(["export", "--model", ckpt, "--method", "tome", "--r", "3", "--format", "openvino", "--out", str(tmp_path / "t.xml")]) == 0
    assert "OpenVINO CPU, f32" in capsys.readouterr().out
    assert main(["export", "--model", ckpt, "--format", "openvino", "--out", str(tmp_path / "t.onnx")]) == 1
    assert "name the output .xml" in capsys.readouterr().err


@requires_openvino
def test_speed_script_times_openvino_next_to_onnxruntime(tmp_path):
    """benchmarks/onnx_speed.py --openvino on the toy setting: OpenVINO rows carry the fraction of the ideal speed-up."""
    from conftest import load_script

    script = load_script("onnx_speed")
    result = script.main(["--tiny", "--methods", "tome", "--openvino", "--no-eager", "--repeats-b64", "1", "--out", str(tmp_path)])
    tome = {r["method"]: r for r in result["rows"]}["tome"]
    for key in ("ov_b1", "ov_b64", "ort_b1"):
        assert tome[key]["fraction_of_ideal"] == pytest.approx(tome[key]["speedup"] * tome["rel_flops"])
    assert "OpenVINO b1 fraction" in (tmp_path / "onnx_speed.md").read_text() and result["openvino"]


# -- int8 stacked on token reduction ---------------------------------------------------------------
def test_int8_onnx_keeps_the_tokens_removed_and_stays_close(tmp_path):
    """--quantize int8: int8 matrix products in the graph, the same token counts and metadata, logits within quantization error."""
    import onnx

    method = build_method("tome", make_model(), r=2).eval()
    fp32 = export_method(method, tmp_path / "fp32.onnx")
    int8 = export_method(method, tmp_path / "int8.onnx", quantize="int8")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMulInteger" not in {n.op_type for n in onnx.load(str(tmp_path / "fp32.onnx")).graph.node}
    assert block_tokens(tmp_path / "int8.onnx") == block_tokens(tmp_path / "fp32.onnx")
    assert block_tokens(tmp_path / "int8.onnx")["attention"] == [17, 15, 13]
    meta = read_metadata(tmp_path / "int8.onnx")
    assert meta["quantization"]["weights"] == "int8 per tensor" and meta["method"] == fp32.metadata["method"]
    assert meta["gflops"] == fp32.metadata["gflops"] and int8.metadata["quantization"] == meta["quantization"]
    assert fp32.max_abs_diff < ATOL < int8.max_abs_diff < 0.2  # quantization error, not another computation
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = method(x).logits
    assert (load_exported(tmp_path / "int8.onnx")(x) - reference).abs().max() < 0.2


def test_int8_is_onnx_only_one_line(ckpt, tmp_path, capfd):
    assert main(["export", "--model", ckpt, "--quantize", "int8", "--out", str(tmp_path / "m.pt2")]) == 1
    assert "--quantize int8 applies to ONNX files only" in one_error_line(capfd)
    assert not (tmp_path / "m.pt2").exists()
    assert main(["export", "--model", ckpt, "--method", "tome", "--r", "2", "--quantize", "int8", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "int8 weights: quantization error included" in capfd.readouterr().out


def test_int8_stack_script_multiplies_what_it_measured(tmp_path):
    """benchmarks/int8_stack.py --tiny: every method in fp32 and int8, and the product of the parts from its own rows."""
    from conftest import load_script

    script = load_script("int8_stack")
    assert script.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = {(r["method"], r["precision"]): r for r in json.loads((tmp_path / "int8_stack.json").read_text())["rows"]}
    assert set(rows) == {(m, p) for m in ("baseline", "tome", "evit") for p in ("fp32", "int8")}
    for batch in ("b1", "b64"):
        assert rows["baseline", "fp32"][batch]["speedup"] == 1.0
        stack = rows["tome", "int8"][batch]
        assert stack["product_of_parts"] == pytest.approx(rows["tome", "fp32"][batch]["speedup"] * rows["baseline", "int8"][batch]["speedup"])
    assert "| tome r 1 | int8 |" in (tmp_path / "int8_stack.md").read_text()
