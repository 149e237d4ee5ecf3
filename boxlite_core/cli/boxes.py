"""Commands on boxes that already exist: ls, inspect, rm, start, stop, pause, resume, logs,
metrics.

Creating a box and running commands in it (`run`, `exec`) live in :mod:`.run`; files in and
out (`cp`) in :mod:`.files`.
"""

from __future__ import annotations

import sys

import click

from ..errors import BoxliteError, ConfigError
from ..models import BoxStatus, check_timeout
from .context import runtime
from .output import ago, emit_json, error, one_line, table
from .progress import Reporter


@click.command("ls")
@click.option("-a", "--all", "show_all", is_flag=True, help="include stopped and failed boxes")
@click.option("--json", "as_json", is_flag=True)
def ls(show_all: bool, as_json: bool) -> int:
    """List boxes (running ones; -a for all)."""
    rt = runtime()
    records = rt.list(all=show_all)
    if as_json:
        emit_json([r.to_dict() for r in records])
        return 0
    hosts = any(r.options.host for r in records)  # a HOST column only when one is elsewhere
    rows = []
    for r in records:
        status = r.status.value
        unreachable = rt.host_problem(r) if r.options.host and r.status.may_have_vm else None
        if unreachable:  # its record is kept as it was: nothing is known, nothing settled
            # the HOST column names the machine: the 80 characters go to why, which the
            # URI (twice, in host_problem's words and libvirt's) pushed out of view
            why = one_line(unreachable).replace(f" on {r.options.host}", "").replace(
                f"host {r.options.host} ", "host ")
            status = f"unknown ({why[:80]}; recorded: {r.status.value})"
        elif r.status is BoxStatus.FAILED and r.error:
            status += f" ({one_line(r.error)[:60]})"
        elif r.status is BoxStatus.STARTING:  # where it is, or that its starter is gone
            status += f" ({'abandoned, ' if r.abandoned else ''}{r.stage or 'queued'})"
        row = [r.id, r.name, r.image, r.backend or "-"]
        if hosts:
            row.append(r.options.host or "-")
        rows.append([*row, ago(r.created_at), status])
    table(rows, ["ID", "NAME", "IMAGE", "BACKEND", *(["HOST"] if hosts else []), "CREATED",
                 "STATUS"])
    return 0


@click.command()
@click.argument("box")
def inspect(box: str) -> int:
    """A box's record as JSON (options, status, error, stage timings)."""
    emit_json(runtime().get(box).info())
    return 0


@click.command("rm")
@click.option("-f", "--force", is_flag=True, help="stop running boxes first")
@click.argument("boxes", nargs=-1, required=True)
def rm(force: bool, boxes: tuple[str, ...]) -> int:
    """Remove boxes (files and record)."""
    rt = runtime()
    code = 0
    for ref in boxes:
        try:
            rt.remove(ref, force=force)
            click.echo(ref)
        except BoxliteError as exc:
            error(str(exc))
            code = max(code, exc.exit_code)
    return code


@click.command()
@click.argument("box")
def start(box: str) -> int:
    """Start a configured, stopped or failed box."""
    rt = runtime()
    b = rt.get(box)
    with Reporter(plain_off_tty=False) as progress:
        b.start(progress=progress)
    rt.close()  # detach: the box keeps running
    click.echo(b.name)
    return 0


@click.command()
@click.option("-t", "--timeout", default=10.0, show_default=True, help="seconds before forcing")
@click.argument("box")
def stop(box: str, timeout: float) -> int:
    """Stop a running box (clean guest shutdown, then force)."""
    check_timeout("-t/--timeout", timeout, allow_zero=True)
    rt = runtime()
    b = rt.get(box)
    b.stop(timeout=timeout)
    if b.record.options.auto_remove:
        rt.remove(b.id, force=True)
    click.echo(b.name)
    return 0


@click.command()
@click.argument("box")
def pause(box: str) -> int:
    """Freeze a running box's vCPUs: it keeps its memory, commands in flight wait, new execs
    and copies are refused until `resume`."""
    b = runtime().get(box)
    b.pause()
    click.echo(b.name)
    return 0


@click.command()
@click.argument("box")
def resume(box: str) -> int:
    """Let a paused box run again."""
    b = runtime().get(box)
    b.resume()
    click.echo(b.name)
    return 0


@click.command()
@click.option("-f", "--follow", is_flag=True,
              help="keep printing new output (across rotation) until the box stops or ^C")
@click.option("-n", "--tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="only the last N lines (reads just the end of the log)")
@click.option("--raw", is_flag=True,
              help="the guest's bytes as they are, escape sequences included, even on a "
                   "terminal (piped output is always raw)")
@click.option("--network", "network", is_flag=True,
              help="the box network's log instead: every connection and name the host "
                   "allowed or denied, with the rule or the reason")
@click.argument("box")
def logs(box: str, follow: bool, tail: int | None, raw: bool, network: bool) -> int:
    """The guest's serial console log of the current (or last) boot.

    The guest wrote these bytes. On a terminal, control characters (escape sequences, bare
    carriage returns, backspaces, bidi overrides) are shown as \\xNN text so the guest cannot
    drive your terminal; piped or with --raw, the bytes pass unchanged."""
    from ..vmm.consolelog import TerminalSafe

    if network:
        if follow:
            raise ConfigError("logs --network cannot follow yet; run it again for new lines")
        from ..network.relayctl import network_log_lines

        lines = network_log_lines(runtime().get(box).dir, tail)
        safe_lines = TerminalSafe() if sys.stdout.isatty() and not raw else None
        for line in lines:
            click.echo(safe_lines.feed(line) if safe_lines else line, nl=False)
        return 0
    chunks = runtime().get(box).log_chunks(tail=tail, follow=follow)
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


@click.command()
@click.argument("box")
def port(box: str) -> int:
    """The box's published ports (`-p`), as docker prints them: GUESTPORT/tcp -> HOST:PORT."""
    from ..network.relayctl import published_ports

    for mapping in published_ports(runtime().get(box).dir):
        click.echo(f"{mapping.guest_port}/{mapping.protocol} -> "
                   f"{mapping.host_ip}:{mapping.host_port}")
    return 0


@click.command()
@click.option("--json", "as_json", is_flag=True)
def metrics(as_json: bool) -> int:
    """Runtime counters (boxes created/failed/stopped/running, execs)."""
    data = runtime().metrics()
    if as_json:
        emit_json(data)
    else:
        for key in sorted(data):
            click.echo(f"{key} {data[key]}")
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (ls, inspect, rm, start, stop, pause, resume, logs, port, metrics)
