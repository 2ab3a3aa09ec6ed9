"""A fuzz of ``sparsesr upscale``: random combinations of flags and values (junk included) through
``sparsesr.cli.main`` in-process, on a tiny model, each in a fresh folder. Whatever the arguments:

- nothing but argparse's ``SystemExit(2)`` escapes ``main``;
- exit 0 or 1: every output the summary counts exists, is readable by Pillow and has the size the
  scale gives; nothing else new is left (exit 1: the images that failed left nothing);
- exit 2 (a problem with the command): nothing new at all, not even a folder;
- inputs are never modified, an existing output only with ``--overwrite``, and no temp file stays.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from sparsesr.cli import main
from sparsesr.data.image_io import is_own_temp_file
from sparsesr.format import export
from sparsesr.models import build_model
from sparsesr.models.checkpoint import save_checkpoint
from sparsesr.pretrained import EMBEDDED_MODELS

WIDTH, HEIGHT = 12, 10  # every input image, so that every output's size follows from the scale
# Outputs of an earlier run: replaced only with --overwrite. in/a_x2.png (next to in/a.png) is
# never taken for an input by folders and globs; have/h_x2.png is an input where it is named.
OLD_OUTPUTS = ["have/h_x2.png", "in/a_x2.png"]
# Temp files a killed run left (sparsesr.fileio's, and those of earlier versions): never inputs.
LEFTOVERS = ["in/.a_x2.png.0e277fbc.sparsesr-tmp", "in/.b_x2.jpg.0e277fbc.tmp.jpg",
             "in/.c_x2.png.0e277fbc.tmp.png"]
INPUTS = ["in/a.png", "in/b.jpg", "in/c.png", "in/e.gif", "in/anim.gif", "in/sub/d.png", "in/notes.txt", "blocker",
          *LEFTOVERS]
SUMMARY = re.compile(r"(?:rank \d+ of \d+: )?(\d+) of (\d+) images written")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny model as a file and as the embedded x2 / fast; the examples' folders go in here too."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.safetensors", build_model("edsr-cpu", 2, n_resblocks=1, n_feats=4))
    export(root / "tiny.safetensors", root / "tiny.sparsesr.safetensors")
    (root / "embedded").mkdir()
    for name in ("x2", "fast"):
        shutil.copy(root / "tiny.sparsesr.safetensors", root / "embedded" / EMBEDDED_MODELS[name].filename)
    return root


@pytest.fixture
def env(world, monkeypatch, one_thread) -> Path:
    monkeypatch.setenv("SPARSESR_MODEL_DIR", str(world / "embedded"))
    monkeypatch.setenv("SPARSESR_CPU_DISPATCH_CACHE", "0")  # no writes to ~/.cache from a fuzz
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return world


def _image(path: Path, mode: str, seed: int, frames: int = 1) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (HEIGHT, WIDTH, len(mode)) if len(mode) > 1 else (HEIGHT, WIDTH)
    ims = [PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(frames)]
    ims[0].save(path, save_all=frames > 1, append_images=ims[1:])


def _workspace(world: Path, earlier_output_next_to_input: bool) -> Path:
    root = Path(tempfile.mkdtemp(dir=world, prefix="case-"))
    _image(root / "in" / "a.png", "RGB", 1)
    _image(root / "in" / "b.jpg", "RGB", 2)
    _image(root / "in" / "c.png", "RGBA", 3)
    _image(root / "in" / "e.gif", "RGB", 4)
    _image(root / "in" / "anim.gif", "RGB", 5, frames=2)
    _image(root / "in" / "sub" / "d.png", "L", 6)
    (root / "in" / "notes.txt").write_text("not an image")
    for seed, rel in enumerate(OLD_OUTPUTS + LEFTOVERS[1:], start=7):
        if rel != "in/a_x2.png" or earlier_output_next_to_input:
            _image(root / rel, "RGB", seed)
    (root / LEFTOVERS[0]).write_bytes(b"half an image")
    (root / "blocker").write_text("a file where a folder might be wanted")
    return root


def _snapshot(root: Path) -> tuple[dict[str, str], set[str]]:
    """({file: sha256}, {folder}) under ``root``, as paths relative to it."""
    files, folders = {}, set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            folders.add(rel)
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files, folders


# --- the arguments ------------------------------------------------------------------------------

SAFE_JUNK = st.text(alphabet="abcXYZ019._-+ {}~é", min_size=1, max_size=12).filter(lambda s: ".." not in s)
INPUT_ITEMS = st.sampled_from([
    "in/a.png", "in/b.jpg", "in/c.png", "in/e.gif", "in/anim.gif", "in", "in/", "in/*.png", "in/**/*.png",
    "in/*", "in/.*", "in/missing.png", "in/notes.txt", "nothing/*", "have/h_x2.png", "have", "blocker",
]) | SAFE_JUNK.filter(lambda s: not s.startswith("-"))
KNOWN_OUTPUTS = st.sampled_from([
    "out/", "out", "out.png", "out.JPG", "out.webp", "out.tiff", "out.gif", "out.xyz", "have", "have/",
    "blocker/", "blocker/x.png", "in/a.png", "in/", "/proc/nudir/", "deep/er/", "deep/x.bmp", "", ".",
    *OLD_OUTPUTS, "have/a_x2.png",
])
OUTPUTS = st.one_of(KNOWN_OUTPUTS, KNOWN_OUTPUTS, KNOWN_OUTPUTS, SAFE_JUNK)  # junk in a quarter of the cases
NUMBERS = st.sampled_from(["0", "1", "-1", "nan", "inf", "-inf", "1e309", "abc", "", " 2", "0x10", str(2**64),
                           "1.5", "16", "-0"])
VALUES = {
    "--scale": NUMBERS | st.sampled_from(["2", "3", "0.5", "16.0001", "1e-9", "4"])
               | st.floats(allow_nan=True, allow_infinity=True).map(repr),
    "--tile": NUMBERS | st.sampled_from(["16", "15", "64"]),
    "--tile-pad": NUMBERS | st.sampled_from(["8", "16"]),
    "--quality": NUMBERS | st.sampled_from(["100", "50", "101", "150", "-3"]),
    "--ext": st.sampled_from(["auto", "png", "jpg", "webp", "tiff", "gif", "PNG", ""]),
    "--suffix": st.sampled_from(["", "_big", "-up{scale}x", "{scale}", "/x", "_x2", ".", "-q", "--overwrite",
                                 "a b", "..", "é"]) | SAFE_JUNK,
    "--alpha": st.sampled_from(["bicubic", "model", "none"]),
    "--backend": st.sampled_from(["auto", "sparse", "dense", "triton"]),
    "--precision": st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
    "--device": st.sampled_from(["auto", "cpu", "cuda", "cuda:7", "gpu"]),
    "--model": st.sampled_from(["MODEL", "nope.safetensors", "in", "x4", "in/a.png", "fast"]),
}
FLAGS = ["-r", "--overwrite", "--skip-existing", "--compare-dense"]


@st.composite
def upscale_argv(draw) -> list[str]:
    argv = ["upscale", "-q", *draw(st.lists(INPUT_ITEMS, min_size=1, max_size=3))]
    options = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4, unique=True))
    flags = draw(st.lists(st.sampled_from(FLAGS), max_size=3, unique=True))
    pieces = [[name, draw(VALUES[name])] for name in options] + [[flag] for flag in flags]
    output = draw(st.none() | OUTPUTS)  # half of the cases: where outputs go matters most
    if output is not None:
        pieces.append(["-o", output])
    for piece in draw(st.permutations(pieces)):
        argv.extend(piece)
    return argv


# --- the property -------------------------------------------------------------------------------


def _expected_size(argv: list[str]) -> tuple[int, int]:
    scale = float(argv[argv.index("--scale") + 1]) if "--scale" in argv else 2.0
    return max(1, round(WIDTH * scale)), max(1, round(HEIGHT * scale))


def _value(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _refused(argv: list[str]) -> bool:
    """Whether the options alone must make the command fail with exit 2 (argparse or sparsesr)."""
    def number(text: str | None, kind=float):
        try:
            return kind(text)
        except (TypeError, ValueError, OverflowError):
            return None

    scale, tile, pad, quality = (_value(argv, n) for n in ("--scale", "--tile", "--tile-pad", "--quality"))
    suffix = _value(argv, "--suffix")
    return any([
        "--overwrite" in argv and "--skip-existing" in argv,
        quality is not None and not 1 <= (number(quality, int) or 0) <= 100,
        scale is not None and not 0 < (number(scale) or 0) <= 16,  # NaN compares false: refused too
        tile is not None and (number(tile, int) is None or number(tile, int) < 0 or 0 < number(tile, int) < 16),
        pad is not None and (number(pad, int) is None or number(pad, int) < 0),
        suffix is not None and "/" in suffix,
        _value(argv, "--ext") not in (None, "auto", "png", "jpg", "webp", "tiff"),
        # -o: not an image file name nor a folder, or a place where nothing can be written
        _value(argv, "-o") in ("out", "out.gif", "out.xyz", "", "blocker/", "blocker/x.png", "/proc/nudir/"),
    ])


def _inputs(argv: list[str]) -> list[str]:
    """The INPUT items: after ``upscale -q``, up to the first option (inputs never start with -)."""
    rest = argv[2:]
    return rest[:next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))]


def _protected_old_outputs(argv: list[str]) -> set[str]:
    """Earlier outputs that must stay as they are: both without --overwrite; with it, have/h_x2.png
    where it is an input (named, or in a folder walked). in/a_x2.png is never one: it is next to
    in/a.png, so folders and globs skip it, and no input item names it."""
    if "--overwrite" not in argv:
        return set(OLD_OUTPUTS)
    walked = any(item in ("have/h_x2.png", "have", "have/", ".") for item in _inputs(argv))
    return {"have/h_x2.png"} if walked else set()


@settings(max_examples=120, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=upscale_argv(), earlier_output=st.booleans())
# Always tried first: the cases of issue #15.
@example(argv=["upscale", "-q", "in/a.png", "-o", "/proc/nudir/"], earlier_output=False)
@example(argv=["upscale", "-q", "in/a.png", "-o", "blocker/"], earlier_output=False)
@example(argv=["upscale", "-q", "in/a.png", "-o", "out.gif"], earlier_output=False)
@example(argv=["upscale", "-q", "in/a.png", "-o", "out"], earlier_output=False)
@example(argv=["upscale", "-q", "in/a.png", "in/b.jpg", "-o", "out.png"], earlier_output=False)
@example(argv=["upscale", "-q", "in/a.png", "--overwrite", "--skip-existing"], earlier_output=True)
@example(argv=["upscale", "-q", "in/a.png", "-o", "x.jpg", "--ext", "png"], earlier_output=False)
@example(argv=["upscale", "-q", "in/*.png", "in/.*", "--overwrite"], earlier_output=True)
@example(argv=["upscale", "-q", "in", "-r", "--suffix", "-up{scale}x", "--scale", "1.5"], earlier_output=True)
@example(argv=["upscale", "-q", "in/anim.gif", "in/e.gif", "-o", "deep/er/"], earlier_output=False)
def test_upscale_never_misbehaves(env, capsys, argv, earlier_output):
    argv = [str(env / "tiny.sparsesr.safetensors") if a == "MODEL" else a for a in argv]
    note(f"argv: {argv}")
    root = _workspace(env, earlier_output)
    before_files, before_folders = _snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a value it cannot parse, an unknown option
            assert exc.code == 2, f"argparse exited with {exc.code}"
            code = 2
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    note(f"exit {code}\nstdout: {out}\nstderr: {err}")
    event(f"exit {code}")
    after_files, after_folders = _snapshot(root)

    assert "Traceback" not in err
    for rel in INPUTS:  # inputs: never modified, never removed
        assert after_files.get(rel) == before_files[rel], f"input {rel} was modified"
    for rel in _protected_old_outputs(argv) & set(before_files):
        assert after_files.get(rel) == before_files[rel], f"the existing output {rel} was replaced"
    new = sorted(set(after_files) - set(before_files))
    temps = [rel for rel in new if is_own_temp_file(rel) or "sparsesr-probe" in rel]
    assert not temps, f"temp files left: {temps}"
    hidden = [rel for rel in new if any(part.startswith(".") for part in Path(rel).parts)]
    assert not hidden, f"outputs of hidden (temp) files: {hidden}"
    if "--suffix" not in argv:  # only in/a_x2.png, never an input here, could give a_x2_x2
        assert not [rel for rel in new if "a_x2_x2" in rel], f"an earlier output was upscaled again: {new}"
    if _refused(argv):
        assert code == 2, f"invalid options accepted (exit {code})"

    if code == 2:
        assert not new and after_folders == before_folders, f"exit 2 left {new or after_folders - before_folders}"
        assert after_files == before_files
        return
    assert code in (0, 1), code
    summary = SUMMARY.search(out)
    assert summary, f"no summary line in {out!r}"
    replaced = [rel for rel in OLD_OUTPUTS if rel in before_files and after_files.get(rel) != before_files[rel]]
    assert int(summary[1]) == len(new) + len(replaced), "the summary's count is not what is on disk"
    assert (code == 1) == ("failed" in out)
    for rel in new + replaced:
        with PILImage.open(root / rel) as im:
            im.load()
            assert im.size == _expected_size(argv), rel
    shutil.rmtree(root)
