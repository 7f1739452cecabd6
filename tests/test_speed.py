"""`vitbudget speed`: rows and fields, speed-up arithmetic, FLOPs per row, and A-ViT's replayed halting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY, make_model, requires_timm
from vitbudget.cli import main
from vitbudget.eval.realistic import Entry, HaltingProfile, rows_for_batch
from vitbudget.methods.avit import AViTOptions, HaltingReplay, draw_halting_depths
from vitbudget.models import ViTConfig, save_model
from vitbudget.runtime.cost import block_macs, dense_macs, stem_macs

DEEP = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=2, num_classes=10)  # 16 patches, 6 blocks


def test_speedup_and_fraction_from_interleaved_times():
    """Speed-up = median of per-round baseline / method; fraction = speed-up x rel. FLOPs; compiled vs its eager twin."""
    entries = [Entry("baseline", "baseline", None, False, None), Entry("evit", "evit", None, False, None),
               Entry("baseline", "baseline", None, True, None), Entry("evit", "evit", None, True, None)]
    times = {"baseline/eager": [4.0, 2.0, 6.0], "evit/eager": [2.0, 2.0, 2.0],  # per round 2, 1, 3 -> median 2
             "baseline/compiled": [1.0, 1.0, 1.0], "evit/compiled": [0.5, 0.8, 1.0]}  # 2, 1.25, 1 -> 1.25
    rows = rows_for_batch(entries, times, {"baseline": 1.0, "evit": 0.625}, batch=4)
    evit, evit_c = rows[1], rows[3]
    assert evit["speedup"] == pytest.approx(2.0) and evit["fraction_of_ideal"] == pytest.approx(1.25)
    assert evit["ideal_speedup"] == pytest.approx(1.6)
    assert evit["throughput_img_s"] == pytest.approx(4 / 2.0) and evit["latency_ms"] == pytest.approx(2000.0)
    assert evit_c["speedup"] == pytest.approx(1.25) and evit_c["fraction_of_ideal"] == pytest.approx(0.78125)
    assert evit_c["speedup_vs_eager"] == pytest.approx(statistics_median([2 / 0.5, 2 / 0.8, 2 / 1.0]))
    assert rows[0]["fraction_of_ideal"] is None and rows[0]["speedup"] == pytest.approx(1.0)


def statistics_median(values):
    return float(np.median(values))


def test_replayed_halting_runs_the_scripted_depths():
    """Every token runs exactly its scripted number of blocks, batched (compaction, images leaving) and one-by-one."""
    model = make_model(DEEP)
    n = DEEP.num_patches + 1
    depths = draw_halting_depths(3, n, DEEP.depth, mean=3.0, std=2.0, seed=1)
    depths[2, 0] = 4  # image 2's CLS halts after block 4: the image leaves, its remaining tokens with it
    method = HaltingReplay(model, AViTOptions(), depths).eval()
    with torch.inference_mode():
        out = method(torch.randn(3, 3, 32, 32))
    expected = torch.minimum(depths, depths[:, :1])  # a token runs until it halts or its image's CLS does
    for i, tokens in enumerate(out.record.attn_tokens):
        assert tokens.tolist() == (expected > i).sum(dim=1).tolist(), f"block {i}"
    for b in range(3):  # batch 1 takes the NumPy path: the same counts
        single = HaltingReplay(model, AViTOptions(), depths[b : b + 1]).eval()
        with torch.inference_mode():
            rec = single(torch.randn(1, 3, 32, 32)).record
        assert [int(t[0]) for t in rec.attn_tokens] == [int((expected[b] > i).sum()) for i in range(DEEP.depth)]


def test_halting_profile_draws():
    d = draw_halting_depths(64, 197, 12, mean=8.0, std=2.0, seed=0)
    assert d.shape == (64, 197) and (d[:, 0] == 12).all() and int(d.min()) >= 1 and int(d.max()) <= 12
    assert float(d[:, 1:].float().mean()) == pytest.approx(8.0, abs=0.1)  # clipping at 12 pulls it down a little
    assert torch.equal(d, draw_halting_depths(64, 197, 12, mean=8.0, std=2.0, seed=0))
    with pytest.raises(Exception, match="depths must lie"):
        HaltingReplay(make_model(DEEP), AViTOptions(), torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.slow
def test_speed_command_writes_rows(tmp_path, capsys):
    model = make_model(DEEP)
    path = save_model(model, tmp_path / "deep.safetensors")
    out = tmp_path / "speed"
    code = main(["speed", "--model", str(path), "--methods", "evit,tome,abs,avit", "--batch-sizes", "1,2", "--repeats", "2",
                 "--warmup", "1", "--rho", "0.5", "--stages", "2", "--r", "3", "--avit-depth", "4", "--no-timm", "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "speed.json").read_text())
    rows = report["rows"]
    assert [(r["method"], r["batch_size"], r["compiled"]) for r in rows] == [
        (m, b, False) for b in (1, 2) for m in ("baseline", "evit", "tome", "abs", "avit")]
    for r in rows:
        assert {"method", "batch_size", "compiled", "rel_flops", "ideal_speedup", "speedup", "fraction_of_ideal", "latency_ms",
                "throughput_img_s"} <= set(r)
        assert r["ideal_speedup"] == pytest.approx(1 / r["rel_flops"])
        if r["method"] != "baseline":
            assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] * r["rel_flops"])
    assert {"machine", "versions", "dtype", "attention_backend", "avit_halting"} <= set(report) and report["dtype"] == "fp32"
    # EViT at rho 0.5 in block 2 of 6: blocks 0-2 attend over 17 tokens, the MLP of block 2 and blocks 3-5 run 1 + 8
    evit = next(r for r in rows if r["method"] == "evit")
    from vitbudget.runtime.cost import attention_macs, mlp_macs
    d, hdim = DEEP.embed_dim, DEEP.mlp_hidden
    macs = stem_macs(DEEP) + 2 * block_macs(17, DEEP) + attention_macs(17, d) + mlp_macs(9, d, hdim) + 3 * block_macs(9, DEEP)
    assert evit["rel_flops"] == pytest.approx(macs / dense_macs(DEEP))
    md = (out / "speed.md").read_text()
    assert "| avit ¹ |" in md and "N(4, 2)" in md and "fraction of ideal" in md


def test_speed_command_rejects_bad_flags(tmp_path, capsys):
    for argv, message in ((["--batch-sizes", "1,0"], "positive batch sizes"), (["--methods", "evit,nope"], "expected method names"),
                          (["--dtype", "fp8"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            main(["speed", "--arch", "deit_tiny_patch16_224", *argv, "--out", str(tmp_path / "x")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    path = save_model(make_model(TINY), tmp_path / "tiny.safetensors")
    code = main(["speed", "--model", str(path), "--methods", "avit", "--avit-depth", "9", "--no-timm", "--out", str(tmp_path / "y")])
    assert code == 1 and "--avit-depth must be in [1, 3]" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_halting_profile_description_is_stated():
    assert "N(8, 2)" in HaltingProfile().describe() and "CLS runs every block" in HaltingProfile().describe()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 123456789 bytes.")])
@pytest.mark.slow
def test_out_of_memory_is_one_line_and_nothing_written(tmp_path, capsys, monkeypatch, error):
    """A batch size too big for the machine is the user's setting: one line naming the flag, not an allocator dump."""
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr("vitbudget.eval.realistic.measure", oom)
    code = main(["speed", "--arch", "deit_tiny_patch16_224", "--batch-sizes", "1,100000", "--methods", "baseline", "--quiet",
                 "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("vitbudget: error: out of memory on cpu")
    assert err[0].endswith("lower --batch-sizes (now 1,100000)") and not (tmp_path / "s").exists()


@pytest.mark.slow
@requires_timm
def test_runner_overhead_script_runs_and_the_runner_equals_timm(tmp_path):
    """benchmarks/runner_overhead.py end to end on DeiT-T (two rounds): every row timed, logits equal to timm's."""
    from conftest import load_script

    script = load_script("runner_overhead")
    row = script.main(["--archs", "deit_tiny_patch16_224", "--rounds", "2", "--out", str(tmp_path)])["rows"][0]
    assert row["max_abs_logit_diff_vs_timm"] == 0.0  # the runner's baseline is timm's forward, bit for bit
    assert set(row["time_over_timm"]) == {"timm", "model", "model, no value check", "runner", "runner, general path"}
    assert row["time_over_timm"]["timm"] == 1.0
    assert "| deit_tiny_patch16_224 |" in (tmp_path / "runner_overhead.md").read_text()
