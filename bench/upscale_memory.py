"""Peak RSS of one ``UpscaleEngine`` upscale of a large image, measured in a fresh process.

    python bench/upscale_memory.py --size 4000x3000 [--tile 0] [--path file|pixels|uint8] [--threads 2]

``--path file`` is what ``sparsesr upscale`` does after decoding: ``UpscaleEngine.upscale_image`` and
``write_image`` to a PNG, the pixels quantized band by band into the 8-bit storage the PNG holds.
``pixels`` stops at ``UpscaleEngine.upscale_pixels`` (float output), ``uint8`` at
``upscale_pixels(..., bit_depth=8)`` (the quantized storage, not encoded).
The input is random float32 pixels [3, H, W], as ``read_image`` returns them. The child resets
its peak (``/proc/self/clear_refs``) after importing torch and loading the model, so the reported
``upscale_bytes`` is what the upscale added on top of a loaded model and the input image.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, os, sys, tempfile, time
import torch

args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


from sparsesr.data.image_io import Image, stored_bit_depth, write_image
from sparsesr.upscaling import UpscaleEngine, UpscaleOptions

upscaler = UpscaleEngine.load(args["model"], UpscaleOptions(device="cpu", tile=args["tile"], tile_pad=args["tile_pad"]))
torch.manual_seed(0)
pixels = torch.rand(3, args["height"], args["width"])
with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS, so the peak is the upscale's own
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
if args["path"] == "file":  # as sparsesr upscale: quantized band by band to what the PNG stores
    with tempfile.TemporaryDirectory() as folder:
        target = os.path.join(folder, "out.png")
        write_image(target, upscaler.upscale_image(Image(pixels=pixels), bit_depth=stored_bit_depth(target, 8)))
elif args["path"] == "uint8":
    out = upscaler.upscale_pixels(pixels, bit_depth=8)
else:
    out = upscaler.upscale_pixels(pixels)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"rss_before_bytes": before, "rss_peak_bytes": status("VmHWM"), "seconds": seconds}))
"""


def measure(height: int, width: int, path: str = "file", tile: int = 0, tile_pad: int = 16,
            model: str | None = None, threads: int | None = None, timeout_s: float = 1800) -> dict:
    """Run one upscale in a child process; returns its peak RSS, RSS before, the difference and seconds."""
    args = {"height": height, "width": width, "path": path, "tile": tile, "tile_pad": tile_pad,
            "model": model, "threads": threads}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"upscale memory measurement failed (exit {proc.returncode}): {last}")
    result = {**args, **json.loads(lines[-1].removeprefix("RESULT "))}
    result["upscale_bytes"] = result["rss_peak_bytes"] - result["rss_before_bytes"]
    # What the old code allocated regardless of tiles: the float32 output [3, sH, sW] (scale 2 here).
    result["float_output_bytes"] = 3 * 4 * (2 * height) * (2 * width)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the input")
    parser.add_argument("--path", default="file", choices=("file", "pixels", "uint8"))
    parser.add_argument("--tile", type=int, default=0)
    parser.add_argument("--tile-pad", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    result = measure(height, width, args.path, args.tile, args.tile_pad, args.model, args.threads)
    mib = 2**20
    print(f"{args.size} x2 ({args.path}, tile {args.tile or 'auto'}): peak RSS {result['rss_peak_bytes'] / mib:.0f} MiB, "
          f"upscale added {result['upscale_bytes'] / mib:.0f} MiB (float32 output alone: "
          f"{result['float_output_bytes'] / mib:.0f} MiB), {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
