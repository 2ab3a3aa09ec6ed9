"""A run's ``log.jsonl``: one JSON object per line, appended as training goes.

Appending is as atomic as a file append can be: each record is one ``os.write`` of a whole
line to a file opened with ``O_APPEND``, so records never interleave and a killed process
leaves at worst one torn final line, which ``read_log`` skips. Rewrites (a fresh run, a
resume dropping the records of the lost steps) replace the file atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sparsesr.errors import TrainingError
from sparsesr.fileio import atomic_write_bytes


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        # One write for the whole line; a short write (disk full) is finished rather than left torn.
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (empty if it does not exist), skipping a torn final line.

    A line that is not JSON anywhere but at the end is not a torn append but a damaged file:
    ``TrainingError`` naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):  # the last line has no newline: an append cut short
                break
            raise TrainingError(f"{path}: line {number} is not a JSON record (the log is damaged)")
        records.append(record)
    return records


def write_log(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace the log with ``records``, atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def truncate_log(path: str | os.PathLike, step: int) -> int:
    """Keep only the records of steps <= ``step`` (and those without a step); return how many were dropped.

    A run resumed from the state of step N redoes the steps after N; their records from the
    leg that was cut off would otherwise appear twice.
    """
    records = read_log(path)
    kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > step)]
    write_log(path, kept)
    return len(records) - len(kept)
