"""CleanupGuard: what happens when a box fails to start.

Why keep everything but the VM: a failed boot is diagnosed from its console log, its launch
plan and its disks, so the guard stops what is running (VM, sharer helpers) and leaves the
files. The record becomes Failed with the reason and the failing stage — never deleted, so
`boxlite ls -a` / `inspect` show what went wrong, and `start` can retry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import BoxliteError, EngineError, NotFoundError, StateError
from ..guest.transport import stop_shim
from ..models import BoxStatus

if TYPE_CHECKING:
    from .pipeline import StartContext

log = logging.getLogger(__name__)


def annotate(exc: BaseException, prefix: str) -> BaseException:
    """Return an error whose message starts with ``prefix``: the same object for our own
    errors (so the class and exit code survive), an EngineError for anything else."""
    if isinstance(exc, BoxliteError):
        message = str(exc)
        if not message.startswith(prefix):
            exc.args = (f"{prefix}{message}",)
        return exc
    return EngineError(f"{prefix}{type(exc).__name__}: {exc}")


class CleanupGuard:
    """Armed around the pipeline; on an exception it undoes the start and records why."""

    def __init__(self, ctx: StartContext) -> None:
        self.ctx = ctx
        self.armed = True

    def __enter__(self) -> CleanupGuard:
        return self

    def disarm(self) -> None:
        self.armed = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None or not self.armed:
            return False
        ctx = self.ctx
        stage = ctx.stage or "start"
        self._undo()
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BoxliteError) else str(exc)
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted"
        record = ctx.record
        rt = ctx.runtime
        try:
            record = rt.store.set_status(
                record.id,
                BoxStatus.FAILED,
                error=f"{stage}: {reason}",
                failures=record.failures + 1,
                pid=None,
                stopped_at=time.time(),
                state={"failed_stage": stage, "stage_timings": dict(ctx.timings)},
            )
        except (NotFoundError, StateError) as err:  # removed or changed under us: say so
            log.warning("box %s: could not mark failed: %s", record.name, err)
        with contextlib.suppress(Exception):
            rt.db.bump("boxes_failed")
        rt.plugins.notify("failed", box=record.to_dict(), error=reason, stage=stage)
        if isinstance(exc, Exception):
            new = annotate(exc, f"box {record.name}: start failed in {stage}: ")
            if new is not exc:
                raise new from exc
        return False

    def _undo(self) -> None:
        """Stop the VM and sharers; every step is independent and must not mask the error."""
        ctx = self.ctx
        if ctx.client is not None:
            with contextlib.suppress(Exception):
                ctx.client.close()
        if ctx.handle is not None:
            try:
                ctx.handle.kill()
                ctx.handle.wait(10)
            except Exception as err:
                log.warning("box %s: could not kill the VM: %s", ctx.record.name, err)
            with contextlib.suppress(Exception):
                ctx.handle.release()
        with contextlib.suppress(Exception):
            stop_shim(ctx.box_dir)
        if ctx.sharer is not None:
            try:
                ctx.sharer.stop(ctx.box_dir)
            except Exception as err:
                log.warning("box %s: could not stop the sharer: %s", ctx.record.name, err)
