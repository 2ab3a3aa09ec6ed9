"""sparsesr.peers: the same weights on other engines, checked for agreement before they are timed."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from sparsesr import peers
from sparsesr.errors import SparseSRError
from sparsesr.format import export_bytes
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint
from sparsesr.pruning import one_shot_prune


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    model = build_model("edsr-cpu", 2, n_resblocks=2, n_feats=8).eval()
    one_shot_prune(model, 0.8)
    path = tmp_path_factory.mktemp("peers") / "tiny.safetensors"
    path.write_bytes(export_bytes(Checkpoint(state_dict=model.state_dict(), arch="edsr-cpu", config=model.config)))
    return path, model


def test_dense_equivalent_has_the_pruned_weights(tiny_file):
    path, model = tiny_file
    dense = peers.dense_equivalent(path)
    x = torch.rand(1, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
    conv = dense.body[0].body[0].weight
    assert 0 < int(torch.count_nonzero(conv)) < conv.numel()  # the zeros travel to the dense engines


@pytest.mark.parametrize("arch", ["srvgg-cpu", "rrdbnet"])
def test_other_families_on_the_peers(tmp_path, arch):
    """An exported SRVGG / RRDBNet file becomes its own family's dense network, and is timed."""
    torch.manual_seed(0)
    overrides = {"num_conv": 2} if arch == "srvgg-cpu" else {"num_block": 1, "num_grow_ch": 4}
    model = build_model(arch, 4, n_feats=8, **overrides).eval()
    one_shot_prune(model, 0.8, balance="uniform")
    path = tmp_path / "m.safetensors"
    path.write_bytes(export_bytes(Checkpoint(state_dict=model.state_dict(), arch=arch, config=model.config)))
    dense = peers.dense_equivalent(path)
    assert type(dense) is type(model)
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)
    result = peers.compare_engines(path, size=8, threads=1, repeats=1, warmup=0, engines=("sparsesr", "pytorch"))
    assert {row["engine"] for row in result["rows"]} == {"sparsesr", "pytorch"}


@pytest.mark.parametrize("child, fragment", [
    ("import os; os.abort()", "DeepSparse killed by signal 6"),
    ("import sys; print('Assertion at graph.cpp:1417', file=sys.stderr); sys.exit(3)",
     "DeepSparse exit 3: Assertion at graph.cpp:1417"),
    ("pass", None),
])
def test_a_deepsparse_abort_is_a_skip_reason_not_a_dead_process(monkeypatch, tmp_path, child, fragment):
    monkeypatch.setattr(peers, "_DEEPSPARSE_PROBE", child)
    assert peers.deepsparse_compile_error(tmp_path / "m.onnx", 1) == fragment


def test_sparsesr_and_pytorch_rows(tiny_file):
    path, _ = tiny_file
    result = peers.compare_engines(path, size=12, threads=1, repeats=2, warmup=0, engines=("sparsesr", "pytorch"))
    rows = {row["engine"]: row for row in result["rows"]}
    assert rows["pytorch"]["rel_error"] == 0.0
    assert rows["sparsesr"]["rel_error"] < peers.FP32_TOLERANCE
    assert rows["sparsesr"]["rounds"] == rows["pytorch"]["rounds"] == 2
    assert result["fastest_peer"] == "pytorch"
    assert result["lead"] == pytest.approx(rows["pytorch"]["median_ms"] / rows["sparsesr"]["median_ms"])
    assert rows["pytorch"]["vs_sparsesr"] == pytest.approx(result["lead"])
    assert "sparsesr vs the fastest peer (pytorch)" in peers.format_comparison(result)


def test_missing_engine_is_a_skipped_row_not_an_error(tiny_file, monkeypatch):
    path, _ = tiny_file
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepsparse" else real(name, *a))
    result = peers.compare_engines(path, size=8, threads=1, repeats=1, warmup=0, engines=("sparsesr", "deepsparse"))
    row = result["rows"][1]
    assert row["engine"] == "deepsparse" and "not installed" in row["skipped"] and "median_ms" not in row
    assert result["fastest_peer"] is None and result["lead"] is None
    assert "deepsparse    skipped: deepsparse is not installed" in peers.format_comparison(result)


def test_an_engine_that_disagrees_is_not_timed(tiny_file, monkeypatch):
    path, _ = tiny_file
    monkeypatch.setattr(peers, "unavailable_reason", lambda name: None)
    monkeypatch.setattr(peers, "build_engine",
                        lambda name, onnx, threads: peers.Engine(name, "fp32", lambda x: np.zeros((1, 3, 16, 16), np.float32)))
    pytest.importorskip("onnx", reason="the ONNX export needs onnx")
    result = peers.compare_engines(path, size=8, threads=1, repeats=1, warmup=0, engines=("pytorch", "onnxruntime"))
    row = result["rows"][1]
    assert row["rel_error"] == pytest.approx(1.0) and "disagrees" in row["skipped"] and "median_ms" not in row


def test_unknown_engine_and_bad_sizes_fail_before_work(tiny_file):
    path, _ = tiny_file
    with pytest.raises(SparseSRError, match="unknown engine 'tensorrt'"):
        peers.compare_engines(path, engines=("sparsesr", "tensorrt"))
    with pytest.raises(SparseSRError, match="positive"):
        peers.compare_engines(path, size=0)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino-f32", "deepsparse"])
def test_installed_engines_agree_with_pytorch(tiny_file, engine):
    if peers.unavailable_reason(engine):
        pytest.skip(peers.unavailable_reason(engine))
    path, _ = tiny_file
    result = peers.compare_engines(path, size=16, threads=1, repeats=1, warmup=0, engines=("pytorch", engine))
    row = result["rows"][1]
    assert "skipped" not in row, row
    assert row["precision"] == "fp32" and row["rel_error"] < peers.FP32_TOLERANCE


def test_cpu_description_names_the_vector_isa():
    text = peers.cpu_description()
    assert text.endswith(")") and any(isa in text for isa in ("AVX2", "AVX-512", "NEON", "no AVX2"))


def test_bench_peers_command(tiny_file, capsys):
    from sparsesr.cli import main

    path, _ = tiny_file
    assert main(["bench", str(path), "--peers", "--size", "8", "--threads", "1", "--repeats", "1", "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    assert [row["engine"] for row in result["rows"]] == list(peers.ENGINES)
    assert all("median_ms" in row or row["skipped"] for row in result["rows"])
    assert main(["bench", str(path), "--peers", "--per-layer"]) == 2
    assert "--peers compares CPU engines" in capsys.readouterr().err
