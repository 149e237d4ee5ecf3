"""Commands and files in a running box: exec, streamed exec, copy in and out.

Why the failure handling lives here: a command that loses its stream has three possible
stories — the box was stopped or removed by someone (BoxGoneError), its VM died (GuestError,
the record settled), or the agent itself failed — and the caller should get the true one.
Each function takes the agent connection as an argument, so the Box facade decides how it
gets one (a live one, attached on demand).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from ..errors import BoxliteError, ConfigError, GuestError, NotFoundError, StateError
from ..images.model import ImageConfig
from ..models import BoxStatus, ExecResult, ExitStatus
from .entrypoint import default_argv
from .link import BoxLink

if TYPE_CHECKING:  # imported when first used: gRPC is slow to import
    from ..channel.client import AgentClient, ExecSession
    from ..transfer.request import InRequest, OutRequest

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: TERM of a tty command when neither the image, the box nor the call sets one (docker's)
DEFAULT_TERM = "xterm"
#: stop reasons Box.stop/kill record: someone asked for the box to go down
ON_REQUEST = ("stopped on request", "killed on request")
#: seconds an exec that lost its command waits for a concurrent stop/remove to finish, to
#: tell "removed" from "stopped" (a removal stops the box, then deletes, under one lock)
SETTLE_WAIT = 30.0


class BoxGoneError(StateError):
    """The box was removed (``boxlite rm -f``) or stopped by someone else while a command ran
    in it: its shutdown SIGKILLed the command. Raised instead of a bare exit status 137.

    ``exit_code`` is 137 (128 + SIGKILL): what the command's status would have said, so
    scripts that test for "killed" still see it; the error line says why.
    """

    exit_code = 137


class ExecParams(TypedDict):
    """How a command runs: the merged environment, working directory and user."""

    env: dict[str, str]
    cwd: str
    user: str


def gone_error(link: BoxLink) -> BoxGoneError | None:
    """After a command died of SIGKILL or lost its stream: was the box stopped or removed
    underneath it? Then the error naming that, else None (a plain kill or crash).

    A stop writes Stopping before it asks the guest to shut down, so a record still
    Running means nobody stopped it. Stopping/Stopped may be followed by a removal under
    the same per-box lock: wait (bounded by SETTLE_WAIT) for the lock, then look again.
    """
    store = link.services.store
    deadline = time.monotonic() + SETTLE_WAIT
    while True:
        try:
            record = store.get(link.id)
        except NotFoundError:
            return BoxGoneError(
                f"box {link.name} was removed while the command ran (boxlite rm -f); "
                "the command was killed"
            )
        if record.status not in (BoxStatus.STOPPING, BoxStatus.STOPPED):
            return None
        if record.status is BoxStatus.STOPPED and not link.lock_busy():
            try:  # the lock is free: a removal that followed the stop is over too
                record = store.get(link.id)
            except NotFoundError:
                continue
            if record.state.get("stop_reason") not in ON_REQUEST:
                return None  # it went down by itself (e.g. poweroff): not a stop
            return BoxGoneError(
                f"box {link.name} was stopped while the command ran (boxlite stop); "
                "the command was killed"
            )
        if time.monotonic() >= deadline:
            return BoxGoneError(
                f"box {link.name} was stopped while the command ran; the command was killed"
            )
        time.sleep(0.1)


def exec_failed(link: BoxLink, exc: BaseException) -> BaseException:
    """Turn an exec error into what the caller should see, counting it."""
    link.count("exec_errors")
    gone = gone_error(link)
    if gone is not None:
        return gone
    handle = link.handle
    if handle is not None:
        ended = False
        with contextlib.suppress(Exception):
            ended = handle.wait(2.0)  # the VM may take a moment to be reaped
        if ended:
            with link.lock:
                return link.vm_gone("during exec")
    if isinstance(exc, BoxliteError):
        return exc
    return GuestError(f"box {link.name}: exec failed: {type(exc).__name__}: {exc}")


class Execution:
    """A running command: stream its output, feed its stdin, wait for it.

    Errors from a VM that died underneath become GuestError naming the box, and the box
    record is settled (Failed, or Stopped after a clean power-off).
    """

    def __init__(self, link: BoxLink, session: ExecSession, args: Sequence[str]) -> None:
        self.link = link
        self.session = session
        self.args = list(args)
        self._failed = False

    def _wrap(self, exc: BaseException) -> BaseException:
        if self._failed:
            return exc
        self._failed = True
        return exec_failed(self.link, exc)

    def events(self) -> Iterator[tuple[str, bytes]]:
        """("stdout" | "stderr", bytes) chunks, in the order they arrive, until both close."""
        try:
            yield from self.session.events()
        except GeneratorExit:
            raise
        except Exception as exc:
            raise self._wrap(exc) from exc

    def write_stdin(self, data: bytes) -> None:
        try:
            self.session.write_stdin(data)
        except Exception as exc:
            raise self._wrap(exc) from exc

    def close_stdin(self) -> None:
        try:
            self.session.close_stdin()
        except Exception as exc:
            raise self._wrap(exc) from exc

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """The command's status. TimeoutError if it still runs after ``timeout`` seconds;
        BoxGoneError if a concurrent stop/remove of the box killed it."""
        try:
            status = self.session.wait(timeout)
        except TimeoutError:
            raise  # still running: not an exec failure
        except Exception as exc:
            raise self._wrap(exc) from exc
        if status.signal == signal.SIGKILL and not status.timed_out:
            gone = gone_error(self.link)
            if gone is not None:
                raise gone
        return ExitStatus(status.exit_code, status.signal, status.timed_out)

    def kill(self, sig: int = 15) -> None:
        with contextlib.suppress(Exception):
            self.session.kill(sig)

    def resize(self, rows: int, cols: int) -> None:
        """A tty command's new window size (character cells). ConfigError for a size a
        terminal cannot have; GuestError when the command has no terminal."""
        rows, cols = check_size((rows, cols))
        try:
            self.session.resize(rows, cols)
        except Exception as exc:
            raise self._wrap(exc) from exc


# -- what a command runs with ----------------------------------------------------------------


def image_config(link: BoxLink) -> ImageConfig:
    """The image's config as recorded at create/start (else read from the image store)."""
    cfg = link.record.state.get("image_config")
    if isinstance(cfg, Mapping) and cfg:
        return ImageConfig.from_dict(dict(cfg))
    return link.services.images.get(link.record.image).config


