"""The files a remote box needs, as volumes of a libvirt storage pool on the daemon's host.

Why: a daemon on another machine cannot open our files, and nothing says the two machines
share a filesystem. libvirt moves bytes itself (``virStorageVolUpload`` over the connection it
already has, with its own authentication and encryption), so the guest kit and each image's
ext4 base are uploaded once into a directory pool (``boxlite``, at
``/var/lib/libvirt/boxlite`` unless ``BOXLITE_LIBVIRT_POOL`` / ``BOXLITE_LIBVIRT_POOL_PATH``
say otherwise), and each box's writable disk is a pool volume there.

Names, so that nothing is uploaded twice and nothing half-uploaded is ever used:

* ``sha256-<hex>``: a file's content (kernel, initrd, guest root image, an ext4 base). Read
  only once complete: the upload is read back (``virStorageVolDownload``) and hashed, and
  only then is the empty marker volume ``sha256-<hex>.ok`` created. A content volume without
  its marker is an interrupted upload: it is deleted and uploaded again.
* ``box-<box id>-<serial>.qcow2``: a box's writable disk, a qcow2 overlay whose backing file
  is a content volume (libvirt writes the backing path into the header), made at the box's
  first start and kept until the box is removed (its writes live there, not here).

Every call is bounded (:func:`~.libvirt_conn.bounded`); a transfer moves in
:data:`CHUNK`-sized pieces, each bounded, so a stalled daemon fails the upload, naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from boxlite_core.errors import EngineError

from .libvirt_conn import LibvirtTimeout, T, bounded, call_timeout, import_libvirt

if TYPE_CHECKING:
    import libvirt

ENV_POOL = "BOXLITE_LIBVIRT_POOL"
ENV_POOL_PATH = "BOXLITE_LIBVIRT_POOL_PATH"
DEFAULT_POOL = "boxlite"
DEFAULT_POOL_PATH = "/var/lib/libvirt/boxlite"
#: bytes per stream send/recv
CHUNK = 4 * 1024 * 1024
#: suffix of the empty volume that says its content volume is complete and verified
MARK = ".ok"
CONTENT_PREFIX = "sha256-"
BOX_PREFIX = "box-"
#: seconds to wait for another client's upload of the same content to be marked complete
PEER_UPLOAD_LIMIT = 600.0

#: (what, bytes done, bytes in all): a transfer's progress
TransferProgress = Callable[[str, int, int], None]


@attrs.frozen
class Volume:
    """A volume of the pool: its name, its path on the daemon's host, its size in bytes."""

    name: str
    path: str
    capacity: int


def pool_name(env: dict[str, str] | None = None) -> str:
    return ((os.environ if env is None else env).get(ENV_POOL) or DEFAULT_POOL).strip()


def pool_path(env: dict[str, str] | None = None) -> str:
    return ((os.environ if env is None else env).get(ENV_POOL_PATH)
            or DEFAULT_POOL_PATH).strip()


