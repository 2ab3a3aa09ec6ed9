"""``sparsesr upscale``'s batch: expand inputs, name outputs, skip / refuse existing files, write
atomically with metadata, carry on past bad files, shard across ``torchrun`` ranks."""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sparsesr.data.image_io import (
    IMAGE_EXTENSIONS,
    WRITABLE_EXTENSIONS,
    Image,
    frame_count,
    is_own_temp_file,
    read_image,
    remove_stale_temp_files,
    stored_bit_depth,
    write_image,
)
from sparsesr.errors import SparseSRError, UsageError
from sparsesr.runtime.tiling import is_out_of_memory
from sparsesr.upscaling.engine import UpscaleEngine
from sparsesr.upscaling.options import UpscaleOptions

_TILE_BAR_MIN = 4  # show a per-tile progress bar from this many tiles on


# --------------------------------------------------------------------------------------------
# Files: planning which input goes where


@dataclass
class Job:
    source: Path
    target: Path
    named: bool = False  # the user gave this exact output file name (-o FILE): keep its extension


@dataclass
class BatchResult:
    total: int = 0
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line reason)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    backend: str = ""
    compare: dict | None = None  # {"sparse_seconds", "dense_seconds"} with --compare-dense
    rank: int = 0
    world_size: int = 1

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        head = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        parts = [f"{len(self.written)} of {self.total} images written"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (already there)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        line = f"{head}{'; '.join(parts)} in {self.seconds:.1f} s (model {self.compute_seconds:.2f} s; {self.backend})"
        if self.compare:
            sparse, dense = self.compare["sparse_seconds"], self.compare["dense_seconds"]
            speedup = f", {dense / sparse:.2f}x" if sparse > 0 else ""
            line += f"; model time sparse {sparse:.2f} s vs dense {dense:.2f} s{speedup}"
        return line


def scale_label(scale: float) -> str:
    return f"{scale:g}"


# Read as inputs; GIF is read (its first frame) but never written: --ext auto makes it PNG.
INPUT_EXTENSIONS = frozenset({*IMAGE_EXTENSIONS, ".gif"})
_STALE_AFTER_S = 3600  # a temp file untouched this long belongs to no live run


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in INPUT_EXTENSIONS


def _is_earlier_output(path: Path, suffix: str) -> bool:
    """``photo_x2.png`` next to a ``photo.*`` image: an output of an earlier run, not an input."""
    if not suffix or not path.stem.endswith(suffix) or path.stem == suffix:
        return False
    original = path.stem[: -len(suffix)]
    return any((path.parent / f"{original}{ext}").is_file() for ext in INPUT_EXTENSIONS)


def _found_image(path: Path, suffix: str) -> bool:
    """Whether a file that a folder walk or a glob came across is an input (named files always are)."""
    return path.is_file() and _is_image(path) and not is_own_temp_file(path) and not _is_earlier_output(path, suffix)


def expand_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = False, suffix: str = ""
                  ) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
    """Inputs (files, folders, globs) -> ([(image, folder it was found under or None)], [(input, error)]).

    A named file is taken as it is. Folder walks and globs take images but not our temp files nor
    earlier outputs (``_is_earlier_output``); folder walks also skip hidden files and folders, as
    the shell's ``*`` and ``glob`` do.
    """
    found: list[tuple[Path, Path | None]] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern)
                           if not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and _found_image(p, suffix))
            if not files:
                errors.append((str(item), f"no images in folder {item}"))
            found.extend((p, path) for p in files)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            files = [p for p in matches if _found_image(p, suffix)]
            if not files:
                errors.append((str(item), f"{item}: no such file, folder or matching images"))
            found.extend((p, None) for p in files)
    unique, seen = [], set()
    for path, root in found:  # the same file named twice (e.g. a file and a glob) runs once
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, root))
    return unique, errors


def output_extension(source: Path, ext: str, image: Image | None = None) -> str:
    """The output extension (with dot): for ``auto`` the input's own, unless it cannot be written
    (GIF and other read-only formats: PNG) or cannot hold the image (BMP with alpha: PNG)."""
    if ext != "auto":
        return "." + ext.lower().lstrip(".")
    own = source.suffix.lower()
    if own not in WRITABLE_EXTENSIONS:
        return ".png"
    if image is not None and own == ".bmp" and image.has_alpha:
        return ".png"  # BMP output would lose the alpha channel
    return own


_SAME_FORMAT = {".jpeg": ".jpg", ".tif": ".tiff"}


