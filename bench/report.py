"""Turn pytest-benchmark JSON files into results: a JSON summary, a Markdown table and PNG plots.

    python bench/report.py RAW.json [MORE.json ...] [--out bench/results] [--machine NAME]

Writes ``<out>/<machine>-<date>.json`` (one row per case: the suite's ``extra_info`` plus
pytest-benchmark's statistics), ``<machine>-<date>.md`` (one table per suite) and, when matplotlib
is installed, ``<machine>-<date>-latency.png``, ``-speedup.png`` (with the FLOP-ideal 1/(1-s)
line) and ``-size.png``. ``<machine>`` defaults to the host name pytest-benchmark recorded,
``<date>`` to the date of the first run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from sparsesr.fileio import atomic_write_bytes


def load_results(paths: list[str | Path], machine: str | None = None) -> dict:
    """Merge pytest-benchmark JSON files into ``{"machine", "date", "machine_info", "commit_info", "rows"}``."""
    rows, first = [], None
    for path in paths:
        raw = json.loads(Path(path).read_text())
        first = first or raw
        for bench in raw.get("benchmarks", []):
            info = bench.get("extra_info") or {}
            if "suite" not in info:  # a benchmark from another suite (e.g. the kernels' own)
                continue
            stats = bench.get("stats") or {}
            rows.append({**info, "name": bench["name"], "group": bench.get("group"),
                         "benchmark_median_ms": stats.get("median", 0.0) * 1e3,
                         "benchmark_rounds": stats.get("rounds")})
    if first is None:
        raise ValueError("no pytest-benchmark JSON files given")
    machine_info = first.get("machine_info", {})
    name = machine or machine_info.get("node") or "machine"
    return {
        "machine": re.sub(r"[^A-Za-z0-9_.-]+", "-", name),
        "date": str(first.get("datetime", ""))[:10] or "undated",
        "machine_info": machine_info,
        "commit_info": first.get("commit_info", {}),
        "rows": rows,
    }


def ideal_speedup(sparsity: float) -> float:
    """What removing the pruned FLOPs alone would give: 1 / (1 - s)."""
    return 1.0 / (1.0 - sparsity) if sparsity < 1 else float("inf")


def _table(rows: list[dict], columns: list[tuple[str, object]]) -> str:
    """Markdown table; ``columns`` are (header, row -> str)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, fn in columns:
            try:
                cells.append(fn(row))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(key):
    return lambda r: f"{r[key]:.2f}"


def _x(key):
    return lambda r: f"{r[key]:.2f}×"


def _pct(key):
    return lambda r: f"{r[key]:.0%}"


def _model(r):
    return f"{r['arch']} ×{r['scale']}"


def _counts(key):
    return lambda r: ", ".join(f"{n} {k}" for k, n in sorted(r[key].items()))


