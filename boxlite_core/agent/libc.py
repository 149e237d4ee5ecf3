"""The few libc calls Python 3.11's os module lacks (mount, unshare, reboot, prctl, ...).

Why ctypes rather than /bin/mount and friends: the agent is PID 1 in a read-only guest root;
spawning helpers costs latency under TCG, and child processes would race the zombie reaper.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target} ({fstype or 'no type'}, {data or 'no options'})",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname {name}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def reboot(cmd: int) -> None:
    _check(_libc.reboot(cmd), "reboot")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")
