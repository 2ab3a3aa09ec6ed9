"""What ``/proc/cpuinfo`` says about this CPU: its name and feature flags (one parser for the package).

x86 lists ``model name``, ``cpu family``, ``model`` and ``flags``; aarch64 lists ``Features``
(and usually no model name). Only the first processor's block is read: all cores of a machine
report the same flags.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CpuInfo:
    """The first processor of ``/proc/cpuinfo``: ``model_name``, ``family`` and ``model`` (None
    where not given) and its feature ``flags`` (x86 ``flags`` or aarch64 ``Features``)."""

    model_name: str | None = None
    family: str | None = None
    model: str | None = None
    flags: frozenset[str] = field(default_factory=frozenset)


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse the text of ``/proc/cpuinfo``; the first value of each key wins."""
    keys = {"model name": "model_name", "cpu family": "family", "model": "model",
            "flags": "flags", "features": "flags"}
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        name = keys.get(key.strip().lower())
        if sep and name and name not in found:
            found[name] = value.strip()
    return CpuInfo(found.get("model_name"), found.get("family"), found.get("model"),
                   frozenset(found.get("flags", "").split()))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuInfo()
