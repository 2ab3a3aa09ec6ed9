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
    p.add_argument("--config", "-c", help="TOML config file (see configs/); defaults apply when omitted; "
                   "not needed with --resume")
    p.add_argument("--out", "-o", required=True, help="output folder for checkpoints, state and log")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out exactly where it stopped, with the config saved in "
                   "--out/config.json; a -c/--set that differs from it is an error naming the keys "
                   "(only train.threads may change)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from sparsesr.train import load_config, resume_config, train

    if args.resume:  # the run's own config.json, checked against any -c/--set given
        config = resume_config(args.out, args.config, args.overrides)
    else:
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
    p.add_argument("--model", "-m", default="bicubic",
                   help="'bicubic', a checkpoint (any family), an exported sparse file, or an embedded model "
                   "(x2, x4, fast); models run on the sparse runtime")
    p.add_argument("--data", "-d", nargs="+", required=True, metavar="DIR", help="folders of HR images (one row each)")
    p.add_argument("--scale", "-s", type=int, choices=(2, 3, 4), help="upscaling factor (default: the model's; 2 for bicubic)")
    p.add_argument("--device", default="auto", help="where a model runs: auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="compute type of a model (auto: fp32); bf16 measures its cost: dense bf16 convolutions on "
                   "CPUs with AMX-BF16 (elsewhere on the CPU: a warning, and fp32)")
    p.add_argument("--json", action="store_true", help="print {dataset: {psnr, ssim, images}} as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import json

    from sparsesr.evaluate import evaluate, load_eval_model

    model = load_eval_model(args.model, args.scale, device=args.device, precision=args.precision,
                            warn=lambda message: print(f"sparsesr eval: warning: {message}", file=sys.stderr))
    results = evaluate(model.fn, args.data, model.scale, progress=not args.quiet)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(model.description)
    print(f"{'dataset':<12} {'images':>6} {'PSNR':>8} {'SSIM':>7}")
    for name, row in results.items():
        print(f"{name:<12} {row['images']:>6} {row['psnr']:>8.2f} {row['ssim']:>7.4f}")
    return 0


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="one-shot magnitude pruning of a checkpoint",
        description="Prune a trained checkpoint once by weight magnitude (global ranking by default) and save "
        "it with exact zeros. Fine-tune it afterwards with `sparsesr train --set model.init=OUT` and a "
        "[prune] method = \"magnitude\" section to keep the mask fixed.",
    )
    p.add_argument("checkpoint", help="a sparsesr checkpoint, a native file of any family (EDSR-PyTorch, BasicSR, "
                   "ESRGAN / Real-ESRGAN .pth), an exported file, or an embedded model (x2, x4, fast; an "
                   "existing file of that name wins)")
    p.add_argument("--sparsity", type=float, required=True,
                   help="fraction of prunable weights set to zero, in [0, 1), e.g. 0.9")
    # The same as sparsesr.train.oneshot.GRANULARITIES (a test checks), written out so that
    # building the parser imports no training code.
    p.add_argument("--granularity", default="1x1", choices=("1x1", "4x1", "8x1", "1x4"),
                   help="1x1 (unstructured), 4x1, 8x1 (output-channel blocks) or 1x4")
    p.add_argument("--balance", default="global", choices=("global", "layer_normalized", "uniform"),
                   help="how sparsity is spread over layers (default: one global magnitude ranking)")
    p.add_argument("--min-density", type=float, default=0.0,
                   help="keep at least this fraction of every layer, in [0, 1] (default: 0)")
    p.add_argument("-o", "--out", required=True,
                   help="output checkpoint file (.safetensors); a folder, or a path ending in '/', is an error")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    from sparsesr.train.oneshot import prune_checkpoint

    report = prune_checkpoint(args.checkpoint, args.out, args.sparsity, args.granularity, args.balance, args.min_density)
    print(f"pruned to {report['sparsity']:.4f} sparsity ({report['nonzeros']:,} of {report['numel']:,} weights kept); "
          f"wrote {args.out}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a compressed sparse model file",
        description="Convert a checkpoint (sparsesr, or a native file of any family: see docs/architectures.md) into the compressed safetensors "
        "format of docs/format.md: each conv stored dense, CSR or block-sparse (BSR).",
    )
    p.add_argument("checkpoint", help="the checkpoint to export: a checkpoint file, an exported file (re-exported, "
                   "e.g. to another --dtype), or an embedded model (x2, x4, fast; an existing file of that name wins)")
    p.add_argument("-o", "--out", required=True,
                   help="output file (.safetensors); a folder, or a path ending in '/', is an error")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="storage type of conv weights")
    p.add_argument("--layout", default="auto", choices=("auto", "csr", "bsr", "dense"),
                   help="auto: per layer from its zeros alone (bsr for block-pruned layers >= 30%% sparse, csr "
                   "for others >= 60%% sparse, else dense; docs/format.md), so every machine writes the same file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from sparsesr.format import export

    report = export(args.checkpoint, args.out, dtype=args.dtype, layout=args.layout).to_dict()
    _print_layers(report, args.json)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="layers, sparsity and size of a checkpoint or exported file",
        description="Print per-layer shape, layout, nonzeros and sparsity of a checkpoint or exported file, "
        "and the total sparsity over the pruned layers (all convs but the first and last).",
    )
    p.add_argument("file", help="a checkpoint, an exported sparse model file, or an embedded model (x2, x4, fast)")
    p.add_argument("--json", action="store_true", help="print JSON (top-level 'sparsity' over the pruned layers)")
    p.add_argument("--runtime", action="store_true", help="also load the model and show which backend each layer runs on")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpu", "dense"),
                   help="with --runtime: force every layer onto this backend (default: auto, per layer)")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from sparsesr.inspect import describe_model_file
    from sparsesr.pretrained import resolve_model

    path = str(resolve_model(args.file))
    info = describe_model_file(path)
    if args.runtime:
        import torch

        from sparsesr.runtime import load

        model = load(path, backend=args.backend)
        with torch.no_grad():  # the path each layer takes is decided when it first runs
            model(torch.rand(1, 3, 32, 32))
        info["runtime"] = model.backend_report()
    _print_layers(info, args.json)
    return 0