SUITES = {  # suite: (title, sort key, columns)
    "layer": ("Per layer (CPU kernel vs dense F.conv2d)", lambda r: (r["layer"], r["size"], r["pattern"], r["sparsity"]), [
        ("layer", lambda r: r["layer"]), ("size", lambda r: f"{r['size']}²"), ("pattern", lambda r: r["pattern"]),
        ("sparsity", _pct("sparsity")), ("layout", lambda r: r["layout"]), ("dense ms", _ms("dense_ms")),
        ("sparse ms", _ms("sparse_ms")), ("speedup", _x("speedup")),
        ("FLOP ideal", lambda r: f"{ideal_speedup(r['sparsity']):.1f}×"),
        ("dense GFLOP/s", lambda r: f"{r['dense_gflops']:.1f}"),
        ("sparse eff. GFLOP/s", lambda r: f"{r['sparse_effective_gflops']:.1f}"),
    ]),
    "model": ("Whole model (sparse runtime vs PyTorch eager, same weights)",
              lambda r: (r["arch"], r["scale"], r["size"], r["pattern"], r["sparsity"]), [
        ("model", _model), ("LR size", lambda r: f"{r['size']}²"), ("pattern", lambda r: r["pattern"]),
        ("sparsity", _pct("sparsity")), ("layer paths", _counts("paths")), ("eager ms", _ms("dense_ms")),
        ("channels_last ms", _ms("channels_last_ms")), ("sparse ms", _ms("sparse_ms")),
        ("speedup vs eager", _x("speedup")), ("vs channels_last", _x("speedup_vs_channels_last")),
        ("FLOP ideal", lambda r: f"{ideal_speedup(r['sparsity']):.1f}×"),
    ]),
    "model_onnxruntime": ("Whole model vs ONNX Runtime", lambda r: (r["arch"], r["size"], r["sparsity"]), [
        ("model", _model), ("LR size", lambda r: f"{r['size']}²"), ("sparsity", _pct("sparsity")),
        ("onnxruntime ms", _ms("dense_ms")), ("torch eager ms", _ms("torch_eager_ms")),
        ("sparse ms", _ms("sparse_ms")), ("speedup vs ORT", _x("speedup")),
    ]),
    "peers": ("Same weights on every CPU engine (medians of alternating rounds, ms; lead = fastest peer / sparsesr)",
              lambda r: (r["pattern"] == "shipped", r["model"], r["size"], r["pattern"], r["sparsity"]), [
        ("model", lambda r: r["model"]), ("LR size", lambda r: f"{r['size']}²"), ("pattern", lambda r: r["pattern"]),
        ("sparsity", _pct("sparsity")), ("sparsesr", _ms("sparsesr_ms")), ("PyTorch", _ms("pytorch_ms")),
        ("ONNX Runtime", _ms("onnxruntime_ms")), ("OpenVINO f32", _ms("openvino_f32_ms")),
        ("OpenVINO default", lambda r: f"{r['openvino_ms']:.2f} ({r['openvino_precision']})"),
        ("DeepSparse", _ms("deepsparse_ms")),
        ("vs eager", lambda r: f"{r['pytorch_ms'] / r['sparsesr_ms']:.2f}×"),
        ("lead", lambda r: f"{r['lead']:.2f}× ({r['fastest_peer']})"),
    ]),
    "model_cuda": ("Whole model on CUDA (Triton vs cuDNN)", lambda r: (r["arch"], r["size"], r["precision"], r["sparsity"]), [
        ("model", _model), ("LR size", lambda r: f"{r['size']}²"), ("precision", lambda r: r["precision"]),
        ("pattern", lambda r: r["pattern"]), ("sparsity", _pct("sparsity")), ("cuDNN ms", _ms("dense_ms")),
        ("Triton ms", _ms("sparse_ms")), ("speedup", _x("speedup")),
    ]),
    "memory": ("Peak memory of one forward (fresh process)", lambda r: (r["arch"], r["size"], r["pattern"], r["sparsity"]), [
        ("model", _model), ("LR size", lambda r: f"{r['size']}²"), ("pattern", lambda r: r["pattern"]),
        ("sparsity", _pct("sparsity")), ("device", lambda r: r["device"]),
        ("dense peak RSS MB", lambda r: f"{r['dense_rss_peak_bytes'] / 2**20:.0f}"),
        ("sparse peak RSS MB", lambda r: f"{r['sparse_rss_peak_bytes'] / 2**20:.0f}"),
        ("dense forward MB", lambda r: f"{r['dense_forward_rss_bytes'] / 2**20:.0f}"),
        ("sparse forward MB", lambda r: f"{r['sparse_forward_rss_bytes'] / 2**20:.0f}"),
        ("CUDA peak dense / sparse MB",
         lambda r: f"{r['dense_cuda_peak_bytes'] / 2**20:.0f} / {r['sparse_cuda_peak_bytes'] / 2**20:.0f}"),
    ]),
    "size": ("File size (dense fp32 safetensors vs exported file)", lambda r: (r["arch"], r["pattern"], r["dtype"], r["sparsity"]), [
        ("model", _model), ("pattern", lambda r: r["pattern"]), ("sparsity", _pct("sparsity")),
        ("dtype", lambda r: r["dtype"]), ("layout", lambda r: r["layout"]),
        ("dense fp32 KB", lambda r: f"{r['dense_fp32_bytes'] / 1024:.0f}"),
        ("file KB", lambda r: f"{r['file_bytes'] / 1024:.0f}"), ("ratio", _pct("size_ratio")),
    ]),
}


