"""The capped log writer: drains a VM's guest-fed byte stream into a size-capped, rotated file.

Why a program of its own: QEMU's ``file`` chardev appends whatever the guest writes to its
serial port, without limit (a root guest filled ~1 MiB/s, ~88 GiB a day), and QEMU cannot cap
a file chardev. So QEMU serves its console on a unix socket (``server=on,wait=on``), this
program connects to it and writes what arrives into ``console.log`` with a byte cap, rotating
to ``console.log.1`` ... ``console.log.N``: the files of one stream never hold more than
``max_bytes * (backups+1)``.

Other inputs, same caps: ``--fifo PATH`` reads a named pipe instead (a VMM that only takes a
console *path*, like libkrun's krun_set_console_output), ``--stdin`` reads standard input
instead (a daemon's stdout/stderr pipe: virtiofsd, whose log a guest can grow), and
``--stdin-out PATH`` also copies standard input (the read end of the VMM's stderr pipe:
qemu.log) to PATH.

Run as ``python -I logwriter.py --connect SOCKET --out PATH --max-bytes N [--backups K]``, by
path and outside the package (standard library only, like virtiofsd_launcher.py): one
interpreter start (~20 ms), no threads, a fixed receive buffer (memory does not grow with what
the guest sends).

No boot line is lost: with ``wait=on`` QEMU does not start the guest until a client (we) has
connected. The guest's vCPU never waits on us: QEMU's socket chardev writes without blocking;
a lagging writer only slows the guest's own UART (back-pressure through the socket buffer),
and while no writer is connected QEMU discards console output (a disconnected socket chardev
drops writes) until a new writer connects (``--append``: a re-started writer).

Exits when one of its inputs ends (QEMU closed the chardev or its stderr: it is exiting; the
other input gets a second to deliver its last bytes), on SIGTERM (after draining what is
already buffered), or when the socket did not accept within ``--connect-timeout`` seconds (a
VM that never started).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import time

#: bytes read per recv: the only buffer, so memory stays fixed whatever the guest sends
BUFFER = 64 * 1024
_DROPPED: list[bool] = []


class CappedFile:
    """An append-only file that rotates before it would exceed ``max_bytes``.

    Rotation shifts ``PATH.i`` to ``PATH.i+1`` (the oldest is overwritten), ``PATH`` becomes
    ``PATH.1`` and a new ``PATH`` starts, so index order is age order (smaller is newer). A
    chunk that does not fit is split, preferably after its last newline within the room left,
    so every file stays ≤ ``max_bytes`` and files mostly start on a line boundary.
    """

    def __init__(self, path: str, max_bytes: int, backups: int, fresh: bool) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be > 0 and backups >= 0")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        if fresh:
            for index in range(1, backups + 8):  # also older backups of a larger setting
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{path}.{index}")
        self.fd = self._open(truncate=fresh)
        self.size = os.fstat(self.fd).st_size
        #: the last byte written was a newline (a rotation there splits no line)
        self.line_end = True

    def _open(self, truncate: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        if truncate:
            flags |= os.O_TRUNC
        return os.open(self.path, flags, 0o600)

    def rotate(self) -> None:
        os.close(self.fd)
        if self.backups == 0:
            self.fd = self._open(truncate=True)
        else:
            for index in range(self.backups, 1, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{index - 1}", f"{self.path}.{index}")
            os.replace(self.path, f"{self.path}.1")
            self.fd = self._open(truncate=True)
        self.size = 0

    def write(self, data: memoryview) -> None:
        """Append ``data``, rotating as often as needed; never lets a file pass the cap."""
        while data:
            room = self.max_bytes - self.size
            if room <= 0:
                self.rotate()
                continue
            fits = len(data) <= room
            part = data if fits else data[:room]
            if not fits:
                cut = bytes(part).rfind(b"\n")
                if cut >= 0 and self.size + cut + 1 >= self.max_bytes // 2:
                    part = part[: cut + 1]  # end this file on a line boundary
                elif self.line_end and self.size >= self.max_bytes // 2:
                    self.rotate()  # the file already ends a line: start the next one
                    continue
            written = os.write(self.fd, part)
            self.size += written
            self.line_end = bool(written) and part[written - 1] == 0x0A
            data = data[written:]
            if not fits and written == len(part):
                self.rotate()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _write(out: CappedFile, data: memoryview) -> None:
    """Write, or drop the chunk when the disk refuses it (full, quota): a writer that died
    here would only make QEMU drop everything after it."""
    try:
        out.write(data)
    except OSError as exc:
        if not _DROPPED:  # once: this message must not become the next unbounded log
            print(f"boxlite: logwriter: dropping output: {exc}", file=sys.stderr, flush=True)
        _DROPPED.append(True)


class Source:
    """One guest-fed byte stream (the console socket or FIFO, the VMM's stderr pipe) and the
    capped file it goes to."""

    def __init__(self, name: str, out: CappedFile, fd: int | None = None,
                 sock: socket.socket | None = None) -> None:
        self.name = name
        self.out = out
        self.fd = fd
        self.sock = sock
        self.ended = False

    def attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock, self.fd = sock, sock.fileno()

    def read_into(self, buf: bytearray) -> int | None:
        """Bytes read into ``buf`` (0: the stream ended), None when nothing is there now."""
        assert self.fd is not None
        try:
            if self.sock is not None:
                return self.sock.recv_into(buf)
            return os.readv(self.fd, [buf])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return 0  # a reset connection ends the stream like a close

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.sock is not None:
                self.sock.close()
            elif self.fd is not None:
                os.close(self.fd)
        self.out.close()


def try_connect(path: str) -> socket.socket | None:
    """One attempt to connect to the VMM's listening console socket (it appears as the VMM
    starts); None while it is not there yet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _drain(source: Source, buf: bytearray, view: memoryview) -> None:
    """Write what the kernel already holds for ``source`` (never waits for more)."""
    if source.fd is None or source.ended:
        return
    if source.sock is None:
        os.set_blocking(source.fd, False)
    while (n := source.read_into(buf)):
        _write(source.out, view[:n])


