"""One QMP command per connection, synchronously, over qemu.qmp's asyncio client.

Why connect per command: QEMU's QMP socket serves one client at a time, and a box is driven
from several processes over its life (the one that started it, a later ``boxlite stop``).
Why a private thread: the caller may itself run inside an asyncio loop (the runtime's async
API), where a nested ``run_until_complete`` is forbidden; a fresh thread has no loop.
:func:`qmp_commands` is the one exception to one-command-per-connection: a file descriptor
passed to QEMU (SCM_RIGHTS + ``getfd``) must be consumed in the connection that passed it
(migration to and from a file: ``migrate``/``migrate-incoming`` with ``uri=fd:NAME``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs

from boxlite_core import envvars
from boxlite_core.errors import EngineError
from boxlite_core.models import JsonObject, JsonValue

if TYPE_CHECKING:
    from qemu.qmp import QMPClient


class QmpError(EngineError):
    """A QMP command failed or QEMU's monitor could not be reached."""


#: a slow host may raise every QMP bound to at least this many seconds
ENV_TIMEOUT = "BOXLITE_QMP_TIMEOUT"


class QmpTimeout(QmpError):
    """QEMU's monitor did not greet or did not answer within the bound."""


def bound(timeout: float) -> float:
    """``timeout`` seconds, or ``BOXLITE_QMP_TIMEOUT`` when that is longer (a slow host)."""
    return max(timeout, envvars.seconds(ENV_TIMEOUT, timeout))


#: one step of a QMP session: (command, its arguments as a JSON object, or None)
QmpStep: TypeAlias = "tuple[str, JsonObject | None]"


@attrs.frozen
class Poll:
    """A wait inside a QMP session: run ``command`` every ``interval`` seconds until
    ``done(answer)`` is true (it may raise to end the session with an error), for at most
    ``limit`` seconds; then the session's ``then`` steps run."""

    command: str
    done: Callable[[JsonValue], bool]
    limit: float
    what: str  # for the timeout message: what was being waited for
    interval: float = 0.005
    then: tuple[QmpStep, ...] = ()


async def _step(client: QMPClient, socket: Path, command: str, args: JsonObject | None,
                timeout: float, during: str = "") -> JsonValue:
    """One command of a session, bounded by ``timeout`` (QmpTimeout names it)."""
    try:
        return await asyncio.wait_for(client.execute(command, args), timeout)
    except TimeoutError:
        raise QmpTimeout(
            f"QMP {command} on {socket} did not answer within {timeout:g} s{during}; QEMU is "
            f"stuck; on a slow host raise {ENV_TIMEOUT} (seconds)") from None


async def _poll(client: QMPClient, socket: Path, poll: Poll, timeout: float,
                given_up: threading.Event) -> JsonValue:
    deadline = asyncio.get_running_loop().time() + poll.limit
    while True:
        if given_up.is_set():  # the caller was interrupted: free the monitor for its cleanup
            raise QmpError(f"{poll.what}: given up by the caller")
        answer = await _step(client, socket, poll.command, None, timeout,
                             f" while waiting for {poll.what}")
        if poll.done(answer):
            return answer
        if asyncio.get_running_loop().time() >= deadline:
            raise QmpTimeout(
                f"{poll.what}: not done within {poll.limit:.0f} s (last {poll.command}: "
                f"{answer}); on a slow host raise {ENV_TIMEOUT} (seconds)")
        await asyncio.sleep(poll.interval)


async def _execute(
    socket: Path, steps: Sequence[QmpStep], timeout: float, fds: Mapping[int, int],
    poll: Poll | None = None, given_up: threading.Event | None = None,
) -> list[JsonValue]:
    from qemu.qmp import QMPClient

    client = QMPClient("boxlite")
    first = steps[0][0] if steps else "nothing"
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
    except TimeoutError:
        raise QmpTimeout(
            f"QMP monitor {socket} did not greet within {timeout:g} s (waited to run "
            f"{first}); QEMU is stuck or something else listens there; on a slow host "
            f"raise {ENV_TIMEOUT} (seconds)") from None
    try:
        results: list[JsonValue] = []
        for index, (command, args) in enumerate(steps):
            if index in fds:
                client.send_fd_scm(fds[index])  # QEMU keeps it for this command
            results.append(await _step(client, socket, command, args, timeout))
        if poll is not None:
            results.append(await _poll(client, socket, poll, timeout,
                                       given_up or threading.Event()))
            for command, args in poll.then:
                results.append(await _step(client, socket, command, args, timeout))
        return results
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout)
        except Exception:  # e.g. EOF after "quit": QEMU closed first, which is the point
            pass


