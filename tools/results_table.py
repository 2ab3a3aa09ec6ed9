"""Turn the runs of tools/reproduce_x2.sh into the table and plot of docs/results.md.

    python tools/results_table.py [--runs runs] [--out docs]

Reads runs/<name>/eval.json (from `sparsesr eval --json`), runs/<name>/model.safetensors
(sparsity from the weights themselves) and runs/<name>/log.jsonl (wall time); prints a Markdown
table and writes docs/results-x2.json and docs/results-x2.png (PSNR on each set against sparsity).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SETS = ("Set5", "Set14", "BSD100")


def collect(runs: Path) -> list[dict]:
    from sparsesr.inspect import describe_model_file

    rows = []
    for eval_json in sorted(runs.glob("*-x2*/eval.json")):
        name = eval_json.parent.name
        scores = json.loads(eval_json.read_text())
        row = {"name": name, "scores": {s: scores[s] for s in SETS if s in scores}}
        model = eval_json.parent / "model.safetensors"
        if name.startswith("bicubic"):
            row.update(method="bicubic", sparsity=0.0, seed=None)
        else:
            info = describe_model_file(model)
            pruning = info.get("pruning") or {}
            method = pruning.get("method") or (pruning.get("config") or {}).get("method") or "dense"
            seed = re.search(r"seed(\d+)", name)
            row.update(method=method, sparsity=info["sparsity"], seed=int(seed.group(1)) if seed else 0)
        log = eval_json.parent / "log.jsonl"
        times = [json.loads(line).get("time") for line in log.read_text().splitlines()] if log.is_file() else []
        row["seconds"] = max((t for t in times if t is not None), default=None)
        rows.append(row)
    order = {"bicubic": 0, "dense": 1}
    return sorted(rows, key=lambda r: (order.get(r["method"], 2), round(r["sparsity"], 2), r["method"], r["seed"] or 0))


def markdown(rows: list[dict]) -> str:
    head = "| model | method | sparsity | seed | " + " | ".join(f"{s} PSNR / SSIM" for s in SETS) + " | train time |"
    lines = [head, "|" + "---|" * (5 + len(SETS))]
    for r in rows:
        cells = []
        for s in SETS:
            sc = r["scores"].get(s)
            cells.append(f"{sc['psnr']:.2f} / {sc['ssim']:.4f}" if sc else "—")
        seconds = f"{r['seconds'] / 60:.0f} min" if r["seconds"] else "—"
        seed = "—" if r["seed"] is None else str(r["seed"])
        lines.append(f"| {r['name']} | {r['method']} | {r['sparsity']:.3f} | {seed} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(4 * len(SETS), 3.4))
    for ax, s in zip(axes, SETS):
        for method, style in (("magnitude", "o-"), ("dup", "s-")):
            pts = sorted((r["sparsity"], r["scores"][s]["psnr"]) for r in rows if r["method"] == method and s in r["scores"])
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        for method, color in (("dense", "k"), ("bicubic", "gray")):
            for r in rows:
                if r["method"] == method and s in r["scores"]:
                    ax.axhline(r["scores"][s]["psnr"], color=color, ls="--", lw=1, label=method)
                    break
        ax.set_title(f"{s} (x2)")
        ax.set_xlabel("sparsity of pruned layers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (Y) dB")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", type=Path)
    parser.add_argument("--out", default="docs", type=Path)
    args = parser.parse_args()
    rows = collect(args.runs)
    (args.out / "results-x2.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "results-x2.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
