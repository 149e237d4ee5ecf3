"""What the CLI writes, and the rules for writing it.

stdout carries only what the command asked for (the box's output, ids, JSON); errors are one
line ``boxlite: error: …`` on stderr. Error lines carry text the guest chose (agent error
details, console tails), so every one passes through the same escape rule as ``boxlite logs``:
raw, an escape sequence in it would drive the user's terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence

import click

from ..models import JsonValue

#: longest error line, in characters, before it is cut with "…"
MAX_ERROR_CHARS = 600
#: exit code after our stdout closed: what a shell reports for a writer killed by SIGPIPE
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def silence_stdout() -> None:
    """Point fd 1 at /dev/null once the reader is gone: later flushes (ours, Python's at exit)
    then succeed instead of printing "Exception ignored ... BrokenPipeError"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def inert(text: str) -> str:
    """One line of an error with every non-printable character written as an escape (the rule
    of :func:`boxlite_core.vmm.consolelog.inert`, tabs as spaces)."""
    from ..vmm.consolelog import inert as console_inert

    return console_inert(text.replace("\t", " "))


def one_line(message: str) -> str:
    """``message`` as one inert line of at most MAX_ERROR_CHARS: lines joined by " | "."""
    lines = (inert(line).strip() for line in str(message).splitlines())
    text = " | ".join(line for line in lines if line)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text or "unknown error"


@contextlib.contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """Print each Python warning raised inside as one ``boxlite: warning: …`` line on stderr
    (escaped like errors), instead of Python's default file:line format."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                with contextlib.suppress(OSError):
                    print(f"boxlite: warning: {one_line(str(warning.message))}",
                          file=sys.stderr, flush=True)


def error(message: str) -> None:
    """Print the one ``boxlite: error: …`` line; never raises (stderr may be gone)."""
    try:
        print(f"boxlite: error: {one_line(message)}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr is gone too (a closed terminal after SIGHUP): the exit code remains


def emit_json(data: JsonValue) -> None:
    """``data`` (a record's ``to_dict()``, ``info()``, metrics) on stdout, indented, keys
    sorted (stable for diffs and tests)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    """Left-aligned columns two spaces apart, header first (docker-style listing)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def ago(ts: float | None) -> str:
    """A Unix timestamp (seconds) as "5m ago"; "-" when unknown."""
    if not ts:
        return "-"
    secs = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"