def _is_disconnect(exc: BaseException) -> bool:
    from qemu.qmp import ExecInterruptedError

    return isinstance(exc, (EOFError, ConnectionError, ExecInterruptedError))


def qmp_command(
    socket: Path, command: str, args: JsonObject | None = None, timeout: float = 5.0
) -> JsonValue:
    """Run ``command`` on the QMP socket and return its result (QEMU's ``return`` value:
    ``{}`` for most commands, an object or a list for queries); QmpError if it fails.

    ``quit`` may lose its reply when QEMU exits first: that counts as success.
    """
    try:
        return _run(socket, [(command, args)], timeout)[0]
    except QmpTimeout:
        raise
    except QmpError as exc:
        if command == "quit" and exc.__cause__ is not None and _is_disconnect(exc.__cause__):
            return {}
        raise


def qmp_commands(
    socket: Path,
    steps: Sequence[QmpStep],
    *,
    fds: Mapping[int, int] | None = None,
    timeout: float = 5.0,
) -> list[JsonValue]:
    """Run ``steps`` in order in ONE QMP connection; their results (QEMU's ``return``
    values: ``{}`` for most commands, an object or a list for queries), in order.

    ``fds`` maps a step's index to a file descriptor passed to QEMU over SCM_RIGHTS just
    before that step, which takes it (``getfd``, ``add-fd``); the caller keeps and closes its
    copy. ``timeout`` (seconds, raised by ``BOXLITE_QMP_TIMEOUT``) bounds the greeting and
    each step.

    Raises:
        QmpTimeout: the monitor did not greet or a step did not answer in time.
        QmpError: a step failed (QEMU's error text is in the message, naming the command),
            or the monitor could not be reached.
    """
    return _run(socket, steps, timeout, fds or {})


def qmp_poll(
    socket: Path,
    steps: Sequence[QmpStep],
    poll: Poll,
    *,
    fds: Mapping[int, int] | None = None,
    timeout: float = 5.0,
) -> list[JsonValue]:
    """:func:`qmp_commands`, then ``poll`` and its ``then`` steps, all in ONE QMP session:
    the results of ``steps``, the poll's last answer, then the results of ``poll.then``.

    Why one session: a wait polled with a connection per query (thread, event loop,
    greeting, capabilities each time) cost a restore ~20 ms and up to one poll interval.

    Raises:
        QmpTimeout: the monitor did not answer in time, or ``poll`` was not done within
            ``poll.limit`` seconds.
        QmpError: a step failed or the monitor could not be reached (a QEMU that exited).
        Whatever ``poll.done`` raises (e.g. EngineError for a failed migration).
    """
    return _run(socket, steps, timeout, fds or {}, poll)


def _run(
    socket: Path, steps: Sequence[QmpStep], timeout: float, fds: Mapping[int, int] | None = None,
    poll: Poll | None = None,
) -> list[JsonValue]:
    timeout = bound(timeout)
    box: dict[str, Any] = {}
    names = "+".join([command for command, _ in steps]
                     + ([poll.command, *(c for c, _ in poll.then)] if poll else []))

    given_up = threading.Event()

    def runner() -> None:
        try:
            box["result"] = asyncio.run(
                _execute(socket, steps, timeout, fds or {}, poll, given_up))
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"qmp-{names}", daemon=True)
    thread.start()
    limit = timeout * (2 + len(steps)) + (poll.limit + timeout * (2 + len(poll.then))
                                          if poll is not None else 0.0)
    try:
        thread.join(limit)
    except BaseException:
        # Ctrl-C while a poll waits: QEMU serves one monitor client at a time, so the
        # caller's cleanup (e.g. migrate_cancel) could not connect while the session runs
        given_up.set()
        thread.join(timeout + 1.0)
        raise
    if thread.is_alive():
        raise QmpTimeout(f"QMP {names} on {socket} did not answer within {limit:.0f}s")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, QmpTimeout) or (
                isinstance(exc, EngineError) and not isinstance(exc, QmpError)):
            raise exc  # a timeout, or what a poll's done() raised: already says it all
        raise QmpError(f"QMP {names} on {socket} failed: {type(exc).__name__}: {exc}") from exc
    return list(box["result"])