def file_digest(path: Path) -> str:
    """The sha256 of a file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_name(digest: str) -> str:
    return f"{CONTENT_PREFIX}{digest}"


def box_volume_name(box_id: str, serial: str) -> str:
    return f"{BOX_PREFIX}{box_id}-{serial}.qcow2"


def pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = path
    return ET.tostring(pool, encoding="unicode")


def _volume_xml(name: str, capacity: int, fmt: str, backing: Volume | None = None) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(vol, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=fmt)
    # 0644, owned by root: QEMU of a system daemon runs as root here (libvirt_xml seclabel)
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = "0644" if backing is None and fmt == "raw" else "0600"
    if backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = backing.path
        ET.SubElement(store, "format", type="raw")
    return ET.tostring(vol, encoding="unicode")


@attrs.define
class RemotePool:
    """The boxlite pool of one daemon, reached through ``conn`` (open, owned by the caller)."""

    uri: str
    conn: libvirt.virConnect
    name: str = attrs.field(factory=pool_name)
    path: str = attrs.field(factory=pool_path)
    _pool: libvirt.virStoragePool | None = attrs.field(default=None, init=False)

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        libvirt = import_libvirt()
        try:
            return bounded(what, self.uri, fn, *args)
        except libvirt.libvirtError as exc:
            raise EngineError(f"libvirt {what} on {self.uri} (pool {self.name!r}): {exc}"
                              ) from exc

    def pool(self) -> libvirt.virStoragePool:
        """The pool, defined (persistent, autostarted), built and started if it was not.

        Raises:
            EngineError: the daemon refused (e.g. the directory cannot be made), or did not
                answer in time (LibvirtTimeout).
        """
        if self._pool is not None:
            return self._pool
        libvirt = import_libvirt()
        try:
            pool = bounded("virStoragePoolLookupByName", self.uri,
                           self.conn.storagePoolLookupByName, self.name)
        except libvirt.libvirtError:
            pool = self._call("virStoragePoolDefineXML", self.conn.storagePoolDefineXML,
                              pool_xml(self.name, self.path), 0)
            self._call("virStoragePoolBuild", pool.build, 0)
            self._call("virStoragePoolSetAutostart", pool.setAutostart, 1)
        if not self._call("virStoragePoolIsActive", pool.isActive):
            self._call("virStoragePoolCreate", pool.create, 0)
        # files another client added since the daemon last looked
        self._call("virStoragePoolRefresh", pool.refresh, 0)
        self._pool = pool
        return pool

    def exists(self) -> bool:
        """Is the pool defined on the daemon (without defining it)?"""
        libvirt = import_libvirt()
        try:
            bounded("virStoragePoolLookupByName", self.uri, self.conn.storagePoolLookupByName,
                    self.name)
        except libvirt.libvirtError:
            return False
        return True

    def _lookup(self, name: str) -> libvirt.virStorageVol | None:
        libvirt = import_libvirt()
        pool = self.pool()
        try:
            return bounded("virStorageVolLookupByName", self.uri, pool.storageVolLookupByName,
                           name)
        except libvirt.libvirtError:
            return None

    def find(self, name: str) -> Volume | None:
        """The volume called ``name``, or None."""
        vol = self._lookup(name)
        if vol is None:
            return None
        info = self._call("virStorageVolGetInfo", vol.info)
        return Volume(name, str(self._call("virStorageVolGetPath", vol.path)), int(info[1]))

    def names(self, prefix: str = "") -> list[str]:
        """Names of the pool's volumes starting with ``prefix``."""
        pool = self.pool()
        return sorted(n for n in self._call("virStoragePoolListVolumes", pool.listVolumes)
                      if n.startswith(prefix))

    def delete(self, name: str) -> bool:
        """Delete volume ``name``; False if there was none."""
        vol = self._lookup(name)
        if vol is None:
            return False
        self._call("virStorageVolDelete", vol.delete, 0)
        return True

    def upload(self, local: Path, progress: TransferProgress | None = None,
               digest: str | None = None) -> Volume:
        """The content volume holding ``local``'s bytes, uploaded and verified if the pool
        does not have it complete yet (see the module docs). ``progress`` gets
        ``("upload NAME", done, total)`` and ``("verify NAME", done, total)``.

        Raises:
            EngineError: the upload or the read-back failed, or the bytes read back differ
                (the volume is deleted), or a stalled daemon (LibvirtTimeout).
            OSError: ``local`` cannot be read.
        """
        digest = digest or file_digest(local)
        name = content_name(digest)
        done = self.find(name)
        if done is not None and self.find(name + MARK) is not None:
            return done
        size = local.stat().st_size
        if done is not None:
            peer = self._settle_partial(name)
            if peer is not None:
                return peer
        try:
            vol = self._call("virStorageVolCreateXML", self.pool().createXML,
                             _volume_xml(name, size, "raw"), 0)
        except EngineError as exc:
            return self._wait_for_peer(name, exc)  # another client creates it right now
        try:
            self._send(vol, local, size, name, progress)
            got = self._read_back_digest(vol, size, name, progress)
            if got != digest:
                raise EngineError(f"volume {name} on {self.uri} read back with sha256 {got}, "
                                  f"not {digest}: the upload of {local} was corrupted")
        except BaseException:
            with contextlib.suppress(Exception):
                self._call("virStorageVolDelete", vol.delete, 0)
            raise
        try:
            self._call("virStorageVolCreateXML", self.pool().createXML,
                       _volume_xml(name + MARK, 0, "raw"), 0)
        except EngineError:
            if self.find(name + MARK) is None:
                raise
            # another client marked the same bytes complete first: as good as ours
        found = self.find(name)
        assert found is not None
        return found

    def _settle_partial(self, name: str) -> Volume | None:
        """A content volume without its marker: another client's upload in progress, or an
        interrupted one. The peer's volume, once it marks it complete; None after deleting
        an interrupted one (nothing written to it for :func:`~.libvirt_conn.call_timeout`
        seconds: its allocation did not grow, and no marker came).

        Why not a short fixed wait: an upload of a large base takes far longer than any
        such wait, and deleting a peer's volume mid-upload failed that peer (its read-back
        or its marker met our new volume).
        """
        bound = call_timeout()
        last: int | None = None
        moved = time.monotonic()
        while True:
            if self.find(name + MARK) is not None:
                return self.find(name)
            vol = self._lookup(name)
            if vol is None:
                return None  # its uploader gave up and deleted it
            allocation = int(self._call("virStorageVolGetInfo", vol.info)[2])
            now = time.monotonic()
            if allocation != last:
                last, moved = allocation, now
            elif now - moved > bound:
                break
            time.sleep(0.5)
        self.delete(name)
        return None

    def _wait_for_peer(self, name: str, why: EngineError) -> Volume:
        deadline = time.monotonic() + PEER_UPLOAD_LIMIT
        while time.monotonic() < deadline:
            found = self.find(name)
            if found is not None and self.find(name + MARK) is not None:
                return found
            if found is None:
                raise EngineError(f"volume {name} on {self.uri} could not be created ({why}), "
                                  "and no other client is uploading it")
            time.sleep(1.0)
        raise EngineError(f"volume {name} on {self.uri} is being uploaded by another client "
                          f"and was not complete after {PEER_UPLOAD_LIMIT:g} s; if no "
                          f"upload runs, delete it: virsh -c {self.uri} vol-delete {name} "
                          f"--pool {self.name}")

    def _stream(self, what: str, start: Callable[[libvirt.virStream], object],
                 move: Callable[[libvirt.virStream, Callable[[int], None]], None]) -> None:
        """A transfer on a new stream: ``start(stream)`` (the upload or download call), then
        ``move(stream, tick)`` in a worker thread, which calls ``tick(n)`` for every ``n``
        bytes moved. Bounded by stall, not by size: LibvirtTimeout when no byte moved for
        :func:`~.libvirt_conn.call_timeout` seconds (the stream is aborted).

        Why a watchdog and not :func:`bounded` per chunk: libvirt streams move ~256 KiB per
        message, and a thread per call made the read-back twice as slow as the data.
        """
        libvirt = import_libvirt()
        stream = self._call("virStreamNew", self.conn.newStream, 0)
        last = [time.monotonic()]
        failed: list[BaseException] = []
        done = threading.Event()

        def tick(n: int) -> None:
            last[0] = time.monotonic()

        def run() -> None:
            try:
                move(stream, tick)
                stream.finish()
            except BaseException as exc:
                failed.append(exc)
            finally:
                done.set()

        try:
            self._call(what, start, stream)
            threading.Thread(target=run, daemon=True, name=f"libvirt {what}").start()
            bound = call_timeout()
            while not done.wait(0.5):
                if time.monotonic() - last[0] > bound:
                    raise LibvirtTimeout(
                        f"libvirt {what} on {self.uri} (pool {self.name!r}): no data moved "
                        f"for {bound:g} s; the daemon or the network is stuck (raise "
                        "BOXLITE_LIBVIRT_TIMEOUT on a slow link)")
        except BaseException:
            with contextlib.suppress(Exception):
                bounded("virStreamAbort", self.uri, stream.abort, timeout=5.0)
            raise
        if failed:
            if isinstance(failed[0], libvirt.libvirtError):
                raise EngineError(f"libvirt {what} on {self.uri} (pool {self.name!r}): "
                                  f"{failed[0]}") from failed[0]
            raise failed[0]

    def _send(self, vol: libvirt.virStorageVol, local: Path, size: int, name: str,
              progress: TransferProgress | None) -> None:
        sent = [0]

        def move(stream: libvirt.virStream, tick: Callable[[int], None]) -> None:
            with open(local, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        n = int(stream.send(view.tobytes()))
                        view = view[n:]
                        tick(n)
                    sent[0] += len(chunk)
                    if progress:
                        progress(f"upload {name}", sent[0], size)

        self._stream("virStorageVolUpload", lambda st: vol.upload(st, 0, size, 0), move)

    def _read_back_digest(self, vol: libvirt.virStorageVol, size: int, name: str,
                          progress: TransferProgress | None) -> str:
        digest = hashlib.sha256()
        got = [0]

        def move(stream: libvirt.virStream, tick: Callable[[int], None]) -> None:
            while True:
                data = stream.recv(CHUNK)
                if not isinstance(data, bytes) or not data:
                    return
                digest.update(data)
                got[0] += len(data)
                tick(len(data))
                if progress and got[0] % CHUNK < len(data):  # about every CHUNK bytes
                    progress(f"verify {name}", got[0], size)

        self._stream("virStorageVolDownload", lambda st: vol.download(st, 0, size, 0), move)
        return digest.hexdigest()

    def overlay(self, name: str, backing: Volume, virtual_size: int) -> Volume:
        """The qcow2 volume ``name`` over ``backing`` (raw), made if it does not exist.

        Raises:
            EngineError: the daemon refused or did not answer in time.
        """
        found = self.find(name)
        if found is not None:
            return found
        self._call("virStorageVolCreateXML", self.pool().createXML,
                   _volume_xml(name, virtual_size, "qcow2", backing), 0)
        made = self.find(name)
        assert made is not None
        return made