def default_command(link: BoxLink) -> list[str]:
    """The box's default command: the image's Entrypoint and Cmd with the box's
    ``entrypoint``/``cmd`` options applied (:func:`.entrypoint.default_argv`, docker's rule).
    ConfigError when that leaves nothing to run."""
    cfg = image_config(link)
    options = link.record.options
    return default_argv(cfg.entrypoint, cfg.cmd, options.entrypoint, options.cmd,
                        image=link.record.image)


def exec_params(link: BoxLink, env: Mapping[str, str] | None, cwd: str | None,
                user: str | None) -> ExecParams:
    """Image config, then box options, then this call: later wins. A missing working
    directory is created in the box (agent/procs.py, as runc does).

    Raises:
        ConfigError: a relative ``cwd`` (docker refuses it too: "the working directory
            'x' is invalid, it needs to be an absolute path").
    """
    if cwd and not cwd.startswith("/"):  # "" is unset, as in docker's API
        raise ConfigError(f"cwd={cwd!r}: the working directory must be an absolute path "
                          f"(e.g. /{cwd.lstrip('./') or 'work'})")
    cfg = image_config(link)
    options = link.record.options
    merged = {"PATH": DEFAULT_PATH, **cfg.env_dict(), **options.env, **(env or {})}
    return {
        "env": merged,
        "cwd": cwd or options.workdir or cfg.working_dir or "/",
        "user": user or options.user or cfg.user or "",
    }


#: a terminal's largest side, in cells (struct winsize holds unsigned shorts)
MAX_CELLS = 0xFFFF


def check_size(size: object) -> tuple[int, int]:
    """A terminal window size as (rows, cols), each 1..65535.

    Raises:
        ConfigError: anything else, naming the value.
    """
    ok = (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CELLS
                  for n in size))
    if not ok:
        raise ConfigError(f"size={size!r}: a terminal size is (rows, cols), each 1 to "
                          f"{MAX_CELLS}, e.g. (24, 80)")
    rows, cols = size  # type: ignore[misc]
    return int(rows), int(cols)


