"""Run a program of the guest root (``ip``, ``nft``) from the agent, bounded in time.

Why not subprocess: as PID 1 the agent's reaper owns waitpid(-1) (pid1.Reaper), so every fork
goes through it; subprocess would race it for the child's status.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

from .pid1 import Reaper

#: the guest root's programs; the agent's own environment is not meant for children
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_LIMIT = 64 * 1024


class CommandError(RuntimeError):
    """A program failed, was missing or timed out; the message names it and quotes its output."""


def run(reaper: Reaper, argv: list[str], *, stdin: bytes = b"", timeout: float = 10.0) -> str:
    """Run ``argv`` with ``stdin`` and return its stdout+stderr (text, at most 64 KiB).

    Raises CommandError: exit status not 0 (output quoted), not found, or still running after
    ``timeout`` seconds (then killed)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    done = threading.Event()
    statuses: list[int] = []

    def child() -> None:
        os.dup2(in_r, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.closerange(3, 1 << 16)
        try:
            os.execvpe(argv[0], argv, {"PATH": PATH, "LC_ALL": "C"})
        except OSError as exc:
            os.write(2, f"cannot run {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)

    def on_exit(status: int) -> None:
        statuses.append(status)
        done.set()

    pid = reaper.spawn(child, on_exit)
    os.close(in_r)
    os.close(out_w)
    deadline = time.monotonic() + timeout
    output = bytearray()
    try:
        try:
            os.write(in_w, stdin)  # small inputs (a ruleset): fits the pipe buffer
        except OSError:
            pass
        os.close(in_w)
        in_w = -1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise CommandError(f"{argv[0]} did not finish within {timeout:g} s (killed)")
            ready, _, _ = select.select([out_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(out_r, 65536)
            if not chunk:
                break
            if len(output) < OUTPUT_LIMIT:
                output += chunk
        if not done.wait(max(0.0, deadline - time.monotonic())):
            os.kill(pid, signal.SIGKILL)
            raise CommandError(f"{argv[0]} did not exit within {timeout:g} s (killed)")
    finally:
        if in_w >= 0:
            os.close(in_w)
        os.close(out_r)
    text = output.decode(errors="replace")
    code = os.waitstatus_to_exitcode(statuses[0])
    if code != 0:
        raise CommandError(f"{' '.join(argv)} failed (exit {code}): {text.strip()[-800:]}")
    return text
