"""Atomic file writing, shared by everything that writes files.

A file is written under a temporary name in the destination folder, then renamed over the
target (or linked into place, never replacing one), so an interrupted run never leaves a
half-written file behind; the temporary names are recognisable, so a killed run's leftovers are
never taken for inputs and can be cleaned.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterator


# Temporary files: ".{name}.{8 hex digits}.sparsesr-tmp" next to the target. Hidden, and without
# the target's extension, so nothing that looks for images or checkpoints takes one for an input;
# the tag makes the name ours alone. Earlier versions wrote ".{name}.{8 hex}.tmp{ext}", which
# is recognised too, so their leftovers are skipped and cleaned as well.
_TEMP_TAG = "sparsesr-tmp"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\." + re.escape(_TEMP_TAG), re.DOTALL)
_LEGACY_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp(\.[^.]+)?", re.DOTALL)
_MAX_NAME_BYTES = 255 - 24  # the usual file-name limit, less what the scheme adds
# errno values of a file system without hard links (FAT, exFAT, some network and FUSE mounts).
_NO_HARD_LINKS = frozenset(getattr(errno, name) for name in
                           ("EPERM", "EACCES", "EOPNOTSUPP", "ENOTSUP", "EXDEV", "EMLINK", "ENOSYS")
                           if hasattr(errno, name))


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path``, in the scheme :func:`is_own_temp_file` knows."""
    path = Path(path)
    name = path.name
    while len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:  # shorten, but stay ours
        name = name[:-1]
    return path.with_name(f".{name}.{secrets.token_hex(4)}.{_TEMP_TAG}")


def is_own_temp_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as our temporary files are (by name only)."""
    name = Path(path).name
    return bool(_TEMP_NAME.fullmatch(name) or _LEGACY_TEMP_NAME.fullmatch(name))


def remove_stale_temp_files(folder: str | os.PathLike, older_than_s: float = 3600) -> int:
    """Delete our temporary files (see :func:`is_own_temp_file`) in ``folder`` not modified for
    ``older_than_s`` seconds, left by a killed run; returns how many were deleted.

    Younger ones may belong to a write in progress elsewhere and are kept. Not recursive.
    Best effort: a folder or file that cannot be listed or deleted is skipped.
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not is_own_temp_file(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to delete
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it to ``path``, else delete it.

    ``replace=False`` never replaces an existing ``path``, even one that appeared while the
    temporary file was being written (e.g. by a concurrent run): the file is hard-linked into
    place, which unlike a rename fails when the target exists, and ``FileExistsError`` is raised.
    Without hard links, ``path`` is reserved with O_EXCL and the temporary file renamed over
    that (empty) reservation.
    """
    path = Path(path)
    tmp_path = temp_path_for(path)
    # Mode 0o666 lets the umask decide the permissions, as for any normally created file.
    try:
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:  # name the file the caller asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        yield tmp_path
        if replace:
            os.replace(tmp_path, path)
        else:
            _link_into_place(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _link_into_place(tmp_path: Path, path: Path) -> None:
    try:
        os.link(tmp_path, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists already", str(path)) from None
    except (OSError, AttributeError) as exc:  # AttributeError: a platform without os.link
        if isinstance(exc, OSError) and exc.errno not in _NO_HARD_LINKS:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "exists already", str(path)) from None
        os.replace(tmp_path, path)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before it is moved into place);
    ``replace=False``: ``FileExistsError`` rather than replacing an existing file (see :func:`atomic_path`)."""
    with atomic_path(path, replace=replace) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def canonical_safetensors(data: bytes) -> bytes:
    """Safetensors bytes with the header rewritten in one fixed form (sorted keys, compact JSON).

    safetensors keeps ``__metadata__`` in a Rust HashMap, whose order changes from process to
    process, so the same tensors and metadata came out as different bytes. The data after the
    header is untouched (its offsets are relative to the end of the header).
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + data[8 + n :]
