"""One QMP command per connection, synchronously, over qemu.qmp's asyncio client.

Why connect per command: QEMU's QMP socket serves one client at a time, and a box is driven
from several processes over its life (the one that started it, a later ``boxlite stop``).
Why a private thread: the caller may itself run inside an asyncio loop (the runtime's async
API), where a nested ``run_until_complete`` is forbidden; a fresh thread has no loop.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from boxlite_core import envvars
from boxlite_core.errors import EngineError


class QmpError(EngineError):
    """A QMP command failed or QEMU's monitor could not be reached."""


#: a slow host may raise every QMP bound to at least this many seconds
ENV_TIMEOUT = "BOXLITE_QMP_TIMEOUT"


class QmpTimeout(QmpError):
    """QEMU's monitor did not greet or did not answer within the bound."""


def _bound(timeout: float) -> float:
    return max(timeout, envvars.seconds(ENV_TIMEOUT, timeout))


async def _execute(socket: Path, command: str, args: dict[str, Any] | None, timeout: float) -> Any:
    from qemu.qmp import QMPClient

    client = QMPClient("boxlite")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
    except TimeoutError:
        raise QmpTimeout(
            f"QMP monitor {socket} did not greet within {timeout:g} s (waited to run "
            f"{command}); QEMU is stuck or something else listens there; on a slow host "
            f"raise {ENV_TIMEOUT} (seconds)") from None
    try:
        try:
            return await asyncio.wait_for(client.execute(command, args), timeout)
        except TimeoutError:
            raise QmpTimeout(
                f"QMP {command} on {socket} did not answer within {timeout:g} s; QEMU is "
                f"stuck; on a slow host raise {ENV_TIMEOUT} (seconds)") from None
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout)
        except Exception:  # e.g. EOF after "quit": QEMU closed first, which is the point
            pass


def _is_disconnect(exc: BaseException) -> bool:
    from qemu.qmp import ExecInterruptedError

    return isinstance(exc, (EOFError, ConnectionError, ExecInterruptedError))


def qmp_command(
    socket: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """Run ``command`` on the QMP socket and return its result; QmpError if it fails.

    ``quit`` may lose its reply when QEMU exits first: that counts as success.
    """
    timeout = _bound(timeout)
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["result"] = asyncio.run(_execute(socket, command, args, timeout))
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"qmp-{command}", daemon=True)
    thread.start()
    thread.join(timeout * 3)
    if thread.is_alive():
        raise QmpTimeout(f"QMP {command} on {socket} did not answer within {timeout * 3:.0f}s")
    if "error" in box:
        exc = box["error"]
        if command == "quit" and _is_disconnect(exc):
            return {}
        if isinstance(exc, QmpTimeout):
            raise exc
        raise QmpError(f"QMP {command} on {socket} failed: {type(exc).__name__}: {exc}") from exc
    return box.get("result")
