"""In-process capped logs: a byte stream drained by a thread into a size-capped, rotated file.

For host processes that are themselves the guest-fed party's peer and live exactly as long
as what they log: the per-box agent shim (``shim.log``) and the hvf runner, which *is* the
VM (its console and ``runner.log``). A separate writer process (:mod:`.logwriter`, used for
QEMU, libkrun and virtiofsd) is for VMMs we cannot change; here a thread does the same job
with the same :class:`~.logwriter.CappedFile` (rotation to ``.1`` .. ``.N``, every file
≤ the cap) and the same fixed 64 KiB buffer, and needs no process identity or restart logic.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from pathlib import Path

from .logwriter import BUFFER, CappedFile

#: rotated copies kept besides the live file (as for the console: at most 3 times the cap)
BACKUPS = 2


class CappedPipe:
    """A pipe whose read end a daemon thread copies into ``path`` under ``max_bytes`` per
    file. Hand :attr:`write_fd` to whoever writes (it may keep it: :meth:`close` does not
    wait for EOF). ``fresh`` truncates the existing files; otherwise they are continued.
    Raises OSError when the file cannot be opened, ValueError for a cap of 0 or less."""

    def __init__(self, path: Path, max_bytes: int, backups: int = BACKUPS,
                 fresh: bool = True) -> None:
        self.out = CappedFile(str(path), max_bytes, backups, fresh)
        self._read, self.write_fd = os.pipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True,
                                        name=f"capped-{Path(path).name}")
        self._thread.start()

    def _copy_once(self, buf: bytearray, view: memoryview) -> bool:
        """Copy what is there now; False at end of stream."""
        try:
            n = os.readv(self._read, [buf])
        except BlockingIOError:
            return True
        if n:
            with contextlib.suppress(OSError):  # a full disk costs lines, not the writer
                self.out.write(view[:n])
        return bool(n)

    def _drain(self) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        os.set_blocking(self._read, False)
        while not self._stop.is_set():
            ready, _, _ = select.select([self._read], [], [], 0.2)
            if ready and not self._copy_once(buf, view):
                return
        while self._copy_once(buf, view):  # stop asked: what the pipe still holds, then end
            try:
                if not select.select([self._read], [], [], 0)[0]:
                    return
            except OSError:
                return

    def close(self, timeout: float = 2.0) -> None:
        """Copy what the pipe holds now, then stop the thread and close the files."""
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            with contextlib.suppress(OSError):
                os.close(self._read)
            self.out.close()


class CappedOutput:
    """This process's stdout and stderr, at the file-descriptor level, into a capped,
    rotated file (continued across runs: the existing file is appended to).

    Why fds 1 and 2 and not a logging handler: besides our own prints, C libraries (gRPC's
    core) and faulthandler (SIGUSR1 stack dumps) write straight to fd 2. Both fds become the
    write end of a :class:`CappedPipe`. Raises OSError when the file cannot be opened (the
    caller then keeps its inherited output)."""

    def __init__(self, path: Path, max_bytes: int, backups: int = BACKUPS) -> None:
        self.pipe = CappedPipe(path, max_bytes, backups, fresh=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.pipe.write_fd, 1)
        os.dup2(self.pipe.write_fd, 2)
        os.close(self.pipe.write_fd)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is still buffered and stop (fds 1 and 2 then go to /dev/null)."""
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the pipe's last write ends close: nothing more can arrive
        os.dup2(null, 2)
        os.close(null)
        self.pipe.close(timeout)
