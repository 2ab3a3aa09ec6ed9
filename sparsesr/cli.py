"""The ``sparsesr`` command: parse arguments, call one library function, print, exit.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments
and sets ``func`` to a ``_run_<name>(args) -> int`` that calls the library. Library
imports happen inside the runners so ``sparsesr upscale`` never pays for training code.
User errors (``SparseSRError``) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sparsesr import __version__
from sparsesr.errors import SparseSRError


# --- subcommands: one block each ------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model, optionally pruning it (config file + overrides)",
        description="Train an SR model from a TOML config. Any config value can be overridden with "
        "--set section.key=value (e.g. --set train.iterations=500 --set prune.sparsity=0.9). "
        "Runs under `torchrun --nproc_per_node N` with DistributedDataParallel.",
    )
    p.add_argument("--config", "-c", help="TOML config file (see configs/); defaults apply when omitted")
    p.add_argument("--out", "-o", required=True, help="output folder for checkpoints, state and log")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from sparsesr.train import load_config, train

    config = load_config(args.config, args.overrides)
    result = train(config, args.out, resume=args.resume, progress=not args.quiet)
    val = f", validation PSNR {result.val_psnr:.2f} dB / SSIM {result.val_ssim:.4f}" if result.val_psnr else ""
    print(f"trained {result.steps} steps in {result.seconds:.0f} s{val}; model: {result.model_path}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="PSNR/SSIM (Y channel) of a model on image folders",
        description="Score a model on folders of HR images: LR made with MATLAB-style bicubic, PSNR and "
        "SSIM on the Y channel (BT.601) with `scale` pixels cropped, as in the published tables.",
    )
    p.add_argument("--model", "-m", default="bicubic", help="'bicubic', a checkpoint, or an exported sparse file")
    p.add_argument("--data", "-d", nargs="+", required=True, metavar="DIR", help="folders of HR images (one row each)")
    p.add_argument("--scale", "-s", type=int, choices=(2, 3, 4), help="upscaling factor (default: the model's; 2 for bicubic)")
    p.add_argument("--json", action="store_true", help="print {dataset: {psnr, ssim, images}} as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import json

    from sparsesr.evaluate import evaluate
    from sparsesr.upscalers import resolve_upscaler

    upscaler = resolve_upscaler(args.model, args.scale)
    results = evaluate(upscaler.fn, args.data, upscaler.scale, progress=not args.quiet)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{upscaler.description}")
    print(f"{'dataset':<12} {'images':>6} {'PSNR':>8} {'SSIM':>7}")
    for name, row in results.items():
        print(f"{name:<12} {row['images']:>6} {row['psnr']:>8.2f} {row['ssim']:>7.4f}")
    return 0



# --- entry point ----------------------------------------------------------------------------

_SUBCOMMANDS: list = []  # filled at the bottom of the file, in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsesr",
        description="Train, prune, export and run sparse super-resolution networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SparseSRError as exc:
        print(f"sparsesr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsesr {args.command}: interrupted", file=sys.stderr)
        return 130


_SUBCOMMANDS.extend([_add_train, _add_eval])

if __name__ == "__main__":
    sys.exit(main())
