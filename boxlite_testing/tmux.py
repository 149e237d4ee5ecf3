"""A real terminal for tests: a shell in a private tmux server (Debian package ``tmux``).

Why tmux: the CLI's terminal handling (raw mode, SIGWINCH, restoring settings) only shows on
a real terminal whose size can change, and tmux gives one to drive (``send-keys``), read
(``capture-pane``) and resize (``resize-window``) from a test, headless.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

#: what the host shell in the pane shows as its prompt
HOST_PROMPT = "HOST> "


def tmux_missing() -> str | None:
    """Why tmux tests cannot run here, or None."""
    if shutil.which("tmux") is None:
        return "tmux is not installed (Debian package: tmux)"
    return None


class TmuxTerminal:
    """One tmux session running ``sh`` with prompt :data:`HOST_PROMPT`, ``cols`` x ``rows``.

    Every tmux call is bounded (10 s); waits name what they waited for and show the screen.
    """

    def __init__(self, workdir: Path, *, env: Mapping[str, str], cols: int = 100,
                 rows: int = 30) -> None:
        self.socket = workdir / "tmux.sock"
        rc = workdir / "shrc"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        rc.write_text(f"{exports}PS1={shlex.quote(HOST_PROMPT)}\n")
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(cols),
                   "-y", str(rows), f"env ENV={rc} sh -i")
        self.wait_for(HOST_PROMPT)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True,
                              text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def type(self, text: str, enter: bool = True) -> None:
        """Type ``text`` literally (then Enter)."""
        self._tmux("send-keys", "-t", "t", "-l", text)
        if enter:
            self._tmux("send-keys", "-t", "t", "Enter")

    def key(self, *names: str) -> None:
        """Press keys by tmux name: ``C-c``, ``C-p``, ``Escape``, ``Enter``."""
        self._tmux("send-keys", "-t", "t", *names)

    def screen(self) -> str:
        """The visible screen plus history, wrapped lines joined."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", "t")

    def wait_for(self, text: str, timeout: float = 60.0, *, count: int = 1) -> str:
        """Wait until ``text`` shows ``count`` times on the screen; returns the screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} (x{count}) not on the terminal after "
                                     f"{timeout:g} s; screen:\n{screen}")
            time.sleep(0.1)

    def resize(self, cols: int, rows: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(cols), "-y", str(rows))

    def clear(self) -> None:
        """Forget the history so later waits see only what comes next."""
        self._tmux("clear-history", "-t", "t")
        self.type("clear")
        time.sleep(0.3)
        self._tmux("clear-history", "-t", "t")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                       timeout=10)
