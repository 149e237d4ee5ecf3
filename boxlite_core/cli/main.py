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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from ..errors import BoxliteError, ConfigError, NotFoundError
from ..models import BoxOptions, BoxStatus, check_timeout
from .progress import Reporter

MAX_ERROR_CHARS = 600
#: seconds the command in the box has to exit after the signal we forward, before SIGKILL
KILL_GRACE = 2.0
#: exit code after our stdout closed: what a shell reports for a writer killed by SIGPIPE
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
#: signals that tear a run down like ^C (SIGINT); installed by main(), never by the library
TEARDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: raised in the main thread so every `finally` (stop,
    --rm) runs, as for ^C. A KeyboardInterrupt so library code that already cleans up after
    ^C (CleanupGuard) does the same for SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalGate:
    """Turns the first teardown signal into Interrupted; notes and ignores every later one.

    Why ignore later ones: a second ^C (or systemd's SIGTERM after our SIGINT) raised in the
    middle of stopping the VM would abandon the stop and orphan QEMU. While ``shielded``
    (teardown after a normal exit) even the first signal is only noted; main() reports it.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.shield_depth = 0

    def handler(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self.shield_depth == 0:
            raise Interrupted(signum)

    def install(self) -> None:
        """Route TEARDOWN_SIGNALS here (main thread only; a signal ignored by our parent, e.g.
        SIGHUP under nohup, stays ignored)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in TEARDOWN_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            signal.signal(sig, self.handler)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Run a teardown that a signal must not cut short."""
        self.shield_depth += 1
        try:
            yield
        finally:
            self.shield_depth -= 1


_GATE = _SignalGate()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null once the reader is gone: later flushes (ours, Python's at exit)
    then succeed instead of printing "Exception ignored ... BrokenPipeError"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _inert(text: str) -> str:
    """One line of an error with every non-printable character written as an escape. Error
    lines carry text the guest chose (agent error details, console tails): raw, an escape
    sequence in them would drive the user's terminal. The same rule as ``boxlite logs``."""
    from ..vmm.consolelog import inert

    return inert(text.replace("\t", " "))


def _one_line(message: str) -> str:
    lines = (_inert(line).strip() for line in str(message).splitlines())
    text = " | ".join(line for line in lines if line)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text or "unknown error"


