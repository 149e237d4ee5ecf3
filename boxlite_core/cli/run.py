"""Commands that run something in a box: `run` (create, start, run, stop) and `exec`; and
`create` (a box to `start` later), which shares `run`'s box options.

Exit codes follow a shell: the command's own code, 128+N for a signal, 124 for a timeout, 141
after our stdout closed (``| head``: the command in the box is SIGKILLed, as a shell pipeline's
writer would die of SIGPIPE). A teardown signal (signals.GATE) is passed on to the command,
which gets KILL_GRACE seconds before SIGKILL; ``run`` then stops the box (and removes it with
--rm) under the gate's shield, so a second ^C cannot leave a VM behind. With ``-t`` the
command runs on a pty in the box and our terminal is attached to it (cli/attach.py); a
detach (^P ^Q) ends `exec` with 0 and leaves a `run` box running, as ``-d`` would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import click

from ..errors import BoxliteError, ConfigError, NotFoundError
from ..models import BoxOptions, BoxStatus, check_timeout
from .context import runtime
from .output import (
    EXIT_BROKEN_PIPE,
    MAX_ERROR_CHARS,
    inert,
    one_line,
    silence_stdout,
    warnings_on_stderr,
)
from .progress import Reporter
from .signals import GATE, KILL_GRACE

if TYPE_CHECKING:
    from ..runtime.box import Box
    from ..runtime.runtime import Runtime


class ExitCode(Protocol):
    """What `run`/`exec` read from a finished command: the shell-style code."""

    @property
    def returncode(self) -> int: ...


class RunningCommand(Protocol):
    """The part of :meth:`Box.exec_stream`'s result the CLI drives (stream, stdin, signals)."""

    def events(self) -> Iterator[tuple[str, bytes]]: ...

    def write_stdin(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def wait(self, timeout: float | None = None) -> ExitCode: ...

    def kill(self, sig: int = signal.SIGTERM) -> None: ...


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``-e KEY=VALUE`` options as a mapping; ``-e KEY`` takes the host's value (docker).

    Raises:
        ConfigError: an item with no key, or ``-e KEY`` for a KEY the host does not set.
    """
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


def _command(cmd: Sequence[str]) -> list[str]:
    """CMD as typed: click keeps a `--` that follows the first positional argument."""
    argv = list(cmd)
    return argv[1:] if argv[:1] == ["--"] else argv


def _stream(box: Box, argv: list[str], *, interactive: bool, env: dict[str, str] | None = None,
            cwd: str | None = None, user: str | None = None,
            timeout: float | None = None, tty: bool = False,
            detachable: bool = True) -> int | None:
    """Run argv in the box, streaming its output to our fds; return the shell-style code, or
    None when the user detached from a terminal (the command runs on)."""
    if tty:
        return _stream_tty(box, argv, interactive=interactive, env=env, cwd=cwd, user=user,
                           timeout=timeout, detachable=detachable)
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
                    silence_stdout()
                    with GATE.shielded():
                        execution.kill(signal.SIGKILL)
            elif stream == "stderr" and not err_closed:
                try:
                    err.write(data)
                    err.flush()
                except BrokenPipeError:
                    err_closed = True  # stderr is diagnostics only: keep the command running
        status = execution.wait()
    except KeyboardInterrupt as exc:
        with GATE.shielded():
            _end_command(execution, getattr(exc, "signum", signal.SIGINT))
        raise
    return EXIT_BROKEN_PIPE if out_closed else status.returncode


def _stream_tty(box: Box, argv: list[str], *, interactive: bool, env: dict[str, str] | None,
                cwd: str | None, user: str | None, timeout: float | None,
                detachable: bool) -> int | None:
    """`-t`: the command on a pty in the box, attached to our terminal (cli/attach.py)."""
    from .attach import DETACH_KEYS, attach, check_tty_input, window_size

    check_tty_input(interactive)
    env = dict(env or {})
    if "TERM" in os.environ:  # the program draws for the terminal the user has
        env.setdefault("TERM", os.environ["TERM"])
    execution = box.exec_stream(argv, env=env, cwd=cwd, user=user, timeout=timeout,
                                stdin=interactive, tty=True, size=window_size())
    try:
        ended = attach(execution, interactive=interactive,
                       detach_keys=DETACH_KEYS if detachable else b"")
        if not ended:
            click.echo(f"boxlite: detached from {argv[0]} in box {box.name}; it keeps running "
                       f"(`boxlite stop {box.name}` ends the box)", err=True)
            return None
        status = execution.wait()
    except BrokenPipeError:
        silence_stdout()  # as without -t: a closed stdout ends the command (see _stream)
        with GATE.shielded():
            execution.kill(signal.SIGKILL)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:
        with GATE.shielded():
            _end_command(execution, getattr(exc, "signum", signal.SIGINT))
        raise
    return status.returncode


def _end_command(execution: RunningCommand, signum: int) -> None:
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


#: what `run` and `create` say about the box. Unset options stay None (or empty) and are not
#: passed on: BoxOptions' defaults apply, and a box from --snapshot takes its snapshot's value
#: (the runtime refuses an image, cpus, memory, volumes... that differ from the snapshot's)
_BOX_OPTIONS = (
    click.option("--backend", default=None, help="VMM backend (see `boxlite backends`)"),
    click.option("--host", default=None, metavar="URI",
                 help="run the box on another machine, as the backend reaches it (libvirt: "
                      "qemu+ssh://user@host/system); -v paths are then that machine's"),
    click.option("--rm", "auto_remove", is_flag=True, help="remove the box when it stops"),
    click.option("--name", default=None, help="box name (unique)"),
    click.option("-v", "--volume", "volumes", multiple=True, help="HOST:GUEST[:ro]"),
    click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE"),
    click.option("-w", "--workdir", default=None, help="working directory in the box"),
    click.option("-u", "--user", default=None, help="user[:group] in the box"),
    click.option("--entrypoint", default=None, metavar="PROGRAM",
                 help="replace the image's Entrypoint (and drop its Cmd, as docker does); "
                      "'' clears it"),
    click.option("--cpus", type=int, default=None, help="[default: 1]"),
    click.option("--memory", "memory", type=int, default=None, help="MiB  [default: 512]"),
    click.option("--rootfs", default=None, help="disk | merged | layers  [default: disk]"),
    click.option("--sharer", default=None,
                 help="volume sharer: virtiofs | 9p (its limitations are printed)  "
                      "[default: virtiofs where virtiofsd runs, else 9p]"),
    click.option("--console-log-max-mib", "console_mib", type=int, default=None,
                 help="cap of each guest console file on the host (rotated, 3 kept)  "
                      "[default: 4]"),
    click.option("--snapshot", default=None, metavar="NAME",
                 help="continue snapshot NAME's VM (`boxlite snapshot ls`): no IMAGE; "
                      "image, resources and volumes are the snapshot's"),
    click.option("--no-template", "no_template", is_flag=True,
                 help="boot the kernel even if a boot template fits (slower, ~6 s)"),
    click.option("--allow-net", "allow_net", multiple=True, metavar="RULE",
                 help="let the box connect to HOST[:PORT], *.DOMAIN[:PORT], an IP or a CIDR "
                      "(repeatable; checked on the host). No rule: no network"),
    click.option("--network", "network", default=None, metavar="MODE",
                 help="none | allowlist | full (any public address; never the host's "
                      "loopback, private or link-local ranges)  [default: none, or allowlist "
                      "with --allow-net]"),
    click.option("-p", "--publish", "publish", multiple=True,
                 metavar="[HOSTIP:]HOSTPORT:GUESTPORT[/tcp]",
                 help="publish a box port on the host (127.0.0.1 unless HOSTIP is given)"),
)


def _box_options(command: Callable[..., int]) -> Callable[..., int]:
    """Add :data:`_BOX_OPTIONS` to ``command`` (`run`, `create`), in that order in --help."""
    for option in reversed(_BOX_OPTIONS):
        command = option(command)
    return command


def box_options(
    *, image: str | None, snapshot: str | None, no_template: bool, backend: str | None,
    auto_remove: bool, name: str | None, volumes: tuple[str, ...], env: tuple[str, ...],
    workdir: str | None, user: str | None, cpus: int | None, memory: int | None,
    rootfs: str | None, sharer: str | None, console_mib: int | None,
    allow_net: tuple[str, ...] = (), network: str | None = None, publish: tuple[str, ...] = (),
    entrypoint: str | None = None, cmd: Sequence[str] = (),
    host: str | None = None,
) -> tuple[BoxOptions, frozenset[str]]:
    """The BoxOptions of `run`/`create` and the names of the fields the user set: only those
    are passed, so a box from ``snapshot`` is refused an option only when the user gave one
    (never for a CLI default).

    ``entrypoint``: ``--entrypoint``, one program as docker takes it (never split; '' clears
    the image's); ``cmd``: `run`'s arguments after IMAGE (they replace the image's Cmd).

    Raises:
        ConfigError: an invalid option, or -e KEY not set on the host (:func:`parse_env`).
    """
    given: dict[str, object] = {
        "image": image, "backend": backend, "cpus": cpus, "memory_mib": memory,
        "workdir": workdir, "user": user, "name": name, "rootfs": rootfs,
        "volume_sharer": sharer, "console_log_max_mib": console_mib, "snapshot": snapshot,
        "entrypoint": None if entrypoint is None else tuple(a for a in (entrypoint,) if a),
        "cmd": tuple(cmd) or None,
        "host": host,
    }
    set_options = {key: value for key, value in given.items() if value is not None}
    if allow_net or network is not None:
        from ..network.policy import NetworkPolicy

        set_options["network"] = NetworkPolicy.parse(allow_net, network)
    if publish:
        from ..network.ports import parse_port

        set_options["ports"] = tuple(parse_port(text) for text in publish)
    options = BoxOptions(
        env=parse_env(env), volumes=volumes, auto_remove=auto_remove,
        template=not no_template, **set_options,  # type: ignore[arg-type]
    )
    return options, frozenset(set_options) | ({"volumes"} if volumes else set())


def check_snapshot_options(rt: Runtime, options: BoxOptions, given: frozenset[str]) -> None:
    """For a box from a snapshot, refuse an option the user set to its default value when the
    snapshot's differs (`--memory 512` for a 256 MiB snapshot). ``Runtime.create`` compares
    with BoxOptions' defaults, so it cannot tell such a value from an unset one and would
    take the snapshot's without a word; other differing values it refuses itself.

    Raises:
        NotFoundError: no such snapshot. ConfigError: such an option, named.
    """
    if options.snapshot is None:
        return
    from ..runtime.creation import refuse_snapshot_conflicts

    refuse_snapshot_conflicts(options, rt.snapshot(options.snapshot), given)


def split_image(args: Sequence[str], snapshot: str | None) -> tuple[str | None, list[str]]:
    """`run`'s positional arguments as (IMAGE, CMD): with --snapshot there is no IMAGE.

    Raises:
        ConfigError: no IMAGE and no --snapshot.
    """
    if snapshot is not None:
        return None, _command(args)
    if not args:
        raise ConfigError("Missing argument 'IMAGE': boxlite run [OPTIONS] IMAGE [CMD]..., "
                          "or --snapshot NAME [CMD]... to continue a snapshot")
    return args[0], _command(args[1:])


@click.command(context_settings=_EXEC_CONTEXT)
@_box_options
@click.option("-d", "--detach", is_flag=True, help="start, print the box id, leave it running")
@click.option("--timeout", type=float, default=None, help="seconds before the command is killed")
@click.option("-i", "--interactive", is_flag=True, help="feed our stdin to the command")
@click.option("-t", "--tty", is_flag=True,
              help="run the command on a terminal (with -i: ours, raw; ^P ^Q detaches "
                   "unless --rm)")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[IMAGE] [CMD]...")
def run(backend: str | None, host: str | None, auto_remove: bool, detach: bool,
        name: str | None,
        volumes: tuple[str, ...], env: tuple[str, ...], workdir: str | None, user: str | None,
        entrypoint: str | None, cpus: int | None, memory: int | None, rootfs: str | None,
        sharer: str | None, timeout: float | None, interactive: bool, tty: bool,
        console_mib: int | None, snapshot: str | None, no_template: bool,
        allow_net: tuple[str, ...], network: str | None, publish: tuple[str, ...],
        args: tuple[str, ...]) -> int:
    """Create a box from IMAGE, start it, run its Entrypoint with CMD as arguments (CMD
    replaces the image's Cmd; without CMD the image's Cmd runs). --entrypoint PROGRAM runs
    PROGRAM CMD... instead; --entrypoint '' runs CMD alone. With -d and neither CMD nor
    --entrypoint the box starts idle (`boxlite exec` into it).

    \b
    With --snapshot NAME there is no IMAGE: every argument is CMD, run in a box that
    continues snapshot NAME (its processes keep running; its image, cpus, memory and
    volumes are the snapshot's: setting them is refused):
      boxlite run --snapshot NAME [--name NEW] [CMD]...
    The second start of a configuration restores a boot template instead of booting the
    kernel (~1 s instead of ~6 s); --no-template or BOXLITE_TEMPLATES=off opt out.
    """
    check_timeout("--timeout", timeout)
    image, cmd = split_image(args, snapshot)
    options, given = box_options(
        image=image, snapshot=snapshot, no_template=no_template, backend=backend,
        auto_remove=auto_remove, name=name, volumes=volumes, env=env, workdir=workdir,
        user=user, cpus=cpus, memory=memory, rootfs=rootfs, sharer=sharer,
        console_mib=console_mib, allow_net=allow_net, network=network, publish=publish,
        entrypoint=entrypoint, cmd=cmd, host=host,
    )
    if detach and interactive:
        raise ConfigError("-d and -i do not mix: a detached box has no stdin")
    if tty and not detach:
        from .attach import check_tty_input

        check_tty_input(interactive)  # before a box is made for nothing
    rt = runtime()
    check_snapshot_options(rt, options, given)
    with warnings_on_stderr():  # e.g. the limitation a --sharer declares
        box = rt.create(options)
    idle = detach and not cmd and entrypoint is None
    try:
        argv = None if idle else box.default_command()
    except ConfigError:  # nothing to run (docker: "No command specified"): no box is left
        rt.remove(box.id, force=True)
        raise
    detached = False
    try:
        with Reporter(plain_off_tty=False) as progress:
            box.start(progress=progress)
        if detach:
            if argv:  # started in the background; output kept by the agent
                box.exec_stream(argv, tty=tty)
            rt.close()
            click.echo(box.id)
            return 0
        assert argv is not None
        code = _stream(box, argv, interactive=interactive, timeout=timeout, tty=tty,
                       detachable=not auto_remove)
        if code is None:  # ^P ^Q: the box runs on, as with -d
            detached = True
            return 0
        return code
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
        with GATE.shielded():
            try:
                _finish_run(rt, box, detach=detach or detached, auto_remove=auto_remove)
            except BoxliteError:
                if primary is None:
                    raise
                # the run already failed: that error is the one to report


@click.command()
@_box_options
@click.argument("image", required=False)
def create(backend: str | None, host: str | None, auto_remove: bool, name: str | None,
           volumes: tuple[str, ...], env: tuple[str, ...], workdir: str | None,
           user: str | None, entrypoint: str | None, cpus: int | None, memory: int | None,
           rootfs: str | None, sharer: str | None, console_mib: int | None,
           snapshot: str | None, no_template: bool, allow_net: tuple[str, ...],
           network: str | None, publish: tuple[str, ...], image: str | None) -> int:
    """Create a box from IMAGE without starting it; print its id. `boxlite start` boots it.

    --entrypoint is kept in the box's record: its default command (`Box.default_command()`)
    is the same after every start.

    \b
    With --snapshot NAME (and no IMAGE) the box continues snapshot NAME on its first
    start, its processes still running:
      boxlite create --snapshot NAME [--name NEW]
    """
    if image is None and snapshot is None:
        raise ConfigError("Missing argument 'IMAGE': boxlite create [OPTIONS] IMAGE, or "
                          "--snapshot NAME to continue a snapshot")
    options, given = box_options(
        image=image, snapshot=snapshot, no_template=no_template, backend=backend,
        auto_remove=auto_remove, name=name, volumes=volumes, env=env, workdir=workdir,
        user=user, cpus=cpus, memory=memory, rootfs=rootfs, sharer=sharer,
        console_mib=console_mib, allow_net=allow_net, network=network, publish=publish,
        entrypoint=entrypoint, host=host,
    )
    rt = runtime()
    try:
        check_snapshot_options(rt, options, given)
        with warnings_on_stderr():
            box = rt.create(options)
    finally:
        rt.close()
    click.echo(box.id)
    return 0


def _finish_run(rt: Runtime, box: Box, *, detach: bool, auto_remove: bool) -> None:
    """After `run`, on every path (success, command error, start failure, signal, closed
    pipe): stop the box unless detached; remove it with --rm unless it is left running."""
    try:
        status = box.status
    except NotFoundError:
        return  # removed under us (`boxlite rm -f`): nothing left to stop
    failed = status is BoxStatus.FAILED
    if not detach:
        try:
            if auto_remove and not box.record.options.volumes:
                # its disk goes with it: nothing to sync, so no clean shutdown (~0.5 s)
                box.kill()
            else:  # volumes are host directories: let the guest write back what it holds
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


def _summarise_removed_failure(exc: BoxliteError, box: Box) -> None:
    """Rewrite ``exc``'s message for a box --rm is about to remove: the reason, then the last
    console lines (from the message, or read from the log now, before it is deleted)."""
    from ..runtime.pipeline import console_tail

    message = str(exc)
    reason, marker, tail = message.partition(_CONSOLE_MARKER)
    if not marker:
        tail = console_tail(box.dir, lines=SUMMARY_CONSOLE_LINES * 4)
    lines = [inert(line.strip())[:160] for line in tail.splitlines() if line.strip()]
    lines = lines[-SUMMARY_CONSOLE_LINES:]
    suffix = f" (box {box.name} removed: --rm)"
    console = (" | console: " + " | ".join(lines)) if lines else " | console: (empty)"
    room = MAX_ERROR_CHARS - len(console) - len(suffix) - 1
    head = one_line(reason)
    if len(head) > room:
        head = head[: max(room, 40) - 1] + "…"
    exc.args = (head + console + suffix,)


@click.command("exec", context_settings=_EXEC_CONTEXT)
@click.option("-i", "--interactive", is_flag=True, help="feed our stdin to the command")
@click.option("-t", "--tty", is_flag=True,
              help="run the command on a terminal (with -i: ours, raw; ^P ^Q detaches)")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE")
@click.option("-w", "--workdir", default=None)
@click.option("-u", "--user", default=None)
@click.option("--timeout", type=float, default=None, help="seconds before the command is killed")
@click.argument("box")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, env: tuple[str, ...], workdir: str | None,
          user: str | None, timeout: float | None, box: str, cmd: tuple[str, ...]) -> int:
    """Run CMD in a running box; exit with its code."""
    if workdir is not None and not workdir.startswith("/"):
        raise ConfigError(f"-w {workdir!r}: working directory must be absolute")
    check_timeout("--timeout", timeout)
    rt = runtime()
    try:
        argv = _command(cmd)
        if not argv:
            raise ConfigError("exec: give a command after the box (boxlite exec BOX -- CMD...)")
        if tty:
            from .attach import check_tty_input

            check_tty_input(interactive)
        code = _stream(rt.get(box), argv, interactive=interactive, env=parse_env(env),
                       cwd=workdir, user=user, timeout=timeout, tty=tty)
        return 0 if code is None else code
    finally:
        rt.close()


#: the commands this module adds to the top-level group
COMMANDS = (run, create, exec_)