def _print_layers(info: dict, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    if "model" in info:
        print(info["model"])
    width = max(16, *(len(row["name"]) for row in info["layers"]))  # RRDBNet: body.22.rdb3.conv5
    print(f"{'layer':<{width}} {'shape':<18} {'layout':<6} {'dtype':<8} {'nonzeros':>9} {'sparsity':>8} {'bytes':>9}")
    for row in info["layers"]:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['name']:<{width}} {shape:<18} {row['layout']:<6} {row['dtype']:<8} {row['nnz']:>9,} "
              f"{row['sparsity']:>8.4f} {row['bytes']:>9,}")
    print(f"sparsity over pruned layers: {info['sparsity']:.4f}")
    if "dense_fp32_bytes" in info:
        print(f"file size: {info['size_bytes']:,} bytes = {info['size_bytes'] / info['dense_fp32_bytes']:.1%} "
              f"of the dense fp32 file ({info['dense_fp32_bytes']:,} bytes)")
    else:
        print(f"file size: {info['size_bytes']:,} bytes")
    if "runtime" in info:
        print("\nruntime (path each layer took on a 32x32 test input):")
        for row in info["runtime"]["layers"]:
            print(f"  {row['name']:<{width}} {row['layout']:<6} {row['path'] or '-':<7} {row['reason'] or ''}")
        for name, kernel in info["runtime"]["kernels"].items():
            state = f"available ({kernel.get('isa')})" if kernel["available"] and kernel.get("isa") else (
                "available" if kernel["available"] else f"unavailable: {kernel['reason']}")
            print(f"  {name} kernel: {state}")



