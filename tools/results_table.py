"""Turn the runs of tools/reproduce_x2.sh into the table and plot of docs/results.md.

    python tools/results_table.py [--runs runs] [--out docs]

Reads runs/<name>/eval.json (from `sparsesr eval --json`), runs/<name>/model.safetensors
(sparsity from the weights themselves, the parent from its ``init`` metadata) and
runs/<name>/log.jsonl (wall time); prints one Markdown table per (scale, dense parent) and writes
docs/results-x<scale>.json and .png (PSNR on each set against sparsity).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sparsesr.train import read_log

SETS = ("Set5", "Set14", "BSD100")


def collect(runs: Path) -> list[dict]:
    """One row per runs/<name>/eval.json: scores, method, sparsity, seed, variant, parent, scale, time."""
    from sparsesr.inspect import describe_model_file
    from sparsesr.models.checkpoint import load_checkpoint

    rows = []
    for eval_json in sorted(runs.glob("*/eval.json")):
        name = eval_json.parent.name
        scores = json.loads(eval_json.read_text())
        row = {"name": name, "scores": {s: scores[s] for s in SETS if s in scores}, "variant": None, "parent": None}
        model = eval_json.parent / "model.safetensors"
        if name.startswith("bicubic"):
            row.update(method="bicubic", sparsity=0.0, seed=None, scale=int(re.search(r"x(\d)", name).group(1)))
        else:
            info = describe_model_file(model)
            pruning = info.get("pruning") or {}
            method = pruning.get("method") or (pruning.get("config") or {}).get("method") or "dense"
            seed = re.search(r"seed(\d+)", name)  # the name's, else the run config's
            # an ablation's name ends in what it switched off: dup-x2-s90-noshrink
            variant = re.search(r"-s\d+(?:-seed\d+)?-(no\w+)$", name)
            metadata = load_checkpoint(model).metadata
            init = metadata.get("init") or {}
            config_seed = (metadata.get("train_config") or {}).get("train", {}).get("seed", 0)
            row.update(method=method, sparsity=info["sparsity"], seed=int(seed.group(1)) if seed else config_seed,
                       scale=info["scale"], variant=variant.group(1) if variant else None,
                       parent=parent_name(init.get("path")))
        log = eval_json.parent / "log.jsonl"
        times = [record.get("time") for record in read_log(log)]  # skips a torn last line
        row["seconds"] = wall_seconds([t for t in times if t is not None])
        rows.append(row)
    order = {"bicubic": 0, "dense": 1}
    return sorted(rows, key=lambda r: (r["scale"], order.get(r["method"], 2), round(r["sparsity"], 2), r["method"],
                                       r["variant"] or "", r["seed"] or 0))


def parent_name(init_path: str | None) -> str | None:
    """The run a model started from: runs/<name>/model.safetensors -> name; a kept file
    (checkpoints/edsr-cpu-x2-dense-long.safetensors) -> its stem."""
    if not init_path:
        return None
    path = Path(init_path)
    return path.stem if path.parent.name == "checkpoints" else path.parent.name


def wall_seconds(times: list[float]) -> float | None:
    """Training wall time from the log's running clock, which restarts at 0 when a run is resumed."""
    total, last = 0.0, 0.0
    for t in times:
        if t < last:  # a resume: the previous segment ended at `last`
            total += last
        last = t
    return total + last if times else None


def experiments(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """Rows grouped by (scale, dense parent): bicubic, the parent itself, then what was pruned from it."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        if r["parent"] is not None and r["method"] != "dense":  # a dense row's parent is only its start
            groups.setdefault((r["scale"], r["parent"]), [])
    for (scale, parent), members in groups.items():
        members += [r for r in rows if r["scale"] == scale and (r["method"] == "bicubic" or r["name"] == parent
                                                                 or r["parent"] == parent)]
    return groups


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
        method = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(f"| {r['name']} | {method} | {r['sparsity']:.3f} | {seed} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """PSNR against sparsity per test set: a line per (parent, method), ablations as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(4.4 * len(SETS), 3.8))
    parents = sorted({r["parent"] for r in rows if r["parent"] and r["method"] != "dense"})
    for ax, s in zip(axes, SETS):
        for i, parent in enumerate(parents):
            for method, style in (("magnitude", "o-"), ("dup", "s-"), ("gmp", "^-")):
                by_sparsity: dict[float, list[float]] = {}
                for r in rows:
                    if r["parent"] == parent and r["method"] == method and not r["variant"] and s in r["scores"]:
                        by_sparsity.setdefault(round(r["sparsity"], 3), []).append(r["scores"][s]["psnr"])
                if by_sparsity:  # seeds averaged
                    pts = sorted((k, sum(v) / len(v)) for k, v in by_sparsity.items())
                    ax.plot(*zip(*pts), style, alpha=1.0 if i == len(parents) - 1 else 0.5,
                            label=f"{method} (from {parent})")
            for r in rows:
                if r["name"] == parent and s in r["scores"]:
                    ax.axhline(r["scores"][s]["psnr"], color="k", ls="--", lw=1, alpha=0.4 + 0.6 * (i == len(parents) - 1),
                               label=f"dense {parent}")
        for r in rows:
            if r["variant"] and s in r["scores"]:
                ax.plot(r["sparsity"], r["scores"][s]["psnr"], "x", ms=8, label=f"dup, {r['variant']} ({r['parent']})")
        for r in rows:
            if r["method"] == "bicubic" and s in r["scores"]:
                ax.axhline(r["scores"][s]["psnr"], color="gray", ls=":", lw=1, label="bicubic")
        ax.set_title(f"{s} (x{rows[0]['scale']})")
        ax.set_xlabel("sparsity of pruned layers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (Y) dB")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", type=Path)
    parser.add_argument("--out", default="docs", type=Path)
    args = parser.parse_args()
    rows = collect(args.runs)
    for scale in sorted({r["scale"] for r in rows}):
        scaled = [r for r in rows if r["scale"] == scale]
        (args.out / f"results-x{scale}.json").write_text(json.dumps(scaled, indent=2) + "\n")
        if any(r["parent"] and r["method"] != "dense" for r in scaled):
            plot(scaled, args.out / f"results-x{scale}.png")
    for (scale, parent), members in experiments(rows).items():
        print(f"\n### x{scale}, pruned from {parent}\n")
        print(markdown(members))


if __name__ == "__main__":
    main()
