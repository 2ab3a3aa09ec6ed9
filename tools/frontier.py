"""The PSNR-latency frontier of docs/results.md (issue #13): which sparse models no dense model beats.

    python tools/frontier.py --sparse runs/dup-x2b-s90 runs/dup-x2b-s90-4x1 ... \
        --dense runs/dense-x2-baseline runs/dense-x2-long [--size 256] [--threads 2] [--out docs/frontier-x2]

Each argument is a run folder holding ``model.safetensors`` and ``eval.json`` (``sparsesr eval
--json`` on Set5, Set14 and BSD100, as tools/runs.sh writes it), or a model file ``NAME.safetensors``
with its scores beside it as ``NAME.eval.json`` (as checkpoints/ keeps finished runs). The sparse models are timed on sparsesr; the dense
ones on every engine installed (``sparsesr.peers.compare_engines``: PyTorch, ONNX Runtime,
OpenVINO f32 and its default precision, DeepSparse), all in this one process and run. A model is
on the frontier when no dense point (model x engine) is both at most as slow and at least as good
on Set5 and on BSD100 (docs/results.md, decision rule 1). Writes ``OUT.json`` and ``OUT.md`` (and
``OUT.png`` with matplotlib); prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETS = ("Set5", "BSD100")  # the two the decision rules use


def scores_of(entry: Path) -> tuple[Path, dict]:
    """(model file, {set: psnr}) of a run folder or of ``NAME.safetensors`` with ``NAME.eval.json``."""
    model, scores = (entry / "model.safetensors", entry / "eval.json") if entry.is_dir() else \
        (entry, entry.with_suffix(".eval.json"))
    if not model.is_file() or not scores.is_file():
        raise SystemExit(f"{entry}: expected {model.name} and {scores.name} there")
    data = json.loads(scores.read_text())
    missing = [s for s in SETS if s not in data]
    if missing:
        raise SystemExit(f"{scores}: no scores for {', '.join(missing)}")
    return model, {s: float(data[s]["psnr"]) for s in SETS}


def dominated_by(point: dict, dense_points: list[dict]) -> list[dict]:
    """The dense points at most as slow as ``point`` and at least as good on every set."""
    return [d for d in dense_points if d["ms"] <= point["ms"] and all(d["psnr"][s] >= point["psnr"][s] for s in SETS)]


def mark_frontier(sparse_points: list[dict], dense_points: list[dict]) -> None:
    """Set ``on_frontier`` and ``beaten_by`` (the dense points that dominate it) on each sparse point."""
    for point in sparse_points:
        beaten = dominated_by(point, dense_points)
        point["on_frontier"] = not beaten
        point["beaten_by"] = [f"{d['name']} on {d['engine']}" for d in beaten]


def measure(sparse: list[Path], dense: list[Path], size: int, threads: int, repeats: int) -> dict:
    from sparsesr.peers import compare_engines, cpu_description

    sparse_points, dense_points = [], []
    for entry in sparse:
        model, psnr = scores_of(entry)
        result = compare_engines(model, size=size, threads=threads, repeats=repeats, engines=("sparsesr",))
        row = result["rows"][0]
        sparse_points.append({"name": entry.name, "engine": "sparsesr", "ms": row["median_ms"], "psnr": psnr})
    for entry in dense:
        model, psnr = scores_of(entry)
        result = compare_engines(model, size=size, threads=threads, repeats=repeats)
        for row in result["rows"]:
            if "median_ms" in row:
                engine = row["engine"] + (f" ({row['precision']})" if row["engine"] == "openvino" else "")
                dense_points.append({"name": entry.name, "engine": engine, "ms": row["median_ms"], "psnr": psnr})
    mark_frontier(sparse_points, dense_points)
    return {"size": size, "threads": threads, "repeats": repeats, "cpu": cpu_description(),
            "sparse": sparse_points, "dense": dense_points}


def markdown(result: dict) -> str:
    lines = [f"{result['cpu']}; {result['size']}² input, {result['threads']} threads, medians of "
             f"{result['repeats']} alternating rounds", "",
             "| model | engine | ms | " + " | ".join(f"{s} PSNR" for s in SETS) + " | on the frontier |",
             "|---|---|---|" + "---|" * len(SETS) + "---|"]
    for p in sorted(result["sparse"] + result["dense"], key=lambda p: p["ms"]):
        if "on_frontier" in p:
            verdict = "yes" if p["on_frontier"] else "no: " + ", ".join(p["beaten_by"])
        else:
            verdict = "(dense)"
        cells = " | ".join(f"{p['psnr'][s]:.2f}" for s in SETS)
        lines.append(f"| {p['name']} | {p['engine']} | {p['ms']:.1f} | {cells} | {verdict} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(5.5 * len(SETS), 4.2))
    for ax, s in zip(axes, SETS):
        for p in result["dense"]:
            ax.plot(p["ms"], p["psnr"][s], "o", color="gray", alpha=0.7)
            ax.annotate(f"{p['name']} / {p['engine']}", (p["ms"], p["psnr"][s]), fontsize=5)
        for p in result["sparse"]:
            ax.plot(p["ms"], p["psnr"][s], "*" if p["on_frontier"] else "x", ms=9,
                    color="tab:red" if p["on_frontier"] else "tab:blue")
            ax.annotate(p["name"], (p["ms"], p["psnr"][s]), fontsize=6)
        ax.set(xscale="log", xlabel=f"ms at {result['size']}², {result['threads']} threads", ylabel=f"{s} PSNR (Y) dB")
        ax.grid(alpha=0.3)
    fig.suptitle("sparse models on sparsesr (stars: on the frontier) and dense models on every engine", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparse", nargs="+", type=Path, required=True, help="run folders (or files) of sparse models")
    parser.add_argument("--dense", nargs="+", type=Path, required=True, help="run folders (or files) of dense models")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write OUT.json, OUT.md (and OUT.png)")
    args = parser.parse_args(argv)
    result = measure(args.sparse, args.dense, args.size, args.threads, args.repeats)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
        try:
            plot(result, args.out.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
