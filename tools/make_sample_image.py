"""Render the sample image ``sparsesr/assets/sample.png`` procedurally (no external data).

256 x 256 RGB, four quadrants whose upscaling is worth looking at:
- top left: a zone plate (rings of rising frequency: aliasing and ringing show at once);
- top right: hand-made stroke lettering "SPARSE SR" in several sizes (text edges);
- bottom left: hard-edged shapes at odd angles over a colour gradient (edges, colour bleeding);
- bottom right: a woven / noisy texture (fine detail that bicubic blurs away).

    python tools/make_sample_image.py [-o sparsesr/assets/sample.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256
HALF = SIZE // 2

# A tiny stroke font: each letter is polylines on a 4 x 6 grid (x right, y down).
GLYPHS = {
    "S": [[(4, 0), (0, 0), (0, 3), (4, 3), (4, 6), (0, 6)]],
    "P": [[(0, 6), (0, 0), (4, 0), (4, 3), (0, 3)]],
    "A": [[(0, 6), (2, 0), (4, 6)], [(1, 4), (3, 4)]],
    "R": [[(0, 6), (0, 0), (4, 0), (4, 3), (0, 3), (4, 6)]],
    "E": [[(4, 0), (0, 0), (0, 6), (4, 6)], [(0, 3), (3, 3)]],
}


def zone_plate(n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) - n / 2
    r2 = (x * x + y * y) / (n * n)
    wave = 0.5 + 0.5 * np.cos(np.pi * n * 0.9 * r2)
    return np.stack([wave, wave * 0.9 + 0.05, 1 - wave * 0.7], axis=-1)


def gradient(n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) / (n - 1)
    return np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.8 - 0.5 * x * y], axis=-1)


def texture(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    weave = 0.5 + 0.25 * np.sin(x * 1.3) * np.sign(np.sin(y * 0.35)) + 0.25 * np.sin(y * 1.3) * np.sign(np.sin(x * 0.35))
    # value noise: random values on a coarse grid, bilinearly enlarged, so it is detailed but compressible
    coarse = rng.random((n // 4 + 2, n // 4 + 2))
    gy, gx = y / 4, x / 4
    iy, ix = gy.astype(int), gx.astype(int)
    fy, fx = gy - iy, gx - ix
    noise = (coarse[iy, ix] * (1 - fy) * (1 - fx) + coarse[iy + 1, ix] * fy * (1 - fx)
             + coarse[iy, ix + 1] * (1 - fy) * fx + coarse[iy + 1, ix + 1] * fy * fx)
    base = 0.6 * weave + 0.4 * noise
    return np.stack([base * 0.9 + 0.05, base * 0.7 + 0.1, base * 0.45 + 0.2], axis=-1)


def draw_text(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, unit: float, width: int, fill) -> None:
    for char in text:
        for stroke in GLYPHS.get(char, []):
            draw.line([(x + px * unit, y + py * unit) for px, py in stroke], fill=fill, width=width, joint="curve")
        x += 6 * unit


def render() -> Image.Image:
    canvas = np.zeros((SIZE, SIZE, 3))
    canvas[:HALF, :HALF] = zone_plate(HALF)
    canvas[:HALF, HALF:] = 0.96  # paper for the lettering
    canvas[HALF:, :HALF] = gradient(HALF)
    canvas[HALF:, HALF:] = texture(HALF)
    image = Image.fromarray(np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    ink = (20, 24, 40)
    draw_text(draw, "SPARSE", HALF + 6, 8, 3.2, 3, ink)
    draw_text(draw, "SR", HALF + 6, 40, 6.0, 5, (160, 30, 30))
    draw_text(draw, "SPARSE SR", HALF + 6, 92, 2.0, 1, ink)
    draw_text(draw, "ARES", HALF + 6, 108, 1.4, 1, ink)

    # shapes at odd angles over the gradient
    draw.polygon([(14, 150), (70, 138), (58, 200), (20, 190)], fill=(240, 240, 230), outline=(10, 10, 10))
    draw.ellipse([(72, 150), (120, 198)], fill=(30, 60, 150), outline=(250, 210, 40), width=3)
    for i in range(7):  # thin lines fanning out: edges at many angles
        draw.line([(8, 250), (8 + 18 * i, 206)], fill=(0, 0, 0), width=1)
    draw.rectangle([(84, 214), (122, 248)], fill=(200, 40, 40))
    draw.rectangle([(92, 222), (114, 240)], fill=(255, 255, 255))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "sparsesr" / "assets" / "sample.png"
    parser.add_argument("-o", "--out", type=Path, default=default)
    parser.add_argument("--repeat", type=int, default=1,
                        help="tile the sample N x N times (4 gives the 1024x1024 image of the upscale timing)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = render()
    if args.repeat > 1:
        tiled = Image.new("RGB", (image.width * args.repeat, image.height * args.repeat))
        for i in range(args.repeat):
            for j in range(args.repeat):
                tiled.paste(image, (i * image.width, j * image.height))
        image = tiled
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