def parse_output(output: str | os.PathLike | None) -> tuple[Path | None, bool]:
    """``-o`` as (path, whether it is a file). The rule: an existing folder, or a name ending in
    ``/``, is a folder (created if missing); else a name with an extension ``write_image`` writes
    is a file; anything else is refused, since guessing made folders called ``big.gif``."""
    if output is None:
        return None, False
    text = os.fspath(output)
    if not text:
        raise UsageError("-o: the output path is empty")
    path = Path(text)
    if path.is_dir() or text.endswith(tuple(sep for sep in (os.sep, os.altsep, "/") if sep)):
        return path, False
    extension = path.suffix.lower()
    if extension in WRITABLE_EXTENSIONS:
        return path, True
    writable = ", ".join(sorted(WRITABLE_EXTENSIONS))
    if extension:
        raise UsageError(f"-o {text}: cannot write {extension} files; give one of {writable}, "
                         "or end a folder name with /")
    raise UsageError(f"-o {text}: give a file name with an image extension, or end a folder name with / "
                     f"(image extensions: {writable})")




def check_output(output: str | os.PathLike | None, options: UpscaleOptions) -> None:
    """Refuse, with one line, an ``-o`` that breaks the rule of :func:`parse_output` or names a
    file whose format disagrees with ``--ext``; no I/O."""
    path, is_file = parse_output(output)
    ext = options.ext
    if is_file and ext != "auto":
        named, asked = path.suffix.lower(), "." + ext.lower().lstrip(".")
        if _SAME_FORMAT.get(named, named) != _SAME_FORMAT.get(asked, asked):
            raise UsageError(f"-o {output} is a {named} file but --ext {ext} asks for {asked}; drop one of them")


def check_folder_writable(folder: Path, what: str) -> None:
    """Raise UsageError unless files can be made in ``folder``, or it can be created. Probed by
    making (and removing) a folder there: permission bits do not tell (root, read-only mounts, /proc)."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".sparsesr-probe-", dir=existing)
    except OSError as exc:
        action = f"cannot write in {folder}" if existing == folder else f"cannot create folder {folder}"
        raise UsageError(f"{what}: {action} ({existing}: {exc.strerror or exc})") from None
    os.rmdir(probe)


def plan_jobs(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike | None,
    suffix: str,
    ext: str = "auto",
    recursive: bool = False,
) -> tuple[list[Job], list[tuple[str, str]]]:
    """Where each input image goes (``-o`` as :func:`parse_output` reads it); the extension is
    refined per image once it is decoded."""
    found, errors = expand_inputs(inputs, recursive, suffix)
    out, file_target = parse_output(output)
    if file_target and len(found) > 1:
        raise UsageError(f"-o {output} is a file name, but {len(found)} images were given; "
                         "end a folder name with /")
    jobs = []
    for source, root in found:
        if file_target:
            jobs.append(Job(source, out, named=True))
            continue
        name = f"{source.stem}{suffix}{output_extension(source, ext)}"
        if out is None:
            target = source.with_name(name)
        else:  # mirror the tree below the folder it was found in
            relative = source.parent.relative_to(root) if root is not None else Path()
            target = out / relative / name
        jobs.append(Job(source, target))
    return jobs, errors


def shard(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """This rank's share of the jobs, by index (``torchrun`` sets RANK and WORLD_SIZE)."""
    return jobs[rank::world_size]


def _rank_and_world() -> tuple[int, int]:
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise SparseSRError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise SparseSRError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


