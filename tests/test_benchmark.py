"""sparsesr.benchmark, `sparsesr bench` and bench/report.py, on a tiny model and a fake benchmark JSON."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from sparsesr.benchmark import benchmark_model, format_result, peak_memory, time_pair
from sparsesr.cli import main
from sparsesr.errors import BackendError, SparseSRError
from sparsesr.format import describe, export, export_bytes, parse_bytes, read_file
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.pruning import one_shot_prune
from sparsesr.runtime import backends

REPORT_PY = Path(__file__).resolve().parents[1] / "bench" / "report.py"
SPARSE_BACKEND = "cpu" if backends.unavailable_reason("cpu") is None else "auto"
VALID_PATHS = {"cpu", "triton", "dense"}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, one_thread):
    """A 90 % sparse (4x1 blocks) 1-block, 8-channel EDSR: checkpoint and exported BSR file."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = build_model("edsr-cpu", 2, n_resblocks=1, n_feats=8)
    one_shot_prune(model, 0.9, granularity="4x1")
    checkpoint = folder / "tiny.safetensors"
    save_checkpoint(checkpoint, model)
    exported = folder / "tiny.sparsesr.safetensors"
    export(checkpoint, exported, layout="bsr")
    return checkpoint, exported


@pytest.fixture(autouse=True)
def no_dispatch_cache_file(monkeypatch):
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")  # never write the user's ~/.cache


def test_time_pair_alternates_and_counts_rounds():
    calls = []
    dense, sparse = time_pair(lambda: calls.append("d"), lambda: calls.append("s"), repeats=3, warmup=2)
    assert calls == ["d", "s"] * 5
    assert len(dense.wall_s) == len(sparse.cpu_s) == 3
    stats = dense.to_dict()
    assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"] and stats["rounds"] == 3
    with pytest.raises(SparseSRError, match="repeats"):
        time_pair(lambda: None, lambda: None, repeats=0)


def test_benchmark_model_on_exported_file(tiny_files):
    _, exported = tiny_files
    threads = torch.get_num_threads()
    result = benchmark_model(exported, size=16, threads=1, backend=SPARSE_BACKEND, repeats=2, warmup=1, per_layer=True)
    assert torch.get_num_threads() == threads  # restored
    assert result["threads"] == 1 and result["size"] == 16 and result["scale"] == 2
    assert result["speedup"] == pytest.approx(result["dense"]["median_ms"] / result["sparse"]["median_ms"])
    assert result["dense"]["rounds"] == result["sparse"]["rounds"] == 2
    assert result["file_bytes"] == exported.stat().st_size and not result["exported_in_memory"]
    assert result["size_ratio"] == pytest.approx(result["file_bytes"] / result["dense_fp32_bytes"])
    assert result["size_ratio"] < 0.6 and result["sparsity"] > 0.85
    # head, body conv x2, body tail, upsampler conv, tail conv; first and last stay dense in the file
    layers = result["layers"]
    assert [row["name"] for row in layers][0] == "head.0" and len(layers) == 6
    assert sum(result["paths"].values()) == 6
    assert [row["layout"] for row in layers].count("dense") == 2
    if SPARSE_BACKEND == "cpu":  # forced: every layer, the two stored dense too
        assert result["paths"] == {"cpu": 6}
        assert all(row["path"] == "cpu" for row in layers)
    # Every per-layer row agrees with the file and with itself; the timed paths match the whole-model run.
    model_file = read_file(exported)
    assert [row["name"] for row in layers] == list(model_file.layers)
    for row in layers:
        layer = model_file.layers[row["name"]]
        assert row["layout"] == layer.layout and row["shape"] == list(layer.shape)
        assert row["sparsity"] == pytest.approx(layer.sparsity, abs=1e-9)
        assert row["path"] in VALID_PATHS and row["reason"]
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["sparse_ms"])
        side = 32 if row["name"] == "tail.1" else 16  # the last conv runs after the x2 upsampler
        assert row["dense_gflop"] == pytest.approx(2 * math.prod(layer.shape) * side * side / 1e9)
    assert Counter(row["path"] for row in layers) == result["paths"]
    summary = describe(exported)
    assert result["dense_fp32_bytes"] == summary["dense_fp32_bytes"] and result["sparsity"] == summary["sparsity"]
    text = format_result(result)
    assert f"speedup x{result['speedup']:.2f}" in text and "body.0.body.2" in text and "KB" in text