def check_args(args: Sequence[str]) -> list[str]:
    """The argv as a list of str. ConfigError for a bare string or an empty list."""
    if isinstance(args, str) or not args:
        raise ConfigError("exec: give the command as a non-empty list, e.g. ['ls', '-l']")
    return [str(a) for a in args]


# -- running commands ------------------------------------------------------------------------


def run(link: BoxLink, client: AgentClient, argv: list[str], params: ExecParams, *,
        timeout: float | None, input: bytes | None) -> ExecResult:
    """Run ``argv`` to completion through ``client``. See Box.exec."""
    link.count("execs")
    try:
        code, sig, timed_out, out, err = client.run(
            argv, input=input, timeout=timeout, env=params["env"], cwd=params["cwd"],
            user=params["user"],
        )
    except Exception as exc:
        raise exec_failed(link, exc) from exc
    if sig == signal.SIGKILL and not timed_out:
        gone = gone_error(link)
        if gone is not None:
            raise gone
    return ExecResult(code, out, err, sig, timed_out)


def stream(link: BoxLink, client: AgentClient, argv: list[str], params: ExecParams, *,
           timeout: float | None, stdin: bool, tty: bool = False,
           size: tuple[int, int] | None = None) -> Execution:
    """Start ``argv`` through ``client`` and return at once. See Box.exec_stream."""
    link.count("execs")
    env = params["env"]
    if tty and "TERM" not in env:
        env = {**env, "TERM": DEFAULT_TERM}
    try:
        session = client.exec(argv, timeout=timeout, stdin=stdin, env=env,
                              cwd=params["cwd"], user=params["user"], tty=tty, size=size)
    except Exception as exc:
        raise exec_failed(link, exc) from exc
    return Execution(link, session, argv)


# -- files -----------------------------------------------------------------------------------


def copy_in(link: BoxLink, client: AgentClient, request: InRequest, guest_path: str) -> None:
    """Archive ``request`` and have the agent put it at ``guest_path`` (docker cp rules,
    decided in the guest where the path resolves). See Box.copy_in (it checks the paths)."""
    from ..transfer.copy_in import manifest, tar_chunks

    try:
        members = manifest(request)
    except OSError as exc:
        raise ConfigError(f"copy: cannot read {request.path}: {exc}") from exc
    unreadable: list[OSError] = []

    def chunks() -> Iterator[bytes]:
        # gRPC reads this in its own thread and reports only "Exception iterating requests"
        try:
            yield from tar_chunks(request)
        except OSError as exc:
            unreadable.append(exc)
            raise

    try:
        client.copy_in_tar(guest_path, members, chunks())
    except Exception as exc:
        if unreadable:
            raise ConfigError(f"copy: cannot read {request.path}: {unreadable[0]}; nothing "
                              f"after it was copied") from unreadable[0]
        if isinstance(exc, ConfigError):
            raise
        raise exec_failed(link, exc) from exc


def copy_out(link: BoxLink, client: AgentClient, request: OutRequest,
             host_path: str | os.PathLike[str]) -> Path:
    """Receive ``request``'s guest path as hostile tar into ``host_path``. See Box.copy_out
    (it parses and checks the paths first)."""
    from ..diskspace import DiskSpaceError
    from ..transfer import receive_tree, staging_root

    guest_path = request.guest_path
    try:
        result = receive_tree(client.download_tar(request.guest_path), request, host_path,
                              staging=staging_root(link.services.home))
    except (ConfigError, DiskSpaceError):
        raise
    except GuestError as exc:  # a refused archive, or the agent/VM failing mid-copy
        ended = False
        with contextlib.suppress(Exception):
            ended = link.handle is not None and bool(link.handle.wait(0.5))
        if ended:
            raise exec_failed(link, exc) from exc
        raise GuestError(f"box {link.name}: copy-out of {guest_path}: {exc}") from exc
    except Exception as exc:
        raise exec_failed(link, exc) from exc
    return result.path