# --------------------------------------------------------------------------------------------
# Files: the batch


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _blocking_component(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    return None if existing.is_dir() else existing


def upscale_files(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | None = None,
    log: Callable[[str], None] = _stderr,
    **options: Any,
) -> BatchResult:
    """Upscale image files; see ``sparsesr upscale --help``. ``options``: the fields of
    :class:`UpscaleOptions`. Problems with the command (options, the output location) raise
    :class:`UsageError` before the model is loaded; per-image problems are logged (one line naming
    the file) and counted in the result, and the batch carries on."""
    from tqdm import tqdm

    start = time.perf_counter()
    opts = UpscaleOptions.from_kwargs(options)
    check_output(output, opts)
    out, file_target = parse_output(output)
    if out is not None:
        check_folder_writable(out.parent if file_target else out, f"-o {os.fspath(output)}")
    rank, world_size = _rank_and_world()
    engine = UpscaleEngine.load(model, opts, warn=lambda m: log(f"warning: {m}"))
    suffix = f"_x{scale_label(engine.scale)}" if opts.suffix is None else opts.suffix
    suffix = suffix.replace("{scale}", scale_label(engine.scale))
    jobs, errors = plan_jobs(inputs, output, suffix, opts.ext, opts.recursive)
    if out is None:  # outputs go next to their inputs: each of those folders must take files
        for folder in sorted({job.target.parent for job in jobs}):
            check_folder_writable(folder, f"output folder {folder}")
    # Every input of the whole batch, before sharding: another rank's input is no output either.
    inputs_resolved = {job.source.resolve() for job in jobs}
    result = BatchResult(rank=rank, world_size=world_size)
    if rank == 0:  # every rank sees the same input errors and folders; one reports and cleans them
        for item, message in errors:
            log(message)
            result.failed.append((item, message))
        for folder in sorted({job.target.parent for job in jobs}):
            if folder.is_dir():
                remove_stale_temp_files(folder, older_than_s=_STALE_AFTER_S)
    jobs = shard(jobs, rank, world_size)
    result.total = len(jobs) + len(result.failed)
    targets_seen: set[Path] = set()
    timed_images: list[Image] | None = [] if opts.compare_dense else None

    bar = tqdm(jobs, desc="images", unit="img", disable=opts.quiet or len(jobs) < 2, dynamic_ncols=True)
    say = bar.write if not bar.disable else log
    for job in bar:
        target = job.target

        def fail(message: str) -> None:
            say(message)
            result.failed.append((str(job.source), message))

        try:
            if opts.skip_existing and job.target.exists():  # resuming: do not even decode the input
                result.skipped.append(job.target)
                continue
            image = read_image(job.source)
            if not job.named:  # the extension can depend on the image (alpha, 16 bits)
                target = target.with_suffix(output_extension(job.source, opts.ext, image))
            resolved = target.resolve()
            if resolved in inputs_resolved:
                fail(f"{job.source}: output {target} would overwrite an input; choose another --suffix or -o")
                continue
            if resolved in targets_seen:
                fail(f"{job.source}: output {target} is also the output of another input; skipped")
                continue
            targets_seen.add(resolved)
            if target.exists():
                if opts.skip_existing:
                    result.skipped.append(target)
                    continue
                if not opts.overwrite:
                    fail(f"{job.source}: output {target} exists; pass --overwrite or --skip-existing")
                    continue
            frames = frame_count(job.source)
            if frames > 1:  # said before the model runs, so it is not mistaken for a failure after
                say(f"warning: {job.source} has {frames} frames; only the first is upscaled")
            blocked = _blocking_component(target.parent)
            if blocked is not None:
                fail(f"{job.source}: cannot write image {target}: {blocked} is not a folder")
                continue
            tiles = _TileBar(tqdm, opts.quiet, job.source.name)
            try:
                # quantized as the output will store it: no float copy of the whole output
                upscaled = engine.upscale_image(image, tiles.update, bit_depth=stored_bit_depth(target, image.bit_depth))
            finally:
                tiles.close()
            target.parent.mkdir(parents=True, exist_ok=True)
            try:  # without --overwrite, never replace a file that appeared meanwhile (a concurrent run)
                write_image(target, upscaled, quality=opts.quality, replace=opts.overwrite)
            except FileExistsError:
                say(f"{job.source}: output {target} appeared meanwhile; skipped")
                result.skipped.append(target)
                continue
            result.written.append(target)
            if timed_images is not None:
                timed_images.append(image)
        except SparseSRError as exc:
            fail(str(exc) if str(job.source) in str(exc) else f"{job.source}: {exc}")
        except OSError as exc:  # creating the output's folder, linking it into place
            fail(f"{job.source}: cannot write image {target}: {exc.strerror or exc}")
        except (RuntimeError, MemoryError) as exc:  # decoding or encoding a big image, not the tiles
            if not is_out_of_memory(exc):
                raise
            fail(f"{job.source}: out of memory ({(str(exc).splitlines() or ['MemoryError'])[0][:80]}); "
                 "try a smaller --tile")

    result.backend = engine.backend_summary()
    result.compute_seconds = engine.compute_seconds
    if timed_images:
        result.compare = _compare_dense(engine, timed_images)
    result.seconds = time.perf_counter() - start
    return result


class _TileBar:
    """Creates a tqdm bar over tiles on the first call that reports enough tiles."""

    def __init__(self, tqdm, quiet: bool, name: str) -> None:
        self.tqdm, self.quiet, self.name, self.bar = tqdm, quiet, name, None

    def update(self, done: int, total: int) -> None:
        if self.quiet or total < _TILE_BAR_MIN:
            return
        if self.bar is None or self.bar.total != total:  # a new tiling (first, or after OOM)
            self.close()
            self.bar = self.tqdm(total=total, desc=self.name, unit="tile", leave=False, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _compare_dense(engine: UpscaleEngine, images: list[Image]) -> dict:
    """Model time over ``images`` with sparse kernels (warm: one-time setup excluded) and dense."""
    times = {}
    try:
        for backend in ("auto", "dense"):
            engine.set_backend(backend)
            before = engine.compute_seconds
            for image in images:
                engine.upscale_pixels(image.pixels, image.mode)
            times[backend] = engine.compute_seconds - before
    finally:
        engine.set_backend(engine.backend)
    return {"sparse_seconds": times["auto"], "dense_seconds": times["dense"]}
