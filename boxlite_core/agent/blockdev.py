"""Block devices the agent mounts: dropping what the guest cached of them.

stdlib only (this runs in the guest as part of PID 1).
"""

from __future__ import annotations

import fcntl
import os

from .pid1 import log

#: linux/fs.h: _IO(0x12, 97); write back and drop a block device's buffer cache
BLKFLSBUF = 0x1261


def flush_block_device(device: str) -> bool:
    """Write back and drop ``device``'s buffer cache (BLKFLSBUF) before it is mounted.

    Why: a guest restored from a boot template may still hold cached sectors of the disk the
    template was made with (another image in the same slot); mounting without dropping them
    could read that disk's blocks. Returns False (and logs) when the flush failed: mounting
    goes on, as a cold-booted guest has nothing cached.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        log(f"warning: cannot drop the buffer cache of {device} before mounting it: {exc}")
        return False
    return True
