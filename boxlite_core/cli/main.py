"""The `boxlite` command.

Contract: exit 0 on success; on a BoxliteError exactly one line ``boxlite: error: …`` on stderr
and the error's exit code (tracebacks only with BOXLITE_DEBUG=1). ``run``/``exec`` exit with
the command's own code (128+N for a signal, 124 for a timeout). stdout carries only what the
command asked for (the box's output, ids, JSON); progress goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..errors import BoxliteError, ConfigError
from ..models import BoxOptions, BoxStatus
from .progress import Reporter

MAX_ERROR_CHARS = 600


def _inert(text: str) -> str:
    """``text`` with every non-printable character written as an escape (``\\x1b``,
    ``\\u202e``). Error lines carry text the guest chose (agent error details, console
    tails): raw, an escape sequence in them would drive the user's terminal."""
    return "".join(
        ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
        for ch in text.replace("\t", " ")
    )


def _one_line(message: str) -> str:
    lines = (_inert(line).strip() for line in str(message).splitlines())
    text = " | ".join(line for line in lines if line)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text or "unknown error"


def _error(message: str) -> None:
    print(f"boxlite: error: {_one_line(message)}", file=sys.stderr, flush=True)


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
    from ..guest.kit import build_kit
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
@click.argument("box")
def logs(box: str) -> int:
    """The guest's serial console log of the current (or last) boot."""
    text = _runtime().get(box).logs()
    sys.stdout.write(text)
    sys.stdout.flush()
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
    """Copy files: `boxlite cp HOSTPATH BOX:/path` or `boxlite cp BOX:/path HOSTPATH`."""
    src_box, src_path = _split_box_path(src)
    dst_box, dst_path = _split_box_path(dst)
    if (src_box is None) == (dst_box is None):
        raise ConfigError("cp: exactly one of SRC and DST must be BOX:/path")
    rt = _runtime()
    if dst_box is not None:
        rt.get(dst_box).copy_in(src_path, dst_path)
    else:
        assert src_box is not None
        rt.get(src_box).copy_out(src_path, dst_path)
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
    try:
        for stream, data in execution.events():
            target = out if stream == "stdout" else err
            try:
                target.write(data)
                target.flush()
            except BrokenPipeError:
                pass
    except KeyboardInterrupt:
        execution.kill(2)
        raise
    return execution.wait().returncode


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
@click.argument("image")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def run(backend: str | None, auto_remove: bool, detach: bool, name: str | None,
        volumes: tuple[str, ...], env: tuple[str, ...], workdir: str | None, user: str | None,
        cpus: int, memory: int, rootfs: str, sharer: str | None, timeout: float | None,
        interactive: bool, image: str, cmd: tuple[str, ...]) -> int:
    """Create a box from IMAGE, start it, run CMD (or the image's Entrypoint+Cmd)."""
    options = BoxOptions(
        image=image, backend=backend, cpus=cpus, memory_mib=memory, env=_parse_env(env),
        workdir=workdir, user=user, volumes=volumes, name=name, rootfs=rootfs,
        volume_sharer=sharer, auto_remove=auto_remove,
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
    finally:
        # A box whose start failed is kept even with --rm: its record and console log are
        # what the user needs to find out why (`boxlite inspect`, `boxlite logs`).
        failed = box.status is BoxStatus.FAILED
        if not detach:
            try:
                box.stop()
            finally:
                if auto_remove and not failed:
                    rt.remove(box.id, force=True)
        elif auto_remove and box.status is not BoxStatus.RUNNING and not failed:
            rt.remove(box.id, force=True)
        if failed:
            click.echo(
                f"boxlite: box {box.name} ({box.id}) failed and was kept for diagnosis: "
                f"`boxlite logs {box.name}`, `boxlite inspect {box.name}`, "
                f"then `boxlite rm {box.name}`",
                err=True,
            )


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


def main(argv: Sequence[str] | None = None) -> None:
    debug = os.environ.get("BOXLITE_DEBUG") == "1"
    _setup_logging(debug)
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="boxlite",
                      standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        _error("aborted")
        code = 130
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
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc} (BOXLITE_DEBUG=1 for a traceback)")
        code = 70
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    sys.exit(code)


from .images_remote import attach as _attach_images_remote  # noqa: E402 - needs cli, images

_attach_images_remote(cli, images)

if __name__ == "__main__":
    main()
