"""What this host can give a box: CPUs and memory, checked when a box is created.

Why at create and not at spawn: a box asking for more memory than the host has used to reach
QEMU, fail there with a multi-line "cannot set up guest memory" error and leave a Failed box
behind. Refusing it before the record exists means no box, no VM, one clear line.

Why not in BoxOptions: options are also loaded from stored records, and a record made on a
bigger host must still load (to be listed and removed) on a smaller one.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from ..errors import ConfigError
from ..models import BoxOptions

MEMINFO = Path("/proc/meminfo")


@attrs.frozen
class HostCapacity:
    """The host's logical CPU count and total memory (MiB; None where it cannot be read)."""

    cpus: int
    memory_mib: int | None


def _mem_total_mib(meminfo: Path) -> int | None:
    try:
        text = meminfo.read_text()
    except OSError:
        return None  # not Linux (e.g. macOS under hvf): no memory check, QEMU/HVF still refuse
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) // 1024  # the kernel reports kB
    return None


def host_capacity(meminfo: Path = MEMINFO) -> HostCapacity:
    """Read the host's CPU count (os.cpu_count) and MemTotal (from ``meminfo``)."""
    return HostCapacity(cpus=os.cpu_count() or 1, memory_mib=_mem_total_mib(meminfo))


def check_capacity(options: BoxOptions, host: HostCapacity | None = None) -> None:
    """Refuse a box that asks for more CPUs or memory than the host has.

    Raises ConfigError naming the option, what was asked and what the host has. Asking for
    all of it is allowed (guest memory is only touched as the guest uses it).
    """
    host = host or host_capacity()
    if options.cpus > host.cpus:
        raise ConfigError(
            f"cpus={options.cpus}: this host has {host.cpus} CPUs; ask for at most {host.cpus}"
        )
    if host.memory_mib is not None and options.memory_mib > host.memory_mib:
        raise ConfigError(
            f"memory_mib={options.memory_mib}: this host has {host.memory_mib} MiB of memory "
            f"(MemTotal); ask for at most {host.memory_mib} MiB (--memory)"
        )