@pytest.mark.parametrize("arch, overrides", [
    ("rrdbnet", {"num_block": 1, "n_feats": 8, "num_grow_ch": 4}),
    ("srvgg-cpu", {"num_conv": 2, "n_feats": 8}),
])
def test_bench_of_another_family_with_per_layer_paths(tmp_path, capsys, arch, overrides):
    """`sparsesr bench --per-layer` on a 90 %-pruned RRDBNet x4 / SRVGG x4 (issue #14): the ratio and
    every conv's path, the long RRDBNet names in full."""
    torch.manual_seed(0)
    model = build_model(arch, 4, **overrides)
    one_shot_prune(model, 0.9, balance="uniform")
    save_checkpoint(tmp_path / "m.safetensors", model)
    assert main(["bench", str(tmp_path / "m.safetensors"), "--size", "12", "--threads", "1", "--repeats", "1",
                 "--warmup", "0", "--per-layer", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    convs = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert result["scale"] == 4 and [row["name"] for row in result["layers"]] == convs
    assert all(row["path"] in VALID_PATHS for row in result["layers"]) and result["speedup"] > 0
    assert sum(result["paths"].values()) == len(convs)
    text = format_result(result)
    assert all(f"  {name} " in text for name in convs)  # no name cut or run into the next column


def test_benchmark_model_exports_a_checkpoint_in_memory(tiny_files):
    checkpoint, _ = tiny_files
    result = benchmark_model(checkpoint, size=8, threads=1, repeats=1, warmup=0)
    # The export in memory is the file `sparsesr export` would write (export is deterministic).
    data = export_bytes(checkpoint, dtype="fp32", layout="auto")
    summary = parse_bytes(data).summary()
    assert result["exported_in_memory"] and result["file"] == str(checkpoint)
    assert result["file_bytes"] == len(data) and result["dense_fp32_bytes"] == summary["dense_fp32_bytes"]
    assert result["size_ratio"] == pytest.approx(len(data) / summary["dense_fp32_bytes"])
    assert result["sparsity"] == summary["sparsity"]
    assert result["speedup"] == pytest.approx(result["dense"]["median_ms"] / result["sparse"]["median_ms"])
    assert result["dense"]["rounds"] == result["sparse"]["rounds"] == 1
    assert set(result["paths"]) <= VALID_PATHS and sum(result["paths"].values()) == len(summary["layers"])
    assert result["device"] == "cpu" or torch.cuda.is_available()


def test_bad_devices_are_one_line_errors(tiny_files, capsys):
    """#15.3: `sparsesr bench x2 --device tpu` was a RuntimeError traceback."""
    _, exported = tiny_files
    with pytest.raises(BackendError, match="--device tpu: expected auto, cpu, cuda or cuda:N"):
        benchmark_model(exported, size=8, device="tpu")
    with pytest.raises(BackendError, match="--device tpu"):
        peak_memory(exported, size=8, device="tpu")  # refused here, not as the child process's traceback
    assert main(["bench", "x2", "--device", "tpu", "--size", "8", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsesr bench: error: --device tpu: expected auto, cpu, cuda or cuda:N"]


def test_cli_bench_json_and_errors(tiny_files, capsys):
    _, exported = tiny_files
    code = main(["bench", str(exported), "--size", "8", "--threads", "1", "--repeats", "1", "--warmup", "0",
                 "--backend", SPARSE_BACKEND, "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["speedup"] == pytest.approx(result["dense"]["median_ms"] / result["sparse"]["median_ms"])
    assert "layers" not in result
    assert main(["bench", str(exported.parent / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["bench", str(exported), "--repeats", "0", "--threads", "1", "--size", "8"]) == 2


def test_peak_memory_in_a_child_process(tiny_files):
    _, exported = tiny_files
    result = peak_memory(exported, size=16, threads=1)
    assert result["kind"] == "sparse" and result["output_shape"] == [1, 3, 32, 32]
    assert result["rss_peak_bytes"] >= result["rss_before_bytes"] > 10 * 2**20  # torch alone is more
    assert result["forward_rss_bytes"] == result["rss_peak_bytes"] - result["rss_before_bytes"]


# --- bench/report.py ----------------------------------------------------------------------------

def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(name: str, median_s: float, **extra) -> dict:
    return {"name": name, "group": "g", "stats": {"median": median_s, "rounds": 3}, "extra_info": extra}


def _fake_raw() -> dict:
    layer = dict(suite="layer", layer="64to64_3x3", size=128, pattern="4x1", layout="bsr4x1", threads=2,
                 dense_gflops=50.0, sparse_effective_gflops=20.0)
    model = dict(suite="model", arch="edsr-baseline", scale=2, size=128, pattern="1x1", threads=2,
                 paths={"cpu": 34, "dense": 2})
    return {
        "machine_info": {"node": "my box/1", "python_version": "3.11.7", "cpu": {"brand_raw": "Test CPU"}},
        "commit_info": {"id": "0123456789abcdef"},
        "datetime": "2031-02-03T04:05:06.000000",
        "benchmarks": [
            _bench("test_layer[a]", 0.010, **layer, sparsity=0.9, dense_ms=40.0, sparse_ms=10.0, speedup=4.0),
            _bench("test_layer[b]", 0.030, **layer, sparsity=0.5, dense_ms=40.0, sparse_ms=30.0, speedup=4 / 3),
            _bench("test_model[a]", 0.1, **model, sparsity=0.95, dense_ms=300.0, sparse_ms=75.0, speedup=4.0,
                   channels_last_ms=240.0, speedup_vs_channels_last=3.2),
            _bench("test_file_size[a]", 0.2, suite="size", arch="edsr-cpu", scale=2, sparsity=0.9, pattern="4x1",
                   dtype="fp16", layout="bsr", dense_fp32_bytes=1382308, file_bytes=105252, size_ratio=0.0761),
            _bench("test_peak_memory[a]", 2.0, suite="memory", arch="edsr-cpu", scale=2, size=128, sparsity=0.9,
                   pattern="1x1", device="cpu", threads=2, dense_rss_peak_bytes=500 * 2**20,
                   sparse_rss_peak_bytes=400 * 2**20, dense_forward_rss_bytes=100 * 2**20,
                   sparse_forward_rss_bytes=60 * 2**20),
            _bench("test_kernel_only[x]", 0.5, threads=2),  # no "suite": another bench file, ignored
        ],
    }


def test_report_tables_and_files(tmp_path):
    report = _report_module()
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(_fake_raw()))
    paths = report.write_report([raw], tmp_path / "results", plots=False)
    assert [p.name for p in paths] == ["my-box-1-2031-02-03.json", "my-box-1-2031-02-03.md"]
    results = json.loads(paths[0].read_text())
    assert len(results["rows"]) == 5 and results["machine"] == "my-box-1"
    md = paths[1].read_text()
    assert "Test CPU" in md and "0123456789" in md and "torch threads: 2" in md
    layer_lines = [line for line in md.splitlines() if line.startswith("| 64to64_3x3")]
    assert layer_lines[0].startswith("| 64to64_3x3 | 128² | 4x1 | 50% |")  # sorted by sparsity
    assert "| 4.00× | 10.0× |" in layer_lines[1]  # measured speedup next to the FLOP ideal 1/(1-0.9)
    assert "| edsr-baseline ×2 | 128² | 1x1 | 95% | 34 cpu, 2 dense | 300.00 | 240.00 | 75.00 | 4.00× | 3.20× | 20.0× |" in md
    assert "| edsr-cpu ×2 | 4x1 | 90% | fp16 | bsr | 1350 | 103 | 8% |" in md
    assert "| edsr-cpu ×2 | 128² | 1x1 | 90% | cpu | 500 | 400 | 100 | 60 | - |" in md  # no CUDA column values
    assert "kernel_only" not in paths[0].read_text()


def test_report_plots_and_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = _report_module()
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(_fake_raw()))
    assert report.main([str(raw), "--out", str(tmp_path / "out"), "--machine", "ci"]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["ci-2031-02-03-latency.png", "ci-2031-02-03-size.png", "ci-2031-02-03-speedup.png",
                     "ci-2031-02-03.json", "ci-2031-02-03.md"]
    for name in names:
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_report_needs_input():
    with pytest.raises(ValueError, match="no pytest-benchmark"):
        _report_module().load_results([])


def test_report_updates_the_readme_block(tmp_path):
    report = _report_module()
    raw, readme = tmp_path / "raw.json", tmp_path / "README.md"
    raw.write_text(json.dumps(_fake_raw()))
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\nrest\n")
    report.write_report([raw], tmp_path / "results", plots=False, readme=[readme])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "old table" not in text
    assert "| one 3×3 64→64 conv | 128² | 4x1 | 90% | 40.00 | 10.00 | 4.00× | 10× |" in text
    assert "| edsr-baseline ×2 (whole model) | 128² | 1x1 | 95% | 300.00 | 75.00 | 4.00× | 20× |" in text
    assert "50%" not in text  # only the 90 % / 95 % rows
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        report.update_readme(readme, "x")


def test_readme_table_matches_the_committed_results():
    # README's numbers must be the ones in the newest committed bench/results JSON.
    results_dir = REPORT_PY.parent / "results"
    summaries = sorted(p for p in results_dir.glob("*.json") if not p.name.startswith("raw-"))
    if not summaries:
        pytest.skip("no committed benchmark results")
    newest = max(summaries, key=lambda p: p.stem[-10:])
    report = _report_module()
    results = json.loads(newest.read_text())
    for page in (REPORT_PY.parents[1] / "README.md", REPORT_PY.parents[1] / "docs" / "performance.md"):
        block = report.headline(results, newest.stem, Path(os.path.relpath(results_dir, page.parent)).as_posix())
        assert block in page.read_text(), page