def markdown(results: dict) -> str:
    """One Markdown table per suite present in ``results``."""
    info = results["machine_info"]
    cpu = (info.get("cpu") or {}).get("brand_raw", "unknown CPU")
    threads = sorted({r["threads"] for r in results["rows"] if "threads" in r})
    commit = (results.get("commit_info") or {}).get("id", "")[:10]
    lines = [f"# Benchmark results: {results['machine']}, {results['date']}", "",
             f"CPU: {cpu}; torch threads: {', '.join(map(str, threads)) or '-'}; "
             f"Python {info.get('python_version', '?')}; commit {commit or '?'}.",
             "Times are medians of interleaved rounds (wall clock, ms); speedup = dense / sparse from the same run.", ""]
    by_suite = defaultdict(list)
    for row in results["rows"]:
        by_suite[row["suite"]].append(row)
    for suite, (title, key, columns) in SUITES.items():
        if by_suite.get(suite):
            lines += [f"## {title}", "", _table(sorted(by_suite[suite], key=key), columns), ""]
    return "\n".join(lines)


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def headline(results: dict, stem: str, results_dir: str = "bench/results") -> str:
    """The short table README shows: whole models and the 64->64 layer at 90 % / 95 %."""
    info = results["machine_info"]
    cpu = (info.get("cpu") or {}).get("brand_raw", "unknown CPU")
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in results["rows"] if "threads" in r})) or "-"
    commit = (results.get("commit_info") or {}).get("id", "")[:10] or "?"
    picked = [r for r in results["rows"] if r["sparsity"] in (0.9, 0.95) and (
        r["suite"] == "model" or (r["suite"] == "layer" and r["layer"] == "64to64_3x3"))]
    picked.sort(key=lambda r: (r["suite"] != "model", r.get("arch", ""), r["size"], r["pattern"], r["sparsity"]))
    what = lambda r: (f"{r['arch']} ×{r['scale']} (whole model)" if r["suite"] == "model"  # noqa: E731
                      else "one 3×3 64→64 conv")
    table = _table(picked, [
        ("network", what), ("input", lambda r: f"{r['size']}²"), ("pattern", lambda r: r["pattern"]),
        ("sparsity", _pct("sparsity")), ("PyTorch dense ms", _ms("dense_ms")), ("sparsesr ms", _ms("sparse_ms")),
        ("speedup", _x("speedup")), ("FLOP ideal", lambda r: f"{ideal_speedup(r['sparsity']):.0f}×"),
    ])
    peers = [r for r in results["rows"] if r["suite"] == "peers"]
    if peers:  # the engines a user could deploy the same weights on (bench/test_bench_peers.py)
        title, key, columns = SUITES["peers"]
        cpu = peers[0].get("cpu", cpu)
        table += ("\n\nThe same weights on every CPU engine installed (`bench/test_bench_peers.py`; "
                  f"{cpu}; ms, medians of alternating rounds; lead = fastest peer's time / sparsesr's, "
                  "above 1 means sparsesr is faster):\n\n" + _table(sorted(peers, key=key), columns))
    return "\n".join([
        README_START,
        f"Measured by `bench/run.sh` on {results['machine']} ({cpu}, {threads} torch threads), {results['date']}, "
        f"commit {commit}; random magnitude-pruned weights, fp32, CPU kernel vs PyTorch eager in the same run. "
        f"All tables: [`{results_dir}/{stem}.md`]({results_dir}/{stem}.md).",
        "",
        table,
        "",
        f"![speedup against sparsity]({results_dir}/{stem}-speedup.png)",
        README_END,
    ])


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the bench markers of ``readme`` with ``block``."""
    text = readme.read_text()
    start = text.find(README_START)
    end = text.find(README_END, start) if start >= 0 else -1
    if end < 0:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} block to replace")
    atomic_write_bytes(readme, (text[:start] + block + text[end + len(README_END):]).encode())


def _config(row: dict) -> str:
    if row["suite"] == "layer":
        return f"{row['layer']} {row['size']}² {row['pattern']}"
    extra = f" {row['precision']}" if "precision" in row else ""
    return f"{row['arch']} ×{row['scale']} {row['size']}² {row['pattern']}{extra}"


def plot(results: dict, out_dir: Path, stem: str) -> list[Path]:
    """Latency, speedup (with 1/(1-s)) and size vs sparsity as PNGs; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install sparsesr[plots])", file=sys.stderr)
        return []
    timed = [r for r in results["rows"] if r["suite"] in ("layer", "model", "model_cuda")]
    sizes = [r for r in results["rows"] if r["suite"] == "size"]
    written = []

    def lines_by(rows, label, y):
        series = defaultdict(list)
        for row in rows:
            series[label(row)].append((row["sparsity"], y(row)))
        return {name: sorted(points) for name, points in sorted(series.items())}

    suites = [s for s in ("layer", "model", "model_cuda") if any(r["suite"] == s for r in timed)]
    if suites:
        fig, axes = plt.subplots(len(suites), 2, figsize=(13, 4.5 * len(suites)), squeeze=False)
        for (ax_latency, ax_speedup), suite in zip(axes, suites):
            rows = [r for r in timed if r["suite"] == suite]
            for name, points in lines_by(rows, _config, lambda r: r["sparse_ms"]).items():
                ax_latency.plot(*zip(*points), marker="o", label=f"sparse {name}")
            for name, points in lines_by(rows, _config, lambda r: r["dense_ms"]).items():
                ax_latency.plot(*zip(*points), linestyle=":", marker="x", label=f"dense {name}")
            ax_latency.set(title=f"{suite}: latency", xlabel="sparsity", ylabel="ms (median)", yscale="log")
            for name, points in lines_by(rows, _config, lambda r: r["speedup"]).items():
                ax_speedup.plot(*zip(*points), marker="o", label=name)
            grid = sorted({r["sparsity"] for r in rows})
            ax_speedup.plot(grid, [ideal_speedup(s) for s in grid], "k--", label="FLOP ideal 1/(1-s)")
            ax_speedup.axhline(1.0, color="grey", linewidth=0.8)
            ax_speedup.set(title=f"{suite}: speedup (dense / sparse)", xlabel="sparsity", ylabel="×", yscale="log")
            for ax in (ax_latency, ax_speedup):
                ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out_dir / f"{stem}-speedup.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        # latency alone as well, larger, for the docs
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, points in lines_by([r for r in timed if r["suite"] == suites[0]], _config,
                                     lambda r: r["sparse_ms"]).items():
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set(title=f"{suites[0]}: sparse latency vs sparsity", xlabel="sparsity", ylabel="ms (median)", yscale="log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"{stem}-latency.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 5))
        label = lambda r: f"{r['arch']} {r['pattern']} {r['dtype']}"  # noqa: E731
        for name, points in lines_by(sizes, label, lambda r: r["size_ratio"]).items():
            ax.plot(*zip(*points), marker="o", label=name)
        grid = sorted({r["sparsity"] for r in sizes})
        ax.plot(grid, [1 - s for s in grid], "k--", label="values only, fp32 (1-s)")
        ax.set(title="file size / dense fp32", xlabel="sparsity", ylabel="ratio")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"{stem}-size.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(paths: list[str | Path], out_dir: str | Path = "bench/results", machine: str | None = None,
                 plots: bool = True, readme: list[str | Path] = ()) -> list[Path]:
    """Read the raw JSON files, write the summary JSON, the Markdown and the plots; return their paths.

    Also put the headline table (``headline``) between the bench markers of each file in ``readme``."""
    results = load_results(paths, machine)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['machine']}-{results['date']}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results))
    written = [json_path, md_path] + (plot(results, out_dir, stem) if plots else [])
    for path in readme:  # links relative to the page, so they work on GitHub from docs/ too
        update_readme(Path(path), headline(results, stem, Path(os.path.relpath(out_dir, Path(path).parent)).as_posix()))
        written.append(Path(path))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    parser.add_argument("--machine", help="machine name in the file names (default: the recorded host name)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--readme", action="append", default=[],
                        help="also update the headline table between the bench markers of this file (repeatable)")
    args = parser.parse_args(argv)
    for path in write_report(args.raw, args.out, args.machine, plots=not args.no_plots, readme=args.readme):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
