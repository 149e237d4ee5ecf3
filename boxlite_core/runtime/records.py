"""The box record: what the database remembers about a box between processes."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Mapping
from typing import TypeAlias

import attrs

from ..models import BoxOptions, BoxStatus, JsonObject, JsonValue
from ..vmm.procstat import alive, start_time

#: a column value as sqlite stores it
Column: TypeAlias = "str | int | float | None"

ID_BYTES = 6  # 12 hex characters: short enough to type, long enough not to collide

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "happy", "icy", "jolly",
    "keen", "lucky", "mellow", "nimble", "quiet", "rapid", "shy", "tidy", "vivid", "witty",
)
_NOUNS = (
    "otter", "falcon", "badger", "heron", "lynx", "marten", "newt", "owl", "panda", "quokka",
    "raven", "seal", "tapir", "urchin", "vole", "walrus", "yak", "zebra", "gecko", "ibis",
)


def process_identity(pid: int | None = None) -> dict[str, int | None]:
    """``{"pid", "start_time"}`` of ``pid`` (default: this process), as records store it.

    Why both: pids are recycled, so "pid 4242 is alive" says nothing about the process that
    wrote the record; pid + /proc start time does."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start_time": start_time(pid)}


def identity_alive(identity: Mapping[str, JsonValue] | None) -> bool:
    """Is the process an identity names (see :func:`process_identity`) still running?

    False for a missing or malformed identity, a dead pid, a zombie, and a recycled pid
    (same number, another start time)."""
    if not identity:
        return False
    try:
        pid = int(identity["pid"])  # malformed values: caught below
        raw = identity.get("start_time")
        started = None if raw is None else int(raw)
    except (KeyError, TypeError, ValueError):
        return False
    if started is None:  # never recorded without one; do not trust a bare pid
        return False
    return alive(pid, started)


def new_box_id() -> str:
    return secrets.token_hex(ID_BYTES)


def generated_name(box_id: str, attempt: int = 0) -> str:
    """A friendly default name; after a few collisions fall back to one derived from the id."""
    if attempt >= 3:
        return f"box-{box_id[:6]}" if attempt == 3 else f"box-{box_id}"
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"


@attrs.frozen
class BoxRecord:
    """One row of the ``boxes`` table. Frozen: updates go through BoxStore and return a copy.

    ``state`` is free-form JSON for facts that are not queried: stage timings, exec counters,
    the agent kind and socket, the sharer in use, the failing stage.
    """

    id: str
    name: str
    status: BoxStatus
    options: BoxOptions
    backend: str | None = None
    image: str = ""
    image_digest: str | None = None
    rootfs: str = "disk"
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None
    pid: int | None = None
    error: str | None = None
    failures: int = 0
    state: Mapping[str, JsonValue] = attrs.field(factory=dict)

    @property
    def stage_timings(self) -> dict[str, float]:
        timings = self.state.get("stage_timings")
        return {str(k): float(v) for k, v in timings.items()} if isinstance(timings, dict) else {}

    @property
    def stage(self) -> str | None:
        """The init-pipeline stage a Starting box is in (kept after a failure: where it died)."""
        stage = self.state.get("stage")
        return stage if isinstance(stage, str) else None

    @property
    def starter(self) -> JsonObject | None:
        """``{"pid", "start_time"}`` of the process running (or that ran) the last start."""
        starter = self.state.get("starter")
        return dict(starter) if isinstance(starter, dict) and starter else None

    @property
    def vmm(self) -> JsonObject | None:
        """``{"pid", "start_time"}`` of the VMM process, recorded right after launch."""
        vmm = self.state.get("vmm")
        return dict(vmm) if isinstance(vmm, dict) and vmm else None

    @property
    def abandoned(self) -> bool:
        """Starting, but the process that was starting it is gone (killed, crashed, host
        rebooted): nobody will finish or undo this start, so it is to be treated as failed
        once whatever its box directory names has been stopped."""
        return self.status is BoxStatus.STARTING and not identity_alive(self.starter)

    def _scalar_columns(self) -> dict[str, Column]:
        """The columns stored as themselves, shared by to_dict() and to_row()."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "backend": self.backend,
            "image": self.image,
            "image_digest": self.image_digest,
            "rootfs": self.rootfs,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "pid": self.pid,
            "error": self.error,
            "failures": self.failures,
        }

    def to_dict(self) -> JsonObject:
        """The record as JSON (``boxlite inspect``, the lifecycle hooks' ``box``)."""
        return {
            **self._scalar_columns(),
            "options": self.options.to_dict(),
            "state": json.loads(json.dumps(dict(self.state), default=str)),
        }

    @classmethod
    def from_row(cls, row: sqlite3.Row | Mapping[str, Column]) -> BoxRecord:
        return cls(
            id=row["id"],
            name=row["name"],
            status=BoxStatus(row["status"]),
            options=BoxOptions.from_dict(json.loads(row["options_json"])),
            backend=row["backend"],
            image=row["image"],
            image_digest=row["image_digest"],
            rootfs=row["rootfs"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            stopped_at=row["stopped_at"],
            pid=row["pid"],
            error=row["error"],
            failures=row["failures"],
            state=json.loads(row["state_json"] or "{}"),
        )

    def to_row(self) -> dict[str, Column]:
        return {
            **self._scalar_columns(),
            "options_json": json.dumps(self.options.to_dict(), sort_keys=True),
            "state_json": json.dumps(dict(self.state), sort_keys=True, default=str),
        }