def _add_upscale(sub) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale images (files, folders, globs) with a sparse model",
        description="Upscale PNG, JPEG, WebP, BMP, TIFF and GIF images (of an animated file, the first "
        "frame; GIF is written as PNG). Keeps alpha, grayscale, 16-bit depth, ICC profile and EXIF; tiles "
        "large images with feathered overlaps; never overwrites inputs, and never replaces an existing "
        "output without --overwrite. Options and -o are checked before the model loads, the "
        "output folders before any image is upscaled. Under `torchrun --nproc_per_node N` the inputs are split across the ranks. Exit code: "
        "0 done, 1 some images failed (one line each), 2 a problem with the command.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders or glob patterns (folders and globs skip earlier outputs "
                   "such as photo_x2.png next to photo.png, hidden files and temporary files)")
    p.add_argument("-o", "--output",
                   help="an existing folder, or a name ending in / (a folder, created if missing); or a file "
                   "name with an image extension (.png .jpg .jpeg .webp .tif .tiff .bmp), for one input. Any "
                   "other name (no extension, .gif, ...) is an error (default: next to each input)")
    p.add_argument("-m", "--model", help="embedded model (x2, x4, fast; see `sparsesr models`), an exported "
                   "file or a checkpoint (default: the embedded model for --scale)")
    p.add_argument("-s", "--scale", help="output scale, any number in (0, 16]; the model runs at its own scale "
                   "and the result is resized (default: the model's own, 2 without --model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="compute type (auto: fp32 on CPU, fp16 on CUDA). bf16 on the CPU runs dense bf16 convolutions "
                   "where the CPU has AMX-BF16 (up to 0.011 dB lower PSNR; see docs/models.md); a half type "
                   "without a fast path here runs fp32 with a warning")
    p.add_argument("--backend", default="auto", choices=("auto", "sparse", "dense"),
                   help="auto or sparse (the same): each layer takes the sparse kernel where it is measured "
                   "faster at the image's size, else dense; dense: dense convolutions only. The final "
                   "line says which paths ran, and why dense where it did")
    p.add_argument("--tile", type=int, default=0,
                   help="tile size in input pixels: 0 (automatic from free memory, the default) or at least 16")
    p.add_argument("--tile-pad", type=int, default=16, help="overlap between tiles, in input pixels (default: 16)")
    p.add_argument("--alpha", default="bicubic", choices=("bicubic", "model"),
                   help="how the alpha channel is upscaled (default: bicubic)")
    p.add_argument("--suffix", help="added to each output's name; {scale} is replaced, a leading - is fine, "
                   "no / (default: _x{scale}, e.g. photo_x2.png)")
    p.add_argument("--ext", default="auto", choices=("auto", "png", "jpg", "webp", "tiff"),
                   help="output format (auto: the input's own; PNG for GIF, and for BMP with alpha). "
                   "With -o FILE it must agree with FILE's extension")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality, 1-100 (default: 95; PNG, TIFF and WebP are written lossless)")
    p.add_argument("-r", "--recursive", action="store_true", help="walk folders recursively, mirroring the tree under -o")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave existing outputs alone (resume a batch); not with --overwrite")
    p.add_argument("--compare-dense", action="store_true",
                   help="also time the images with dense convolutions and print both model times")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_upscale)
    _take_dash_values(p, ("--suffix",))


