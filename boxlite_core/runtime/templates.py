"""Boot templates: a box starts from a saved VM instead of booting a kernel.

The first start of a configuration boots cold; once its agent answers (before Init: no image
mounted, no user data in memory) the core saves the VM's state as a template and the box goes
on. Later starts whose VM the guest could not tell apart (same :func:`layout_key`) restore
the template and then run Init as a cold boot would. Measured here (TCG): a cold start's ~6 s
of kernel boot + agent start become a ~1 s restore.

A template is keyed by everything the guest saw before Init: the backend and its
``snapshot_compat`` (VMM version…), the guest kit (kernel, initrd, root image, cmdline),
machine, vCPUs, memory, and the device layout (disks and shares in order, with formats,
serials, tags and virtual sizes). The files behind the per-box devices may differ: the
rootfs overlay of another image, other volume directories. Hence the rootfs overlay's virtual
size does not follow the image (``rootfs/disk.py``): one template serves every image.

Templates live in ``HOME/cache/templates/<key>/``, sealed (:mod:`.savedstate`: 0400, SHA-256
per file). A stale or corrupt one is deleted and the box boots cold with a one-line notice;
a template never fails a box. ``BOXLITE_TEMPLATES=off`` or ``BoxOptions(template=False)``
opt out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from ..errors import ConfigError, UnsupportedError
from ..models import JsonObject
from ..rootfs import qcow2
from ..vmm.base import VmmBackend
from ..vmm.spec import Capability, DiskSpec, VmSpec
from .savedstate import SavedState, StaleStateError, load, remove_sealed, seal

#: ``off`` turns boot templates off for every box of this process (``on``: the default)
ENV_TEMPLATES = "BOXLITE_TEMPLATES"
TEMPLATES_DIR = Path("cache") / "templates"
#: bump when the key's recipe changes, so old templates are never taken for new ones
KEY_VERSION = 1


#: a template save's work directory older than this is a leftover of an interrupted save
STALE_WORK_SECONDS = 600.0


def templates_dir(home: Path) -> Path:
    """``HOME/cache/templates``: one directory per template key."""
    return Path(home) / TEMPLATES_DIR


def templates_enabled() -> bool:
    """False when ``BOXLITE_TEMPLATES`` says off (``off``, ``0``, ``no``, ``false``).

    Raises:
        ConfigError: any other value than those and ``on``/``1``/``yes``/``true``/empty.
    """
    value = os.environ.get(ENV_TEMPLATES, "").strip().lower()
    if value in ("", "on", "1", "yes", "true"):
        return True
    if value in ("off", "0", "no", "false"):
        return False
    raise ConfigError(f"{ENV_TEMPLATES}={value!r}: use 'on' or 'off'")


def virtual_size(disk: DiskSpec) -> int:
    """The size in bytes the guest sees for ``disk``: a qcow2's header size, a raw file's
    length. Raises OSError (unreadable) or ConfigError (a "qcow2" that is not one)."""
    if disk.format != "qcow2":
        return Path(disk.path).stat().st_size
    return qcow2.virtual_size(Path(disk.path))


def file_identity(path: Path) -> JsonObject:
    """Path, size and modification time of a file the saved guest has read (kernel,
    initrd, the kit's root image): a kit rebuilt in place changes the key. Raises OSError."""
    st = Path(path).stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def layout(spec: VmSpec) -> JsonObject:
    """What the guest of ``spec`` sees of its VM before Init, without per-box paths.

    Read-only disks keep their identity (:func:`file_identity`): they are the guest kit's root
    image, whose blocks the saved guest may have cached, so it must be the very same file.
    """
    return {
        "cpus": spec.cpus,
        "memory_mib": spec.memory_mib,
        "kernel": file_identity(spec.kernel),
        "initrd": file_identity(spec.initrd),
        "cmdline": spec.cmdline,
        "guest": spec.guest.to_dict(),
        "network": spec.network,
        "backend_options": dict(spec.backend_options),
        "agent": {"kind": spec.agent.kind.value, "port_name": spec.agent.port_name,
                  "vsock_port": spec.agent.vsock_port, "handshake": spec.agent.handshake.value},
        "disks": [
            {"format": d.format, "read_only": d.read_only, "serial": d.serial,
             "virtual_size": virtual_size(d),
             **({"file": file_identity(d.path)} if d.read_only else {})}
            for d in spec.disks
        ],
        "shares": [{"kind": s.kind, "tag": s.tag, "read_only": s.read_only} for s in spec.shares],
    }  # fmt: skip


def layout_key(spec: VmSpec, backend: VmmBackend) -> str:
    """The template key of ``spec`` on ``backend``: SHA-256 of its layout and the backend's
    ``snapshot_compat``.

    Raises:
        UnsupportedError: the backend cannot save this VM (no SNAPSHOT capability, or a
            device that cannot migrate): the reason a box boots cold.
        OSError: a disk file cannot be read.
    """
    if Capability.SNAPSHOT not in backend.capabilities():
        raise UnsupportedError(f"backend {backend.name!r} does not declare 'snapshot'")
    compat = backend.snapshot_compat(spec)
    body = {"v": KEY_VERSION, "backend": backend.name, "compat": compat, "layout": layout(spec)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


@attrs.frozen
class TemplateInfo:
    """One template on disk (``boxlite templates ls``): its key and sealed state."""

    key: str
    state: SavedState

    @property
    def backend(self) -> str:
        """The backend that saved it (its key covers it too)."""
        return str(self.state.meta.get("backend", ""))

    @property
    def kit_id(self) -> str:
        """The guest kit it was made with (``prune`` removes those of other kits)."""
        return str(self.state.meta.get("kit_id", ""))

    def to_dict(self) -> JsonObject:
        """What ``boxlite templates ls --json`` prints for it."""
        meta = self.state.meta
        return {
            "key": self.key,
            "backend": self.backend,
            "kit_id": self.kit_id,
            "cpus": meta.get("cpus"),
            "memory_mib": meta.get("memory_mib"),
            "size_bytes": self.state.disk_bytes,  # on disk: a memory image is sparse
            "created_at": self.state.sealed_at,
            "made_by_box": meta.get("box"),
            "path": str(self.state.directory),
        }


class TemplateStore:
    """``HOME/cache/templates``: find, make, list and remove templates."""

    def __init__(self, home: Path) -> None:
        self.root = templates_dir(home)

    def path(self, key: str) -> Path:
        """The directory of template ``key`` (it may not exist)."""
        return self.root / key

    def find(self, key: str) -> TemplateInfo | None:
        """The template for ``key`` with its sizes checked; None when there is none.

        Raises:
            StaleStateError: it exists but is incomplete or changed: the caller removes it
                (:meth:`remove`) and says so once.
        """
        directory = self.path(key)
        if not directory.is_dir():
            return None
        return TemplateInfo(key, load(directory))

    def make(
        self, key: str, meta: JsonObject, save: Callable[[Path], None]
    ) -> TemplateInfo | None:
        """Let ``save`` fill a fresh private directory, seal it and publish it as ``key``.

        Returns None when another process published the same key first (its template is as
        good). ``save`` is ``VmHandle.save_state`` bound to the VM. Nothing is left behind on
        failure. Raises what ``save`` raises, and StaleStateError from :func:`seal`.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=self.root))
        try:
            save(work)
            state = seal(work, {**meta, "key": key})
            try:
                os.rename(work, self.path(key))
            except OSError:  # published meanwhile (ENOTEMPTY/EEXIST)
                if self.path(key).is_dir():
                    return None
                raise
            return TemplateInfo(key, attrs.evolve(state, directory=self.path(key)))
        finally:
            if work.exists():
                remove_sealed(work)

    def list(self) -> list[TemplateInfo]:
        """Every template that loads (sizes checked); :meth:`broken` lists the others."""
        out = []
        for directory in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            with contextlib.suppress(StaleStateError):
                out.append(TemplateInfo(directory.name, load(directory)))
        return out

    def broken(self) -> list[Path]:
        """Template directories that do not load, and leftovers of saves interrupted more
        than :data:`STALE_WORK_SECONDS` ago (a younger one may be another start's save)."""
        out = []
        now = time.time()
        for directory in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not directory.is_dir():
                continue
            if directory.name.startswith("."):
                with contextlib.suppress(OSError):
                    if now - directory.stat().st_mtime > STALE_WORK_SECONDS:
                        out.append(directory)
                continue
            try:
                load(directory)
            except StaleStateError:
                out.append(directory)
        return out

    def remove(self, key: str) -> bool:
        """Delete one template; False if there was none."""
        directory = self.path(key)
        if not directory.is_dir():
            return False
        remove_sealed(directory)
        return True

    def prune(self, keep_kit_ids: set[str] | None = None) -> list[str]:
        """Remove broken templates and those of another kit than ``keep_kit_ids`` (None:
        remove all). Returns the removed directory names."""
        removed = []
        for directory in self.broken():
            remove_sealed(directory)
            removed.append(directory.name)
        for info in self.list():
            if keep_kit_ids is None or info.kit_id not in keep_kit_ids:
                self.remove(info.key)
                removed.append(info.key)
        return removed


def template_notice(reason: str) -> str:
    """The one-line notice of a box that could not use its template and boots cold."""
    return f"boot template not used ({reason}); booting the kernel"


def env_disabled_reason() -> str | None:
    """Why templates are off for the whole process, or None."""
    if not templates_enabled():
        return f"{ENV_TEMPLATES}=off"
    return None

