"""The `boxlite` command.

Contract: exit 0 on success; on a BoxliteError exactly one line ``boxlite: error: …`` on stderr
and the error's exit code (tracebacks only with BOXLITE_DEBUG=1). ``run``/``exec`` exit with
the command's own code (128+N for a signal, 124 for a timeout). stdout carries only what the
command asked for (the box's output, ids, JSON); progress goes to stderr.

Signals and pipes (notes/cli-lifecycle.md): SIGINT, SIGTERM and SIGHUP take one path — the
command in the box gets the same signal, then SIGKILL after KILL_GRACE seconds; ``run`` then
stops the box (and removes it with --rm) and the CLI exits 128+N (130, 143, 129) with one
``boxlite: error: interrupted by SIGxxx`` line. Further signals during that teardown are noted
and ignored, so a second ^C cannot leave a VM behind (SIGKILL still can: nothing catches it).
A closed stdout (``| head``) SIGKILLs the command in the box and exits 141 (128+SIGPIPE) after
the same teardown, with no error line, as a shell pipeline would. An exec whose box is
removed (``rm -f``) or stopped by someone else exits 137 with one error line naming that
(BoxGoneError), instead of a bare 137.

The commands are in app.py (the group) and one module per concern; this module is the entry
point (``boxlite``, ``python3 -m boxlite_core.cli.main``): logging, the signal gate, and the
mapping from an exception to one error line and an exit code.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

import click

from ..errors import BoxliteError
from .app import cli
from .output import EXIT_BROKEN_PIPE, error, silence_stdout
from .signals import GATE, Interrupted, signal_name


def _setup_logging(debug: bool) -> None:
    """Where library log records go.

    The core's warnings (a broken plugin, a sharer that would not stop) stay off stderr unless
    BOXLITE_DEBUG=1: the error contract is one line, and `backends`/`doctor` report plugins.
    Plugins' warnings (e.g. the TCG fallback notice) reach a terminal, but never a piped
    stderr, which belongs to the command running in the box.
    """
    root = logging.getLogger()
    core = logging.getLogger("boxlite_core")
    if debug:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("boxlite: %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        return
    core.addHandler(logging.NullHandler())
    core.propagate = False
    if sys.stderr.isatty():
        notice = logging.StreamHandler(sys.stderr)
        notice.setLevel(logging.WARNING)
        notice.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(notice)
    else:
        root.addHandler(logging.NullHandler())


def _invoke(args: list[str]) -> int:
    """click's Command.main minus its KeyboardInterrupt handling, which would turn our
    Interrupted into Abort (losing which signal it was) and print a blank line first."""
    try:
        with cli.make_context("boxlite", args) as ctx:
            rv = cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return rv if isinstance(rv, int) else 0


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command (``argv``, default ``sys.argv[1:]``) and exit with its code.

    Raises:
        SystemExit: always; the code per the contract above (0, the error's exit code,
            the command's own code, 128+N after a signal, 141 after a closed stdout).
    """
    debug = os.environ.get("BOXLITE_DEBUG") == "1"
    _setup_logging(debug)
    GATE.install()
    try:
        code = _invoke(list(argv) if argv is not None else sys.argv[1:])
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        error("aborted")
        code = 130
    except Interrupted as exc:
        error(f"interrupted by {signal_name(exc.signum)}")
        code = 128 + exc.signum
    except click.ClickException as exc:
        error(exc.format_message())
        code = exc.exit_code
    except BoxliteError as exc:
        if debug:
            traceback.print_exc()
        error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        error("interrupted")
        code = 130
    except BrokenPipeError:
        silence_stdout()  # `boxlite logs | head`: the reader left; like a shell, no message
        code = EXIT_BROKEN_PIPE
    except Exception as exc:
        if debug:
            traceback.print_exc()
        error(f"internal error: {type(exc).__name__}: {exc} (BOXLITE_DEBUG=1 for a traceback)")
        code = 70
    GATE.close()
    if GATE.received is not None and code == 0:
        code = 128 + GATE.received  # arrived during a shielded teardown: still report it
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    sys.exit(code)


def entry() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's teardown.

    Why: once grpc is imported, Python's own exit spends ~0.1 s shutting grpc's core down
    (measured: ``import grpc`` alone adds 80 ms after the last atexit handler), on every
    ``boxlite`` command, after the work is done and the exit code is known. Everything the
    CLI writes is closed by then (``with`` blocks); stdout, stderr and logging are flushed
    here. In-process callers (tests) use :func:`main`, which exits normally.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
