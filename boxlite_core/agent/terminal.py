"""Pseudo-terminals for tty execs, allocated on the container's own devpts.

Why the container's devpts (``ROOT/dev/pts``, a ``newinstance`` mount made at Init) and not
the guest's: the slave must be a node the program can see, so ``tty`` prints ``/dev/pts/0``
and programs that reopen their terminal by name (``ttyname(0)``, ``ssh``, ``sudo``) find it.
The slave is opened through the master with TIOCGPTPEER (Linux 4.13+): no path lookup, so
nothing in the container root can swap the node under us. Linux ioctl numbers: see
``ioctl_tty(2)`` and include/uapi/asm-generic/ioctls.h.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios

# Not exported by Python's termios module (asm-generic values: x86-64 and arm64 alike)
TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430
DEFAULT_SIZE = (24, 80)  # rows, cols: what a terminal without a size reports (VT100)
MAX_CELLS = 0xFFFF  # struct winsize fields are unsigned short


def open_pty(root: str) -> tuple[int, int]:
    """(master, slave) fds of a new pty, both close-on-exec, on ``root``'s devpts when it
    has one (falls back to the guest's own ``/dev/ptmx``, as before Init).

    Raises:
        OSError: no pty could be allocated (devpts missing or full).
    """
    ptmx = os.path.join(root, "dev/pts/ptmx")
    if not os.path.exists(ptmx):
        ptmx = "/dev/ptmx"
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt(3)
        try:
            slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
            number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
            slave = os.open(os.path.join(os.path.dirname(ptmx), str(number)),
                            os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except BaseException:
        os.close(master)
        raise
    return master, slave


def clamp_size(rows: int, cols: int) -> tuple[int, int]:
    """A window size the kernel can hold; 0 (unset) means the default 24 x 80."""
    rows = min(max(int(rows), 0), MAX_CELLS) or DEFAULT_SIZE[0]
    cols = min(max(int(cols), 0), MAX_CELLS) or DEFAULT_SIZE[1]
    return rows, cols


def set_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a pty (either side): the kernel signals SIGWINCH to the terminal's
    foreground process group when the size changes."""
    rows, cols = clamp_size(rows, cols)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of a pty."""
    rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def make_controlling(fd: int) -> None:
    """Make ``fd`` (a pty slave) the calling session leader's controlling terminal."""
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
