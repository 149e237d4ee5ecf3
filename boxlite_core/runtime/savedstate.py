"""A sealed saved-state directory: what ``VmHandle.save_state`` wrote, plus our manifest.

Boot templates and user snapshots are both directories a backend filled with a VM's memory
and device state. The backend's files are opaque to the core, so the core seals them: after
the save it records each file's size and SHA-256 in ``MANIFEST`` and makes the files
read-only (0400). Before a restore it checks the sizes (cheap, at once) and, while the VMM
loads the state, the digests (:func:`verify_digests`, ~0.13 s per 120 MiB here, skipped for a
file whose stat identity is unchanged since its last check): a VM restored from a changed file
must not be taken for a good one. A state that fails either
check is stale: templates are deleted and the box boots cold; a snapshot is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import attrs

from ..errors import BoxliteError
from ..models import JsonObject, JsonValue

#: the core's manifest inside a saved-state directory (the backend never writes this name)
MANIFEST = "boxlite-state.json"
MANIFEST_VERSION = 1
#: files whose digests verify_digests checked, by stat identity (not part of the seal)
VERIFIED = "boxlite-verified.json"
#: seconds a file's ctime must lie before a hash for its identity to be recorded
TRUST_AFTER_S = 1.0
#: seconds :func:`seal` waits between making the files read-only and hashing them: more than
#: the coarse clock the kernel stamps ctime with (a jiffy: 4 ms at HZ=250, 10 ms at HZ=100),
#: so a write after the hash began cannot share the chmod's ctime
SEAL_SETTLE_S = 0.02
#: file mode of everything sealed: read-only for its owner, nothing for anyone else
SEALED_MODE = 0o400


class StaleStateError(BoxliteError):
    """A saved-state directory is incomplete, changed since it was sealed, or unreadable."""


@attrs.frozen
class SealedFile:
    """One backend file of a saved state: its name in the directory, bytes and SHA-256."""

    name: str
    size: int
    sha256: str


@attrs.frozen
class SavedState:
    """A sealed directory: the backend's ``files`` and the ``meta`` the core recorded.

    ``meta`` holds what the caller needs to decide whether a restore fits (the layout key,
    the backend, its ``snapshot_compat`` string, the kit); ``sealed_at`` is epoch seconds.
    """

    directory: Path
    files: tuple[SealedFile, ...]
    meta: Mapping[str, JsonValue]
    sealed_at: float

    @property
    def size_bytes(self) -> int:
        """Bytes of the backend's files (their lengths)."""
        return sum(f.size for f in self.files)

    @property
    def disk_bytes(self) -> int:
        """Bytes the backend's files take on disk now: a sparse file counts what is
        allocated (a qemu memory image is as long as the guest's memory, and about a
        quarter of it is written). A missing file counts 0."""
        total = 0
        for f in self.files:
            with contextlib.suppress(OSError):
                total += (self.directory / f.name).stat().st_blocks * 512
        return total


