"""A guest's identity: its kernel RNG state, wall clock and hostname, renewed after a restore.

Why: a box restored from a memory image (a boot template or a user snapshot) resumes with the
image's kernel state. Without this module two clones of one image read the same bytes from
/dev/urandom (the saved CRNG key) and their wall clock lags the host by the image's age. The
host sends an ``Identity`` (agent.proto) in Init and in Reseed; :func:`apply_identity` mixes
the host's entropy into the kernel pool and forces a CRNG reseed (so the very next
getrandom() depends on it), steps CLOCK_REALTIME to the host's clock and sets the hostname.

What CANNOT differ between clones of one image (document it; do not rely on it for
uniqueness):

* ``/proc/sys/kernel/random/boot_id``, once anything read it before the image was saved: the
  kernel picks it at its first read and keeps it for the boot. A user snapshot's clones all
  report their source's (its Init read it); a boot template saved before Init usually has
  none yet, so its clones pick theirs after the reseed (seen: two clones of one template had
  different boot_ids). Reseed returns it so the host can tell. Never treat it as unique.
* The kernel's uptime and CLOCK_MONOTONIC / CLOCK_BOOTTIME: they continue from the image (the
  time the VM was stopped does not count); only the wall clock is stepped.
* Anything a process computed before the snapshot: a user-space PRNG seeded then (OpenSSL's,
  Python's ``random``), keys, UUIDs, temp names, its pid and every other pid, the agent's own
  exec ids. Such a process must reseed itself after a restore; the kernel's pool is fresh, so
  reading /dev/urandom or getrandom() again is enough.

Precision: the clock is stepped to the host's time as the host read it right before the call,
so a clone lags by the call's latency (milliseconds; tens under TCG).

The other thing a restored guest must not keep from its template, the buffer cache of the
disk it was made with, is dropped before Init mounts a disk (``blockdev.flush_block_device``).

stdlib only (this runs in the guest as part of PID 1).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from . import libc
from .pid1 import log

#: linux/random.h: _IOW('R', 0x03, int[2]); add bytes to the input pool and credit bits
RNDADDENTROPY = 0x40085203
#: linux/random.h: _IO('R', 0x07); reseed the CRNG from the input pool now (Linux >= 4.17)
RNDRESEEDCRNG = 0x5207
URANDOM = "/dev/urandom"
BOOT_ID = "/proc/sys/kernel/random/boot_id"

ClockSetter = Callable[[int], None]
HostnameSetter = Callable[[str], None]


class IdentityMessage(Protocol):
    """The fields of agent.proto's Identity this module reads (the generated class has them)."""

    entropy: bytes
    wall_clock_ns: int
    hostname: str


class Applied(NamedTuple):
    """What apply_identity did, as Reseed replies it."""

    boot_id: str  # /proc/sys/kernel/random/boot_id ("" if unreadable)
    clock_step: float  # seconds CLOCK_REALTIME moved; positive: it was behind. 0.0 = not set


def step_realtime(wall_clock_ns: int) -> None:
    """The real clock setter: CLOCK_REALTIME := wall_clock_ns (ns since the epoch).

    Raises:
        OSError: not permitted (needs CAP_SYS_TIME) or a value the kernel refuses.
    """
    time.clock_settime_ns(time.CLOCK_REALTIME, wall_clock_ns)


def add_entropy(data: bytes, *, device: str = URANDOM) -> bool:
    """Mix ``data`` into the kernel's input pool, crediting 8 bits a byte, then reseed the CRNG.

    Returns True when the CRNG was reseeded, False when the kernel cannot be asked to (no
    RNDRESEEDCRNG before Linux 4.17, or a CRNG not yet ready): the bytes are still in the pool
    and the kernel reseeds from it on its own schedule, which is logged.

    Raises:
        OSError: the entropy could not be added (EPERM without CAP_SYS_ADMIN; ``device`` is not
            a random device: ENOTTY/EINVAL).
    """
    if not data:
        return False
    # struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    info = bytearray(struct.pack("ii", 8 * len(data), len(data)) + data)
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info, True)
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY, errno.ENODATA):
                raise
            log(f"identity: entropy added but the CRNG was not reseeded now ({exc}); "
                "the kernel reseeds from the pool on its own schedule")
            return False
    finally:
        os.close(fd)
    return True


def read_boot_id() -> str:
    """/proc/sys/kernel/random/boot_id, or "" when it cannot be read."""
    try:
        with open(BOOT_ID) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def write_hostname_file(root: str, hostname: str) -> None:
    """/etc/hostname in the container root; a read-only or missing /etc is ignored (the
    kernel hostname is what counts), as Init does."""
    from .container import safe_join

    try:
        with open(safe_join(root, "etc/hostname"), "w") as fh:
            fh.write(hostname + "\n")
    except (OSError, ValueError):
        pass


def apply_identity(
    identity: IdentityMessage,
    *,
    root: str | None = None,
    set_clock: ClockSetter | None = step_realtime,
    set_hostname: HostnameSetter = libc.sethostname,
    random_device: str = URANDOM,
) -> Applied:
    """Give this guest the host's identity: entropy first, then the clock, then the hostname.

    ``root``: the mounted container root, whose /etc/hostname is rewritten too (None before
    Init). ``set_clock``: None never touches the clock (a native agent shares the host's);
    tests pass doubles for both setters and never change the host's clock or hostname.

    Returns:
        Applied(boot_id, clock_step): clock_step in seconds (0.0 when the clock was left).

    Raises:
        OSError: the entropy could not be added, or a setter failed.
    """
    reseeded = add_entropy(identity.entropy, device=random_device)
    step = 0.0
    if identity.wall_clock_ns and set_clock is not None:
        before = time.clock_gettime_ns(time.CLOCK_REALTIME)
        set_clock(identity.wall_clock_ns)
        step = (identity.wall_clock_ns - before) / 1e9
    if identity.hostname:
        set_hostname(identity.hostname)
        if root is not None:
            write_hostname_file(root, identity.hostname)
    boot_id = read_boot_id()
    log(
        f"identity: {len(identity.entropy)} bytes of entropy"
        f"{', CRNG reseeded' if reseeded else ''}; clock stepped {step:+.3f} s; "
        f"hostname {identity.hostname or '(kept)'}; boot_id {boot_id or '?'}"
    )
    return Applied(boot_id, step)