def serve(sources: list[Source], connect_to: str | None, connect_timeout: float,
          stop: list[bool]) -> str:
    """Copy every source into its file until the VMM is gone; why we stopped.

    The VMM is gone when one of its streams ends (its console closed, its stderr pipe
    closed): the others then get one more second to deliver their last bytes. Also ends on
    SIGTERM (after draining) and when ``connect_to`` did not accept in time."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    console = sources[0]
    started = time.monotonic()
    ending: float | None = None
    reason = ""
    while True:
        if stop[0]:
            for source in sources:
                _drain(source, buf, view)
            return "SIGTERM"
        pending = connect_to is not None and console.fd is None and not console.ended
        if pending:
            assert connect_to is not None
            sock = try_connect(connect_to)
            if sock is not None:
                console.attach(sock)
                pending = False
            elif time.monotonic() - started > connect_timeout:
                console.ended = True
                reason = reason or f"{connect_to} did not accept within {connect_timeout:.0f}s"
        live = [s for s in sources if s.fd is not None and not s.ended]
        if ending is not None and (time.monotonic() - ending > 1.0 or not (live or pending)):
            return reason
        if not live and not pending:
            return reason or "nothing left to read"
        ready, _, _ = select.select([s.fd for s in live], [], [], 0.01 if pending else 0.5)
        for source in live:
            if source.fd not in ready:
                continue
            n = source.read_into(buf)
            if n is None:
                continue
            if n == 0:
                source.ended = True
                reason = reason or f"the VMM closed its {source.name}"
                ending = ending if ending is not None else time.monotonic()
                continue
            _write(source.out, view[:n])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logwriter", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="SOCKET",
                       help="the VMM's listening console socket (QEMU -chardev socket)")
    where.add_argument("--fifo", metavar="PATH",
                       help="a named pipe the VMM writes its console into (libkrun)")
    where.add_argument("--stdin", action="store_true",
                       help="standard input is the stream (a daemon's stderr pipe: virtiofsd)")
    parser.add_argument("--connected-fd", type=int, metavar="N",
                        help="with --connect: an inherited socket already connected to it "
                             "(the host bound the VMM's socket itself); a restarted writer "
                             "connects to SOCKET again")
    parser.add_argument("--out", required=True, help="the console log (rotated to OUT.1 ...)")
    parser.add_argument("--stdin-out", metavar="PATH",
                        help="also copy standard input (the VMM's stderr pipe) to PATH, capped")
    parser.add_argument("--max-bytes", type=int, required=True, help="cap of each file")
    parser.add_argument("--backups", type=int, default=2, help="rotated files kept")
    parser.add_argument("--append", action="store_true",
                        help="continue the existing files (a re-started writer)")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="give up if the socket does not accept within this many seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = [False]

    def _on_term(_signum: int, _frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # our session never has a terminal anyway
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    sources: list[Source] = []
    try:
        fresh = not args.append
        console = Source("console", CappedFile(args.out, args.max_bytes, args.backups, fresh))
        sources.append(console)
        if args.connected_fd is not None:
            if not args.connect:
                raise ValueError("--connected-fd goes with --connect SOCKET")
            console.attach(socket.socket(fileno=args.connected_fd))
        if args.fifo:
            console.fd = os.open(args.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if args.stdin:
            if args.stdin_out:
                raise ValueError("--stdin and --stdin-out both read standard input")
            console.name, console.fd = "output", 0
        if args.stdin_out:
            out = CappedFile(args.stdin_out, args.max_bytes, args.backups, fresh)
            sources.append(Source("stderr", out, fd=0))
    except (OSError, ValueError) as exc:
        print(f"boxlite: logwriter for {args.out}: {exc}", file=sys.stderr)
        return 2
    try:
        reason = serve(sources, args.connect, args.connect_timeout, stop)
    finally:
        for source in sources:
            source.close()
    print(f"boxlite: logwriter for {args.out}: exiting ({reason})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
