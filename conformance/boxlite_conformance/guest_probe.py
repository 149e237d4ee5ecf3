"""Looking at the guest from inside: mounts, resources, file owners.

Everything goes through ``box.exec`` of busybox applets, so it checks what a user's program
would see in the container, not what the host believes it configured.
"""

from __future__ import annotations

import shlex
from typing import Any

import attrs


@attrs.frozen
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def run(box: Any, argv: list[str], **kwargs: Any) -> str:
    """Exec ``argv`` and return stdout; any failure raises AssertionError with both streams."""
    result = box.exec(argv, timeout=kwargs.pop("timeout", 60), **kwargs)
    assert result.exit_code == 0, (
        f"{shlex.join(argv)} exited {result.returncode}: "
        f"stdout={result.stdout!r} stderr={result.stderr!r}"
    )
    return result.stdout.decode(errors="replace")


def mounts(box: Any) -> list[Mount]:
    out = []
    for line in run(box, ["cat", "/proc/mounts"]).splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append(
                Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2],
                      tuple(parts[3].split(",")))
            )
    return out


def mount_at(box: Any, target: str) -> Mount:
    """The mount that is visible at ``target`` (the last one listed wins, as in the kernel)."""
    found = [m for m in mounts(box) if m.target.rstrip("/") == target.rstrip("/")]
    assert found, f"nothing is mounted at {target!r} in the guest; /proc/mounts: {mounts(box)}"
    return found[-1]


def cpu_count(box: Any) -> int:
    return int(run(box, ["nproc"]).strip())


def mem_total_kib(box: Any) -> int:
    for line in run(box, ["cat", "/proc/meminfo"]).splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise AssertionError("no MemTotal line in the guest's /proc/meminfo")


@attrs.frozen
class Timekeeping:
    """The guest kernel's timekeeping, as /sys and /proc/timer_list show it."""

    clocksource: str       # e.g. "tsc", "kvm-clock", "arch_sys_counter"; never jiffies-based
    resolution_ns: int     # of the hrtimer clocks: 1 in high-resolution mode, a tick without


#: how long after boot the kernel's clocksource watchdog has had its say (it rejected a
#: TCG guest's TSC ~5.4 s after boot), seconds of guest uptime
CLOCK_SETTLED_S = 8


def timekeeping(box: Any) -> Timekeeping:
    """The guest's clock once the clocksource watchdog has judged (waits for uptime
    :data:`CLOCK_SETTLED_S`)."""
    out = run(box, ["sh", "-c",
                    f"while [ $(cut -d. -f1 /proc/uptime) -lt {CLOCK_SETTLED_S} ]; do "
                    "sleep 0.5; done; "
                    "cat /sys/devices/system/clocksource/clocksource0/current_clocksource; "
                    "grep -m1 'resolution:' /proc/timer_list"])
    source, resolution = out.splitlines()[:2]
    return Timekeeping(source.strip(), int(resolution.split(":")[1].split()[0]))


def owner(box: Any, path: str) -> tuple[int, int]:
    uid, gid = run(box, ["stat", "-c", "%u %g", path]).split()
    return int(uid), int(gid)


def exists(box: Any, path: str) -> bool:
    return box.exec(["test", "-e", path], timeout=60).exit_code == 0


def line_count(box: Any, path: str) -> int:
    """Lines in the guest file ``path`` (0 when it does not exist yet)."""
    return int(run(box, ["sh", "-c", f"cat {shlex.quote(path)} 2>/dev/null | wc -l"]).strip())


def random_bytes(box: Any, count: int = 32) -> str:
    """``count`` bytes of the guest's /dev/urandom, as hex."""
    out = run(box, ["sh", "-c", f"head -c {int(count)} /dev/urandom | od -An -tx1"])
    return "".join(out.split())


def clock(box: Any) -> int:
    """The guest's wall clock, whole seconds since the epoch (busybox ``date +%s``)."""
    return int(run(box, ["date", "+%s"]).strip())