def _take_dash_values(parser: argparse.ArgumentParser, options: tuple[str, ...]) -> None:
    """Let ``options`` take a value starting with "-" (``--suffix -up{scale}x``), which argparse
    reads as an unknown option. Such a pair is joined into ``--suffix=-up{scale}x`` before parsing,
    unless the value is (an abbreviation of) one of the parser's options: ``--suffix -q`` stays the
    error "expected one argument"."""
    parse_known_args = parser.parse_known_args

    def is_option(arg: str) -> bool:
        name = arg.split("=", 1)[0]
        strings = parser._option_string_actions  # argparse's own table of this parser's options
        return name in strings or (name.startswith("--") and any(s.startswith(name) for s in strings))

    def joined(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        out, i = [], 0
        while i < len(args):
            if args[i] == "--":  # everything after it is positional already
                out.extend(args[i:])
                break
            if args[i] in options and i + 1 < len(args) and args[i + 1].startswith("-") and not is_option(args[i + 1]):
                out.append(f"{args[i]}={args[i + 1]}")
                i += 2
                continue
            out.append(args[i])
            i += 1
        return parse_known_args(out, namespace)

    parser.parse_known_args = joined


def _run_upscale(args) -> int:
    from sparsesr.upscaling import upscale_files

    result = upscale_files(
        args.inputs, args.output, model=args.model, scale=args.scale, device=args.device,
        precision=args.precision, backend=args.backend, tile=args.tile, tile_pad=args.tile_pad,
        alpha=args.alpha, suffix=args.suffix, ext=args.ext, recursive=args.recursive,
        overwrite=args.overwrite, skip_existing=args.skip_existing, compare_dense=args.compare_dense,
        quality=args.quality, quiet=args.quiet,
    )
    print(result.summary())
    return 0 if result.ok else 1


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the embedded models",
        description="List the models shipped with sparsesr (usable as `sparsesr upscale --model NAME`), "
        "with sparsity, file size and PSNR read from each file.",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    import json

    from sparsesr.pretrained import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<6} {'scale':>5} {'sparsity':>8} {'size':>10} {'PSNR':<22} description")
    for row in rows:
        if not row["present"]:
            print(f"{row['name']:<6} {row['scale']:>5} {'-':>8} {'-':>10} {'-':<22} {row['description']} "
                  f"(not installed)")
            continue
        psnr = ", ".join(f"{k} {v:.2f}" for k, v in (row["psnr"] or {}).items()) or "-"
        print(f"{row['name']:<6} {row['scale']:>5} {row['sparsity']:>8.1%} {row['size_bytes'] / 1024:>8.0f} KB "
              f"{psnr:<22} {row['description']}")
    return 0



def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time a model dense vs sparse on this machine",
        description="Time one forward of MODEL with dense convolutions and with the sparse kernels "
        "(warm-up, then alternating rounds; median, min and max), print the speedup and the file size "
        "against dense fp32. The full benchmark suite is bench/run.sh (docs/performance.md).",
    )
    p.add_argument("model", metavar="MODEL", help="embedded model (x2, x4, fast), an exported file or a checkpoint")
    p.add_argument("--size", type=int, default=128, help="input (LR) image side in pixels (default: 128)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, usually all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "triton"),
                   help="sparse path to time against dense (default: auto, each layer its faster path)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of each (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--per-layer", action="store_true", help="also time every conv layer dense vs its path")
    p.add_argument("--peers", action="store_true",
                   help="instead, time the same weights on every installed CPU engine: sparsesr, PyTorch eager, "
                   "ONNX Runtime, OpenVINO (f32 and its default precision) and DeepSparse, in alternating rounds "
                   "after checking their outputs agree (tools/install_peers.sh installs them)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (top-level key `speedup`)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import json

    from sparsesr.benchmark import benchmark_model, format_result

    if args.peers:
        from sparsesr.peers import compare_engines, format_comparison

        if args.device not in ("auto", "cpu") or args.backend != "auto" or args.per_layer:
            raise SparseSRError("--peers compares CPU engines: it takes no --device, --backend or --per-layer")
        result = compare_engines(args.model, size=args.size, threads=args.threads, repeats=args.repeats,
                                 warmup=args.warmup)
        print(json.dumps(result, indent=2) if args.json else format_comparison(result))
        return 0
    result = benchmark_model(args.model, size=args.size, threads=args.threads, device=args.device,
                             backend=args.backend, repeats=args.repeats, warmup=args.warmup,
                             per_layer=args.per_layer)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0



# --- entry point ----------------------------------------------------------------------------

_SUBCOMMANDS: list = []  # filled at the bottom of the file, in the order --help lists them


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``sparsesr prune: error: ... (see --help)``), like
    every other user error of the command; subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    except OSError as exc:  # a file or folder the user named cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sparsesr {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsesr {args.command}: interrupted", file=sys.stderr)
        return 130


_SUBCOMMANDS.extend([_add_train, _add_eval, _add_prune, _add_export, _add_info])
_SUBCOMMANDS.extend([_add_upscale, _add_models])
_SUBCOMMANDS.append(_add_bench)

if __name__ == "__main__":
    sys.exit(main())