def remove_sealed(path: Path) -> None:
    """Remove a sealed tree (a template, a snapshot): its files are 0400, which root ignores
    and an owner may unlink (write permission on the directory is what counts)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def seal(directory: Path, meta: Mapping[str, JsonValue]) -> SavedState:
    """Record every file the backend wrote in ``directory`` and make them read-only.

    The digests computed here also count as the first check (:data:`VERIFIED`), so the
    first restore does not hash the state again: a fork restores its snapshot at once, and
    the second hash (~0.15 s of CPU for 120 MiB) competed with the copy's QEMU on 2 cores.
    That holds the same rule as :func:`verify_digests` with the jiffy-sized
    :data:`SEAL_SETTLE_S`: every file is made read-only first (its last ctime change) and
    the hashes begin a settle time later; a file's identity is recorded only if its ctime
    lay over a jiffy before its hash began and its stat is the same after the hash as
    before it, so a write during or after the hash shows in the ctime.

    Raises:
        StaleStateError: the backend wrote nothing, or a directory inside it (the contract
            says files only).
    """
    directory = Path(directory)
    paths = []
    for path in sorted(directory.iterdir()):
        if path.name in (MANIFEST, VERIFIED):
            continue
        if not path.is_file() or path.is_symlink():
            raise StaleStateError(f"saved state {directory}: {path.name} is not a plain file")
        os.chmod(path, SEALED_MODE)
        paths.append(path)
    if not paths:
        raise StaleStateError(f"saved state {directory}: the backend wrote no file")
    time.sleep(SEAL_SETTLE_S)
    files = []
    checked: dict[str, JsonValue] = {}
    for path in paths:
        began_ns = time.time_ns()
        before = path.stat()
        digest = _sha256(path)
        files.append(SealedFile(path.name, before.st_size, digest))
        settled = began_ns - before.st_ctime_ns > SEAL_SETTLE_S * 1e9 / 2
        if settled and _identity(path.stat(), digest) == _identity(before, digest):
            checked[path.name] = _identity(before, digest)
    state = SavedState(directory, tuple(files), dict(meta), time.time())
    body: JsonObject = {
        "version": MANIFEST_VERSION,
        "sealed_at": state.sealed_at,
        "files": [attrs.asdict(f) for f in files],
        "meta": dict(meta),
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, SEALED_MODE)
    os.replace(tmp, directory / MANIFEST)
    _write_verified(directory, checked)
    return state


def load(directory: Path) -> SavedState:
    """The sealed state in ``directory``, with every file's size checked (not its digest).

    Raises:
        StaleStateError: no manifest, a manifest we cannot read, a missing file or a size
            that differs from the sealed one.
    """
    directory = Path(directory)
    try:
        body = json.loads((directory / MANIFEST).read_text())
        if body.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {body.get('version')!r}")
        files = tuple(SealedFile(str(f["name"]), int(f["size"]), str(f["sha256"]))
                      for f in body["files"])
        meta = dict(body["meta"])
        sealed_at = float(body["sealed_at"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StaleStateError(f"saved state {directory}: unreadable manifest ({exc})") from None
    for f in files:
        try:
            size = (directory / f.name).stat().st_size
        except OSError as exc:
            raise StaleStateError(f"saved state {directory}: {f.name}: {exc}") from None
        if size != f.size:
            raise StaleStateError(
                f"saved state {directory}: {f.name} is {size} bytes, sealed as {f.size}"
            )
    return SavedState(directory, files, meta, sealed_at)


def _identity(st: os.stat_result, sha256: str) -> list[JsonValue]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256]


def _verified(directory: Path) -> dict[str, JsonValue]:
    with contextlib.suppress(OSError, ValueError):
        body = json.loads((directory / VERIFIED).read_text())
        if isinstance(body, dict):
            return body
    return {}


def verify_digests(state: SavedState) -> None:
    """Re-hash every file of ``state`` against its manifest, except a file whose digest was
    checked before and which has not changed since (:data:`VERIFIED`).

    Why the exception: hashing a 120 MiB template took ~0.13 s of CPU on every start, beside
    QEMU loading the same file on a 2-core host. "Not changed" is the file's device, inode,
    size, mtime and ctime: any write or chmod moves the ctime, which no user can set back. An
    identity is recorded only when its ctime was over :data:`TRUST_AFTER_S` old when the hash
    began, so a change in the same clock tick as the last one (the kernel stamps ctime with a
    coarse clock, ~4 ms) cannot hide behind it.

    Raises:
        StaleStateError: a file's SHA-256 differs (or it cannot be read).
    """
    known = _verified(state.directory)
    began_ns = time.time_ns()
    checked: dict[str, JsonValue] = {}
    for f in state.files:
        path = state.directory / f.name
        try:
            st = path.stat()
            identity = _identity(st, f.sha256)
            if known.get(f.name) == identity:
                checked[f.name] = identity
                continue
            digest = _sha256(path)
        except OSError as exc:
            raise StaleStateError(f"saved state {state.directory}: {f.name}: {exc}") from None
        if digest != f.sha256:
            raise StaleStateError(
                f"saved state {state.directory}: {f.name} changed since it was saved "
                f"(sha256 {digest[:12]}…, sealed {f.sha256[:12]}…)"
            )
        if began_ns - st.st_ctime_ns > TRUST_AFTER_S * 1e9:
            checked[f.name] = identity
    if checked != known:
        _write_verified(state.directory, checked)


def _write_verified(directory: Path, checked: Mapping[str, JsonValue]) -> None:
    tmp = directory / (VERIFIED + ".tmp")
    with contextlib.suppress(OSError):  # read-only media: hash again next time
        tmp.unlink(missing_ok=True)
        tmp.write_text(json.dumps(dict(checked), sort_keys=True) + "\n")
        os.chmod(tmp, SEALED_MODE)
        os.replace(tmp, directory / VERIFIED)
