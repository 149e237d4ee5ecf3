"""The process that becomes the VM: ``python -m boxlite_libkrun.launcher``.

Why a child process: ``krun_start_enter`` never returns on success — libkrun takes over the
calling process and ``exit()``s it when the guest shuts down. The runtime must survive that, so
the krun calls run in a child started with an argv list (``start_new_session=True``).

Protocol with :meth:`LibkrunBackend.launch`:

* stdin: one JSON object ``{"library": path, "calls": [...]}`` (never on the command line,
  where every user could read it in ``ps``);
* ``--status-fd N``: the launcher writes one line there — ``OK`` just before
  ``krun_start_enter``, or ``ERROR <message>`` when a configuration call fails — then closes it,
  so launch() reports configuration errors at once, naming the call;
* stderr: ``boxlite-libkrun: <message>`` for any failure (also ``krun_start_enter``'s), which
  the handle's ``exit_reason()`` quotes from the box's launcher log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .binding import KrunCallError, KrunLibrary

ERROR_PREFIX = "boxlite-libkrun: "
EXIT_CONFIG_ERROR = 71  # EX_OSERR-ish; distinct from the guest workload codes libkrun uses


class LaunchError(Exception):
    """A configuration step failed; the message names the krun call."""


def _run_one(lib: KrunLibrary, entry: Mapping[str, Any], ctx: int | None) -> int:
    name = entry["call"]
    present_symbol = entry.get("if_present")
    if present_symbol and not lib.has(present_symbol):
        return 0
    args = entry.get("args", [])
    fallback = entry.get("fallback")
    if fallback and not lib.has(name):
        name, args = fallback["call"], fallback.get("args", [])
    rc = lib.call(name, *args, ctx=ctx)
    if "expect" in entry and rc != entry["expect"]:
        raise LaunchError(
            f"{name}({', '.join(map(str, args))}) returned {rc}, expected {entry['expect']}: "
            f"{entry.get('why', '')}; install a libkrun with that feature"
        )
    return rc


def configure(lib: KrunLibrary, calls: Sequence[Mapping[str, Any]]) -> int | None:
    """Replay every call up to (not including) krun_start_enter; return the context id."""
    ctx: int | None = None
    for entry in calls:
        if entry["call"] == "krun_start_enter":
            break
        try:
            rc = _run_one(lib, entry, ctx)
        except KrunCallError as exc:
            raise LaunchError(str(exc)) from exc
        if entry["call"] == "krun_create_ctx":
            ctx = rc
    if ctx is None:
        raise LaunchError("plan has no krun_create_ctx call")
    return ctx


def _report(status_fd: int | None, line: str) -> None:
    if status_fd is None:
        return
    try:
        os.write(status_fd, (line.replace("\n", " ") + "\n").encode())
        os.close(status_fd)
    except OSError:
        pass  # the parent gave up waiting; stderr still has the message


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boxlite_libkrun.launcher")
    parser.add_argument("--status-fd", type=int, default=None)
    opts = parser.parse_args(argv)
    status_fd = opts.status_fd

    try:
        request = json.loads(sys.stdin.buffer.read())
        library, calls = request["library"], request["calls"]
    except (ValueError, KeyError, TypeError) as exc:
        message = f"bad launch request on stdin: {exc}"
        print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
        _report(status_fd, "ERROR " + message)
        return EXIT_CONFIG_ERROR
    # libkrun takes over stdin for the guest console: give it nothing to read.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # Sockets and files libkrun creates (the agent socket) must be the user's alone (0600).
    os.umask(0o077)

    ctx: int | None = None
    try:
        lib = KrunLibrary(library)
        ctx = configure(lib, calls)
    except Exception as exc:  # every failure here is reported, none is a traceback
        message = str(exc)
        print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
        _report(status_fd, "ERROR " + message)
        return EXIT_CONFIG_ERROR

    _report(status_fd, "OK")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        lib.call("krun_start_enter", ctx=ctx)  # on success, never returns
    except KrunCallError as exc:
        print(ERROR_PREFIX + str(exc), file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    print(ERROR_PREFIX + "krun_start_enter returned without error", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