def _error(message: str) -> None:
    try:
        print(f"boxlite: error: {_one_line(message)}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr is gone too (a closed terminal after SIGHUP): the exit code remains


def _runtime() -> Any:
    from ..runtime.runtime import Runtime

    return Runtime()


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise ConfigError(f"-e {item!r}: expected KEY=VALUE")
        if not sep:  # docker semantics: -e KEY takes the host's value
            if key not in os.environ:
                raise ConfigError(f"-e {key}: not set on the host; use -e {key}=VALUE")
            value = os.environ[key]
        env[key] = value
    return env


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _ago(ts: float | None) -> str:
    import time

    if not ts:
        return "-"
    secs = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


# ------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="boxlite-core", prog_name="boxlite")
def cli() -> None:
    """boxlite: run untrusted code in micro-VMs."""


# -- plugins / host ------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def backends(as_json: bool) -> int:
    """VMM backends, whether they work here (and if not, why), and plugin failures."""
    from ..plugins import PluginRegistry

    reg = PluginRegistry()
    probes = reg.probe_all()
    out = []
    for name in reg.backend_names():
        probe = probes[name]
        try:
            caps = sorted(c.value if hasattr(c, "value") else str(c)
                          for c in reg.backend(name).capabilities())
        except Exception as exc:
            caps = []
            probe_reason = f"capabilities() raised {type(exc).__name__}: {exc}"
            probe = type(probe)(False, reason=probe_reason, fix=probe.fix)
        out.append({
            "name": name,
            "plugin": reg.backend_plugin(name),
            "available": probe.available,
            "reason": probe.reason,
            "fix": probe.fix,
            "details": dict(probe.details),
            "capabilities": caps,
        })
    failures = [f.to_dict() for f in reg.failures]
    if as_json:
        _emit_json({
            "backends": out,
            "failures": failures,
            "rootfs_strategies": reg.strategy_names(),
            "volume_sharers": reg.sharer_names(),
        })
        return 0
    if not out:
        click.echo("no VMM backends installed; e.g. pip install boxlite-qemu")
    for b in out:
        mark = "available" if b["available"] else "unavailable"
        click.echo(f"{b['name']} ({b['plugin']}): {mark}")
        if b["reason"]:
            click.echo(f"  reason: {b['reason']}")
        if b["fix"] and not b["available"]:
            click.echo(f"  fix: {b['fix']}")
        click.echo(f"  capabilities: {', '.join(b['capabilities']) or '-'}")
    for f in failures:
        click.echo(f"plugin {f['plugin']} FAILED ({f['where']}): {f['error']}")
    return 0


@cli.command()
def doctor() -> int:
    """Check this host: programs, acceleration, disk space, backends, guest kit."""
    from .doctor import run_checks

    results = run_checks()
    worst = 0
    for check in results:
        line = f"{check.level:<4} {check.name}: {check.detail}"
        if check.fix and check.level != "ok":
            line += f" — fix: {check.fix}"
        click.echo(line)
        worst = max(worst, {"ok": 0, "warn": 0, "fail": 1}[check.level])
    return worst


@cli.group()
def guest() -> None:
    """The guest kit (kernel, initramfs, agent root image)."""


@guest.command("build")
@click.option("--force", is_flag=True, help="rebuild even if the kit is cached")
def guest_build(force: bool) -> int:
    """Build (or find) the guest kit in the cache."""
    from ..kit import build_kit
    from ..runtime.runtime import default_home

    with Reporter() as progress:
        kit = build_kit(default_home(), progress=progress, force=force)
    click.echo(f"{kit.kit_id} {kit.directory}")
    return 0


# -- images --------------------------------------------------------------------------------


@cli.group()
def images() -> None:
    """Local images."""


@images.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", "ref", default=None, help="reference to store it under (name:tag)")
def images_import(path: str, ref: str | None) -> int:
    """Import an OCI layout directory, OCI archive or `docker save` tar."""
    rt = _runtime()
    with Reporter() as progress:
        image = rt.images.import_path(Path(path), name=ref, progress=progress)
    click.echo(f"{image.reference} {image.digest}")
    return 0


@images.command("ls")
@click.option("--json", "as_json", is_flag=True)
def images_ls(as_json: bool) -> int:
    """List local images."""
    items = list(_runtime().images.list())
    if as_json:
        _emit_json([i.to_dict() for i in items])
        return 0
    _table(
        [[i.reference, i.short_id, f"{i.size / 1e6:.1f}MB", str(len(i.layers))] for i in items],
        ["REFERENCE", "ID", "SIZE", "LAYERS"],
    )
    return 0


@images.command("rm")
@click.argument("ref")
def images_rm(ref: str) -> int:
    """Remove an image reference (refused while a box uses it)."""
    rt = _runtime()
    in_use = frozenset(r.image_digest for r in rt.list() if r.image_digest)
    rt.images.remove(ref, in_use=in_use)
    click.echo(ref)
    return 0


# -- boxes ---------------------------------------------------------------------------------


@cli.command("ls")
@click.option("-a", "--all", "show_all", is_flag=True, help="include stopped and failed boxes")
@click.option("--json", "as_json", is_flag=True)
def ls(show_all: bool, as_json: bool) -> int:
    """List boxes (running ones; -a for all)."""
    records = _runtime().list(all=show_all)
    if as_json:
        _emit_json([r.to_dict() for r in records])
        return 0
    rows = []
    for r in records:
        status = r.status.value
        if r.status is BoxStatus.FAILED and r.error:
            status += f" ({_one_line(r.error)[:60]})"
        elif r.status is BoxStatus.STARTING:  # where it is, or that its starter is gone
            status += f" ({'abandoned, ' if r.abandoned else ''}{r.stage or 'queued'})"
        rows.append([r.id, r.name, r.image, r.backend or "-", _ago(r.created_at), status])
    _table(rows, ["ID", "NAME", "IMAGE", "BACKEND", "CREATED", "STATUS"])
    return 0


@cli.command()
@click.argument("box")
def inspect(box: str) -> int:
    """A box's record as JSON (options, status, error, stage timings)."""
    _emit_json(_runtime().get(box).info())
    return 0


@cli.command("rm")
@click.option("-f", "--force", is_flag=True, help="stop running boxes first")
@click.argument("boxes", nargs=-1, required=True)
def rm(force: bool, boxes: tuple[str, ...]) -> int:
    """Remove boxes (files and record)."""
    rt = _runtime()
    code = 0
    for ref in boxes:
        try:
            rt.remove(ref, force=force)
            click.echo(ref)
        except BoxliteError as exc:
            _error(str(exc))
            code = max(code, exc.exit_code)
    return code


@cli.command()
@click.argument("box")
def start(box: str) -> int:
    """Start a configured, stopped or failed box."""
    rt = _runtime()
    b = rt.get(box)
    with Reporter(plain_off_tty=False) as progress:
        b.start(progress=progress)
    rt.close()  # detach: the box keeps running
    click.echo(b.name)
    return 0


@cli.command()
@click.option("-t", "--timeout", default=10.0, show_default=True, help="seconds before forcing")
@click.argument("box")
def stop(box: str, timeout: float) -> int:
    """Stop a running box (clean guest shutdown, then force)."""
    check_timeout("-t/--timeout", timeout, allow_zero=True)
    rt = _runtime()
    b = rt.get(box)
    b.stop(timeout=timeout)
    if b.record.options.auto_remove:
        rt.remove(b.id, force=True)
    click.echo(b.name)
    return 0


@cli.command()
@click.argument("box")
def pause(box: str) -> int:
    """Freeze a running box's vCPUs (it keeps its memory; execs wait); see `resume`."""
    b = _runtime().get(box)
    b.pause()
    click.echo(b.name)
    return 0


@cli.command()
@click.argument("box")
def resume(box: str) -> int:
    """Let a paused box run again."""
    b = _runtime().get(box)
    b.resume()
    click.echo(b.name)
    return 0


@cli.command()
@click.option("-f", "--follow", is_flag=True,
              help="keep printing new output (across rotation) until the box stops or ^C")
@click.option("-n", "--tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="only the last N lines (reads just the end of the log)")
@click.option("--raw", is_flag=True,
              help="the guest's bytes as they are, escape sequences included, even on a "
                   "terminal (piped output is always raw)")
@click.argument("box")
def logs(box: str, follow: bool, tail: int | None, raw: bool) -> int:
    """The guest's serial console log of the current (or last) boot.

    The guest wrote these bytes. On a terminal, control characters (escape sequences, bare
    carriage returns, backspaces, bidi overrides) are shown as \\xNN text so the guest cannot
    drive your terminal; piped or with --raw, the bytes pass unchanged."""
    from ..vmm.consolelog import TerminalSafe

    chunks = _runtime().get(box).log_chunks(tail=tail, follow=follow)
    sys.stdout.flush()
    out = sys.stdout.buffer
    encoding = sys.stdout.encoding or "utf-8"
    safe = None if raw or not sys.stdout.isatty() else TerminalSafe()
    try:
        for chunk in chunks:
            out.write(safe.feed(chunk).encode(encoding, "replace") if safe else chunk)
            if follow:
                out.flush()
        if safe is not None:
            out.write(safe.flush().encode(encoding, "replace"))
    except KeyboardInterrupt:
        pass  # ^C ends a follow: not an error
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        out.flush()
    return 0


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def metrics(as_json: bool) -> int:
    """Runtime counters (boxes created/failed/stopped/running, execs)."""
    data = _runtime().metrics()
    if as_json:
        _emit_json(data)
    else:
        for key in sorted(data):
            click.echo(f"{key} {data[key]}")
    return 0


def _split_box_path(text: str) -> tuple[str | None, str]:
    box, sep, path = text.partition(":")
    if sep and box and "/" not in box and path.startswith("/"):
        return box, path
    return None, text


@cli.command()
@click.argument("src")
@click.argument("dst")
def cp(src: str, dst: str) -> int:
    """Copy files: `boxlite cp HOSTPATH BOX:/path` or `boxlite cp BOX:/path HOSTPATH`.

    Like `docker cp`: into DEST if it is an existing directory, else to DEST; `BOX:/dir/.`
    copies the directory's contents; a symlink is copied as a link. Out of a box, nothing
    at or under DEST is followed if it is a symlink, and setuid/setgid bits are dropped
    from files (with a warning).
    """
    import warnings

    src_box, src_path = _split_box_path(src)
    dst_box, dst_path = _split_box_path(dst)
    if (src_box is None) == (dst_box is None):
        raise ConfigError("cp: exactly one of SRC and DST must be BOX:/path")
    rt = _runtime()
    if dst_box is not None:
        rt.get(dst_box).copy_in(src_path, dst_path)
    else:
        assert src_box is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rt.get(src_box).copy_out(src_path, dst_path)
        for warning in caught:
            click.echo(f"warning: {warning.message}", err=True)
    rt.close()
    return 0


def _command(cmd: Sequence[str]) -> list[str]:
    """CMD as typed: click keeps a `--` that follows the first positional argument."""
    argv = list(cmd)
    return argv[1:] if argv[:1] == ["--"] else argv


def _stream(box: Any, argv: list[str], *, interactive: bool, env: dict[str, str] | None = None,
            cwd: str | None = None, user: str | None = None,
            timeout: float | None = None) -> int:
    """Run argv in the box, streaming its output to our fds; return the shell-style code."""
    execution = box.exec_stream(argv, env=env, cwd=cwd, user=user, timeout=timeout,
                                stdin=interactive)
    if interactive:
        def feed() -> None:
            fd = sys.stdin.fileno()
            try:
                while True:
                    data = os.read(fd, 64 * 1024)
                    if not data:
                        break
                    execution.write_stdin(data)
                execution.close_stdin()
            except Exception:
                pass  # the process exited or the box died: wait() reports that

        threading.Thread(target=feed, daemon=True, name="boxlite-stdin").start()
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    out_closed = err_closed = False
    try:
        for stream, data in execution.events():
            if stream == "stdout" and not out_closed:
                try:
                    out.write(data)
                    out.flush()
                except BrokenPipeError:
                    # Our reader is gone (`| head`): in a shell the writer would die of
                    # SIGPIPE. In the box it never would (its pipe is the agent's), so it is
                    # SIGKILLed - SIGPIPE can be ignored, and then `yes` would run forever.
                    out_closed = True
                    _silence_stdout()
                    with _GATE.shielded():
                        execution.kill(signal.SIGKILL)
            elif stream == "stderr" and not err_closed:
                try:
                    err.write(data)
                    err.flush()
                except BrokenPipeError:
                    err_closed = True  # stderr is diagnostics only: keep the command running
        status = execution.wait()
    except KeyboardInterrupt as exc:
        with _GATE.shielded():
            _end_command(execution, getattr(exc, "signum", signal.SIGINT))
        raise
    return EXIT_BROKEN_PIPE if out_closed else status.returncode


def _end_command(execution: Any, signum: int) -> None:
    """Pass our signal on to the command in the box; SIGKILL it if it outlives KILL_GRACE."""
    execution.kill(signum)
    try:
        execution.wait(KILL_GRACE)
        return
    except TimeoutError:
        pass
    except Exception:
        return  # the box is gone or unreachable: the caller's teardown settles it
    execution.kill(signal.SIGKILL)
    with contextlib.suppress(Exception):
        execution.wait(KILL_GRACE)


_EXEC_CONTEXT = {"allow_interspersed_args": False}


@cli.command(context_settings=_EXEC_CONTEXT)
@click.option("--backend", default=None, help="VMM backend (see `boxlite backends`)")
@click.option("--rm", "auto_remove", is_flag=True, help="remove the box when it stops")
@click.option("-d", "--detach", is_flag=True, help="start, print the box id, leave it running")
@click.option("--name", default=None, help="box name (unique)")
@click.option("-v", "--volume", "volumes", multiple=True, help="HOST:GUEST[:ro]")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE")
@click.option("-w", "--workdir", default=None, help="working directory in the box")
@click.option("-u", "--user", default=None, help="user[:group] in the box")
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", "memory", type=int, default=512, show_default=True, help="MiB")
@click.option("--rootfs", default="disk", show_default=True, help="disk | merged | layers")
@click.option("--sharer", default=None, help="volume sharer: virtiofs | 9p")
@click.option("--timeout", type=float, default=None, help="seconds before the command is killed")
@click.option("-i", "--interactive", is_flag=True, help="feed our stdin to the command")
@click.option("--console-log-max-mib", "console_mib", type=int, default=4, show_default=True,
              help="cap of each guest console file on the host (rotated, 3 kept)")
@click.argument("image")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def run(backend: str | None, auto_remove: bool, detach: bool, name: str | None,
        volumes: tuple[str, ...], env: tuple[str, ...], workdir: str | None, user: str | None,
        cpus: int, memory: int, rootfs: str, sharer: str | None, timeout: float | None,
        interactive: bool, console_mib: int, image: str, cmd: tuple[str, ...]) -> int:
    """Create a box from IMAGE, start it, run CMD (or the image's Entrypoint+Cmd)."""
    check_timeout("--timeout", timeout)
    options = BoxOptions(
        image=image, backend=backend, cpus=cpus, memory_mib=memory, env=_parse_env(env),
        workdir=workdir, user=user, volumes=volumes, name=name, rootfs=rootfs,
        volume_sharer=sharer, auto_remove=auto_remove, console_log_max_mib=console_mib,
    )
    if detach and interactive:
        raise ConfigError("-d and -i do not mix: a detached box has no stdin")
    rt = _runtime()
    box = rt.create(options)
    try:
        argv = _command(cmd) or (None if detach else box.default_command())
        with Reporter(plain_off_tty=False) as progress:
            box.start(progress=progress)
        if detach:
            if argv:
                box.exec_stream(argv)  # started in the background; output kept by the agent
            rt.close()
            click.echo(box.id)
            return 0
        assert argv is not None
        return _stream(box, argv, interactive=interactive, timeout=timeout)
    except BaseException as exc:
        # --rm removes a box whose start failed too: its console log goes with it, so the one
        # error line must carry the reason and the console's last lines.
        if auto_remove and isinstance(exc, BoxliteError):
            with contextlib.suppress(Exception):
                if box.status is BoxStatus.FAILED:
                    _summarise_removed_failure(exc, box)
        raise
    finally:
        primary = sys.exc_info()[1]
        with _GATE.shielded():
            try:
                _finish_run(rt, box, detach=detach, auto_remove=auto_remove)
            except BoxliteError:
                if primary is None:
                    raise
                # the run already failed: that error is the one to report


def _finish_run(rt: Any, box: Any, *, detach: bool, auto_remove: bool) -> None:
    """After `run`, on every path (success, command error, start failure, signal, closed
    pipe): stop the box unless detached; remove it with --rm unless it is left running."""
    try:
        status = box.status
    except NotFoundError:
        return  # removed under us (`boxlite rm -f`): nothing left to stop
    failed = status is BoxStatus.FAILED
    if not detach:
        try:
            box.stop()
        finally:
            if auto_remove:
                rt.remove(box.id, force=True)
    elif auto_remove and status is not BoxStatus.RUNNING:
        rt.remove(box.id, force=True)
    if failed and not auto_remove:
        click.echo(
            f"boxlite: box {box.name} ({box.id}) failed and was kept for diagnosis: "
            f"`boxlite logs {box.name}`, `boxlite inspect {box.name}`, "
            f"then `boxlite rm {box.name}`",
            err=True,
        )


#: how transport errors introduce the console tail in a failure message
_CONSOLE_MARKER = "--- guest console (last lines) ---"
#: console lines kept in the error of a box removed by --rm (its log is gone with it)
SUMMARY_CONSOLE_LINES = 3


def _summarise_removed_failure(exc: BoxliteError, box: Any) -> None:
    """Rewrite ``exc``'s message for a box --rm is about to remove: the reason, then the last
    console lines (from the message, or read from the log now, before it is deleted)."""
    from ..runtime.pipeline import console_tail

    message = str(exc)
    reason, marker, tail = message.partition(_CONSOLE_MARKER)
    if not marker:
        tail = console_tail(box.dir, lines=SUMMARY_CONSOLE_LINES * 4)
    lines = [_inert(line.strip())[:160] for line in tail.splitlines() if line.strip()]
    lines = lines[-SUMMARY_CONSOLE_LINES:]
    suffix = f" (box {box.name} removed: --rm)"
    console = (" | console: " + " | ".join(lines)) if lines else " | console: (empty)"
    room = MAX_ERROR_CHARS - len(console) - len(suffix) - 1
    head = _one_line(reason)
    if len(head) > room:
        head = head[: max(room, 40) - 1] + "…"
    exc.args = (head + console + suffix,)


@cli.command("exec", context_settings=_EXEC_CONTEXT)
@click.option("-i", "--interactive", is_flag=True, help="feed our stdin to the command")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE")
@click.option("-w", "--workdir", default=None)
@click.option("-u", "--user", default=None)
@click.option("--timeout", type=float, default=None, help="seconds before the command is killed")
@click.argument("box")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, env: tuple[str, ...], workdir: str | None, user: str | None,
          timeout: float | None, box: str, cmd: tuple[str, ...]) -> int:
    """Run CMD in a running box; exit with its code."""
    if workdir is not None and not workdir.startswith("/"):
        raise ConfigError(f"-w {workdir!r}: working directory must be absolute")
    check_timeout("--timeout", timeout)
    rt = _runtime()
    try:
        argv = _command(cmd)
        if not argv:
            raise ConfigError("exec: give a command after the box (boxlite exec BOX -- CMD...)")
        return _stream(rt.get(box), argv, interactive=interactive, env=_parse_env(env),
                       cwd=workdir, user=user, timeout=timeout)
    finally:
        rt.close()


# ------------------------------------------------------------------------------------------


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
    debug = os.environ.get("BOXLITE_DEBUG") == "1"
    _setup_logging(debug)
    _GATE.install()
    try:
        code = _invoke(list(argv) if argv is not None else sys.argv[1:])
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        _error("aborted")
        code = 130
    except Interrupted as exc:
        _error(f"interrupted by {_signal_name(exc.signum)}")
        code = 128 + exc.signum
    except click.ClickException as exc:
        _error(exc.format_message())
        code = exc.exit_code
    except BoxliteError as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        code = 130
    except BrokenPipeError:
        _silence_stdout()  # `boxlite logs | head`: the reader left; like a shell, no message
        code = EXIT_BROKEN_PIPE
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc} (BOXLITE_DEBUG=1 for a traceback)")
        code = 70
    if _GATE.received is not None and code == 0:
        code = 128 + _GATE.received  # arrived during a shielded teardown: still report it
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    sys.exit(code)


from .images_remote import attach as _attach_images_remote  # noqa: E402 - needs cli, images

_attach_images_remote(cli, images)

if __name__ == "__main__":
    main()
