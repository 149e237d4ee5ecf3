"""asyncio API: AsyncRuntime / AsyncBox over the synchronous core.

Honest note: this is not a native asyncio implementation. Every call runs the synchronous
core in a worker thread (``asyncio.to_thread``), and exec output is pumped from a thread into
an ``asyncio.Queue``. That is enough for what the API is for — one program driving many boxes
concurrently (each boot mostly waits on QEMU and the agent, not on Python) — but each
in-flight call holds a thread, so thousands of concurrent calls want a larger default
executor (``loop.set_default_executor``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeAlias, overload

from ..models import BoxOptions, BoxStatus, ExecResult, ExitStatus, JsonValue
from ..plugins import PluginRegistry
from .box import Box, BoxMetrics, Execution
from .records import BoxRecord
from .runtime import Runtime
from .services import KitProvider, ProgressFn
from .snapshots import Snapshot
from .terminal import Terminal

_DONE = object()
#: what the event pump hands the consumer: an output chunk, the error, or the end
_Item: TypeAlias = "tuple[str, bytes] | BaseException | object"


class AsyncExecution:
    """A running command; ``async for stream, data in execution`` yields its output."""

    def __init__(self, execution: Execution) -> None:
        self._ex = execution
        self._queue: asyncio.Queue[_Item] | None = None
        self._thread: threading.Thread | None = None

    def _start_pump(self) -> asyncio.Queue[_Item]:
        if self._queue is not None:
            return self._queue
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=64)
        self._queue = queue

        def put(item: _Item) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        def pump() -> None:
            try:
                for event in self._ex.events():
                    put(event)
            except BaseException as exc:  # delivered to the consumer, raised there
                put(exc)
            else:
                put(_DONE)

        self._thread = threading.Thread(target=pump, daemon=True, name="boxlite-aio-events")
        self._thread.start()
        return queue

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[str, bytes]]:
        queue = self._start_pump()
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, tuple)
            yield item

    async def write_stdin(self, data: bytes) -> None:
        await asyncio.to_thread(self._ex.write_stdin, data)

    async def close_stdin(self) -> None:
        await asyncio.to_thread(self._ex.close_stdin)

    async def wait(self, timeout: float | None = None) -> ExitStatus:
        return await asyncio.to_thread(self._ex.wait, timeout)

    async def kill(self, sig: int = 15) -> None:
        await asyncio.to_thread(self._ex.kill, sig)

    async def resize(self, rows: int, cols: int) -> None:
        await asyncio.to_thread(self._ex.resize, rows, cols)


class AsyncTerminal:
    """:class:`Terminal` for asyncio: ``await term.write(b"ls\r")``, ``await term.read()``,
    ``await term.resize(rows, cols)``, ``await term.wait()``; ``async with`` hangs up at the
    end. Each call runs the synchronous session's call in a worker thread."""

    def __init__(self, terminal: Terminal) -> None:
        self.sync = terminal

    async def write(self, data: bytes | str) -> None:
        await asyncio.to_thread(self.sync.write, data)

    async def read(self, timeout: float | None = None) -> bytes:
        return await asyncio.to_thread(self.sync.read, timeout)

    async def read_until(self, expected: bytes | str, timeout: float = 30.0) -> bytes:
        return await asyncio.to_thread(self.sync.read_until, expected, timeout)

    async def resize(self, rows: int, cols: int) -> None:
        await asyncio.to_thread(self.sync.resize, rows, cols)

    async def wait(self, timeout: float | None = None) -> ExitStatus:
        return await asyncio.to_thread(self.sync.wait, timeout)

    async def kill(self, sig: int = 15) -> None:
        await asyncio.to_thread(self.sync.kill, sig)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncTerminal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncBox:
    def __init__(self, box: Box) -> None:
        self.sync = box
        self.id = box.id
        self.name = box.name

    def __repr__(self) -> str:
        return f"<AsyncBox {self.name} {self.id}>"

    async def status(self) -> BoxStatus:
        return await asyncio.to_thread(lambda: self.sync.status)

    async def info(self) -> dict[str, JsonValue]:
        return await asyncio.to_thread(self.sync.info)

    async def start(self, progress: ProgressFn | None = None) -> AsyncBox:
        await asyncio.to_thread(self.sync.start, progress)
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.sync.stop, timeout)

    async def kill(self) -> None:
        await asyncio.to_thread(self.sync.kill)

    async def pause(self) -> None:
        await asyncio.to_thread(self.sync.pause)

    async def resume(self) -> None:
        await asyncio.to_thread(self.sync.resume)

    async def remove(self, force: bool = False) -> None:
        await asyncio.to_thread(self.sync.remove, force)

    async def snapshot(self, name: str) -> Snapshot:
        """See :meth:`Box.snapshot`."""
        return await asyncio.to_thread(self.sync.snapshot, name)

    async def fork(self, n: int = 1, *, name: str | None = None) -> list[AsyncBox]:
        """See :meth:`Box.fork`."""
        copies = await asyncio.to_thread(lambda: self.sync.fork(n, name=name))
        return [AsyncBox(c) for c in copies]

    @overload
    async def exec(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   timeout: float | None = None, input: bytes | None = None,
                   tty: Literal[False] = False, size: None = None) -> ExecResult: ...

    @overload
    async def exec(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   timeout: float | None = None, input: None = None,
                   tty: Literal[True], size: tuple[int, int] | None = None) -> AsyncTerminal: ...

    async def exec(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        input: bytes | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> ExecResult | AsyncTerminal:
        """See :meth:`Box.exec`; with ``tty=True`` an :class:`AsyncTerminal`."""
        if tty:
            terminal = await asyncio.to_thread(
                lambda: self.sync.exec(args, env=env, cwd=cwd, user=user, timeout=timeout,
                                       input=input, tty=True, size=size))
            return AsyncTerminal(terminal)
        return await asyncio.to_thread(
            lambda: self.sync.exec(args, env=env, cwd=cwd, user=user, timeout=timeout,
                                   input=input, size=size)
        )

    async def exec_stream(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> AsyncExecution:
        ex = await asyncio.to_thread(
            lambda: self.sync.exec_stream(args, env=env, cwd=cwd, user=user, timeout=timeout,
                                          stdin=stdin, tty=tty, size=size)
        )
        return AsyncExecution(ex)

    async def copy_in(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        await asyncio.to_thread(self.sync.copy_in, host_path, guest_path)

    async def copy_out(self, guest_path: str, host_path: str | os.PathLike[str]) -> Path:
        return await asyncio.to_thread(self.sync.copy_out, guest_path, host_path)

    async def logs(self) -> str:
        return await asyncio.to_thread(self.sync.logs)

    async def metrics(self) -> BoxMetrics:
        return await asyncio.to_thread(self.sync.metrics)

    async def __aenter__(self) -> AsyncBox:
        await asyncio.to_thread(self.sync.__enter__)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.sync.__exit__, exc_type, exc, tb)


class AsyncRuntime:
    """``async with AsyncRuntime() as rt: box = await rt.create(image="busybox")``."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        plugins: PluginRegistry | Iterable[tuple[str, object]] | None = None,
        kit_provider: KitProvider | None = None,
        recover: bool = True,
    ) -> None:
        self._home = home
        self._plugins = plugins
        self._kit_provider = kit_provider
        self._recover = recover
        self.sync: Runtime | None = None

    async def open(self) -> AsyncRuntime:
        if self.sync is None:
            self.sync = await asyncio.to_thread(
                lambda: Runtime(self._home, plugins=self._plugins,
                                kit_provider=self._kit_provider, recover=self._recover)
            )
        return self

    def _rt(self) -> Runtime:
        if self.sync is None:
            raise RuntimeError("AsyncRuntime: use `async with` or `await rt.open()` first")
        return self.sync

    async def __aenter__(self) -> AsyncRuntime:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self.sync is not None:
            await asyncio.to_thread(self.sync.close)
            self.sync = None

    async def create(self, options: BoxOptions | None = None, **kw: object) -> AsyncBox:
        rt = self._rt()
        return AsyncBox(await asyncio.to_thread(lambda: rt.create(options, **kw)))

    async def get(self, id_or_name: str) -> AsyncBox:
        return AsyncBox(await asyncio.to_thread(self._rt().get, id_or_name))

    async def list(self) -> list[BoxRecord]:
        return await asyncio.to_thread(self._rt().list)

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        await asyncio.to_thread(self._rt().remove, id_or_name, force)

    async def metrics(self) -> dict[str, int]:
        return await asyncio.to_thread(self._rt().metrics)

    async def snapshots(self) -> list[Snapshot]:
        """See :meth:`Runtime.snapshots`."""
        return await asyncio.to_thread(self._rt().snapshots)

    async def remove_snapshot(self, name: str) -> None:
        """See :meth:`Runtime.remove_snapshot`."""
        await asyncio.to_thread(self._rt().remove_snapshot, name)
