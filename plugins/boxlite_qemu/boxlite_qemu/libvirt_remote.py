"""A box on a remote libvirt host: its files as volumes there, and its stream bridge here.

:func:`layout` is the plan's half (reads our files, writes nothing): the kernel, the initrd and
every read-only raw disk become content volumes (``sha256-<hex>``); a writable qcow2 overlay
over a raw base becomes the box's own qcow2 volume over the base's content volume. Nothing
else can be moved without copying a box's writes, so any other disk is refused, naming it
(the ``disk`` rootfs strategy gives exactly these disks). :func:`stage` is launch's half:
upload what the pool lacks and make the box's volumes. :func:`forget` deletes a removed box's
volumes. :func:`start_bridge` / :func:`stop_bridge` run the box's stream bridge
(libvirt_bridge.py: the agent channel and console through the connection).

Why not copy the local overlay: the box's writes live on the remote host from its first start
on; the local overlay (which the rootfs strategy made, empty) only says the disk's size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from boxlite_core.errors import ConfigError, EngineError
from boxlite_core.models import JsonObject, JsonValue
from boxlite_core.rootfs import qcow2
from boxlite_core.vmm.procstat import live_record, log_tail, start_time, stop_recorded
from boxlite_core.vmm.spec import VmSpec

from .libvirt_conn import bounded, import_libvirt
from .libvirt_pool import (
    BOX_PREFIX,
    CONTENT_PREFIX,
    MARK,
    RemotePool,
    box_volume_name,
    content_name,
    file_digest,
    pool_name,
    pool_path,
    pool_xml,
)
from .libvirt_xml import RemoteFiles

if TYPE_CHECKING:
    import libvirt

#: the box's launch plan, written by the core (vmm/base.py)
PLAN_FILE = "plan.json"

#: a file's digest, cached on the file itself: ``SIZE:MTIME_NS:SHA256`` (kit files and ext4
#: bases never change in place, but a cache keyed on size and mtime cannot be fooled by one
#: that does)
DIGEST_XATTR = "user.boxlite.sha256"

Report = Callable[[str, float | None], None]


def _stamp(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:"


def cached_digest(path: Path) -> str:
    """sha256 of ``path``'s content: from its xattr (:func:`remember_digest`, written at
    launch) when size and mtime still match, else read and hashed. Writes nothing: a plan
    calls it."""
    stamp = _stamp(path)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        value = os.getxattr(path, DIGEST_XATTR).decode()
        if value.startswith(stamp):
            return value[len(stamp):]
    return file_digest(path)


def remember_digest(path: Path, digest: str) -> None:
    """Cache ``digest`` on ``path`` (its xattr), so the next plan need not read the file;
    best effort (no user xattrs on that filesystem, or no right to set them)."""
    with contextlib.suppress(OSError):
        os.setxattr(path, DIGEST_XATTR, (_stamp(path) + digest).encode())


@attrs.frozen
class Upload:
    """A file of ours and the content volume that holds it there."""

    local: str
    volume: str


@attrs.frozen
class Overlay:
    """A box's writable qcow2 volume over a content volume, ``capacity`` bytes."""

    volume: str
    backing: str
    capacity: int


@attrs.frozen
class RemoteLayout:
    """Everything a remote box's launch puts in the pool, and the paths the XML names."""

    pool: str
    pool_path: str
    uploads: tuple[Upload, ...] = attrs.field(converter=tuple)
    overlays: tuple[Overlay, ...] = attrs.field(converter=tuple)
    files: RemoteFiles

    def to_json(self) -> JsonObject:
        return {
            "pool": self.pool, "pool_path": self.pool_path,
            "uploads": [{"local": u.local, "volume": u.volume} for u in self.uploads],
            "overlays": [{"volume": o.volume, "backing": o.backing, "capacity": o.capacity}
                         for o in self.overlays],
            "files": {"kernel": self.files.kernel, "initrd": self.files.initrd,
                      "disks": list(self.files.disks)},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, JsonValue]) -> RemoteLayout:
        files = data["files"]
        assert isinstance(files, dict)
        return cls(
            pool=str(data["pool"]), pool_path=str(data["pool_path"]),
            uploads=[Upload(str(u["local"]), str(u["volume"]))
                     for u in data["uploads"]],  # type: ignore[index,union-attr]
            overlays=[Overlay(str(o["volume"]), str(o["backing"]), int(o["capacity"]))
                      for o in data["overlays"]],  # type: ignore[index,union-attr]
            files=RemoteFiles(str(files["kernel"]), str(files["initrd"]),
                              [str(d) for d in files["disks"]]),  # type: ignore[union-attr]
        )


def _is_qcow2(path: Path) -> bool:
    try:
        qcow2.virtual_size(path)
    except ConfigError:
        return False
    return True


def layout(spec: VmSpec) -> RemoteLayout:
    """The pool volumes ``spec`` needs on a remote host (see the module docs).

    Raises:
        ConfigError: a disk that is neither read-only raw nor a qcow2 overlay over a raw
            base, naming it; a file that cannot be read.
    """
    name, path = pool_name(), pool_path()
    uploads: dict[str, Upload] = {}

    def content(local: Path) -> str:
        try:
            volume = content_name(cached_digest(local))
        except OSError as exc:
            raise ConfigError(f"cannot read {local} to upload it ({exc.strerror})") from None
        uploads.setdefault(volume, Upload(str(local), volume))
        return f"{path}/{volume}"

    kernel, initrd = content(spec.kernel), content(spec.initrd)
    disks: list[str] = []
    overlays: list[Overlay] = []
    for index, disk in enumerate(spec.disks):
        serial = disk.serial or f"disk{index}"
        if disk.format == "raw" and disk.read_only:
            disks.append(content(disk.path))
            continue
        base = qcow2.backing_file(disk.path) if disk.format == "qcow2" else None
        if base is None or _is_qcow2(base):
            raise ConfigError(
                f"disk {serial} ({disk.path}, {disk.format}): a remote libvirt host takes "
                "read-only raw disks and qcow2 overlays over a raw base, which it keeps "
                "itself; use --rootfs disk")
        backing = content(base).rsplit("/", 1)[1]
        volume = box_volume_name(spec.box_id, serial)
        overlays.append(Overlay(volume, backing, qcow2.virtual_size(disk.path)))
        disks.append(f"{path}/{volume}")
    return RemoteLayout(name, path, tuple(uploads.values()), overlays,
                        RemoteFiles(kernel, initrd, disks))


def check_directories(conn: libvirt.virConnect, uri: str, paths: Sequence[Path]) -> None:
    """Each of ``paths`` must be a directory on the daemon's host (a remote box's volumes).

    libvirt has no stat call; a transient ``dir`` pool over a path starts only when it is a
    directory there (it is destroyed at once, the directory untouched). libvirt refuses a
    second pool over a path an active pool already serves (the host's ``default`` pool at
    /var/lib/libvirt/images, or another start's check of the same path): that pool running
    there says the path is a directory.

    Raises:
        ConfigError: a path that is not a directory there, naming it and libvirt's words.
        EngineError: the daemon stalled (LibvirtTimeout).
    """
    libvirt = import_libvirt()
    for path in paths:
        # unique per check: two starts checking one path at once must not meet by name
        name = (f"boxlite-check-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}-"
                f"{os.getpid()}-{threading.get_ident() % 10**6}")
        for attempt in range(3):
            try:
                pool = bounded("virStoragePoolCreateXML", uri, conn.storagePoolCreateXML,
                               pool_xml(name, str(path)), 0)
            except libvirt.libvirtError as exc:
                if _served_by_active_pool(conn, uri, path):
                    break
                if attempt < 2:  # the pool that conflicted may have just gone
                    time.sleep(0.2)
                    continue
                raise ConfigError(
                    f"volume {path}: not a directory on {uri} ({exc.get_error_message()}); "
                    "with --host, -v names directories of that machine") from None
            with contextlib.suppress(Exception):
                bounded("virStoragePoolDestroy", uri, pool.destroy)
            break


def _served_by_active_pool(conn: libvirt.virConnect, uri: str, path: Path) -> bool:
    """Is ``path`` the target of a running pool of the daemon (so a directory there)?"""
    want = os.path.normpath(str(path))
    for pool in bounded("virConnectListAllStoragePools", uri, conn.listAllStoragePools,
                        import_libvirt().VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        with contextlib.suppress(Exception):
            if os.path.normpath(_pool_target(uri, pool) or "/") == want:
                return True
    return False


def _pool_target(uri: str, pool: libvirt.virStoragePool) -> str:
    xml = bounded("virStoragePoolGetXMLDesc", uri, pool.XMLDesc, 0)
    return (ET.fromstring(xml).findtext("target/path") or "").rstrip("/")


def stage(conn: libvirt.virConnect, uri: str, plan: RemoteLayout,
          report: Report | None = None) -> None:
    """Make ``plan`` true on the daemon's host: upload the content volumes the pool lacks
    (verified, see libvirt_pool) and make the box's overlays that do not exist yet.

    Raises:
        ConfigError: the pool exists at another path than the plan's (set
            BOXLITE_LIBVIRT_POOL_PATH to it).
        EngineError: an upload or a volume failed, or the daemon stalled (LibvirtTimeout).
    """
    pool = RemotePool(uri, conn, plan.pool, plan.pool_path)
    actual = _pool_target(uri, pool.pool())
    if actual != plan.pool_path.rstrip("/"):
        raise ConfigError(
            f"libvirt pool {plan.pool!r} on {uri} lives at {actual}, not {plan.pool_path}; "
            f"set BOXLITE_LIBVIRT_POOL_PATH={actual} (or BOXLITE_LIBVIRT_POOL to another pool)")
    volumes = {}
    for item in plan.uploads:
        local = Path(item.local)

        def progress(what: str, done: int, total: int, local: Path = local) -> None:
            if report is not None:
                verb = "uploading" if what.startswith("upload") else "verifying"
                report(f"{verb} {local.name} to {uri} ({done // 2**20}/{total // 2**20} MiB)",
                       done / total if total else None)

        digest = item.volume.split("-", 1)[1]
        volumes[item.volume] = pool.upload(local, progress, digest=digest)
        remember_digest(local, digest)
    for overlay in plan.overlays:
        backing = volumes.get(overlay.backing) or pool.find(overlay.backing)
        if backing is None:
            raise EngineError(f"volume {overlay.backing} vanished from pool {plan.pool!r} on "
                              f"{uri} while box volume {overlay.volume} was being made")
        pool.overlay(overlay.volume, backing, overlay.capacity)


def recorded_pool(box_dir: Path) -> str | None:
    """The pool the box's last launch put its volumes in (BOXDIR/plan.json, see
    vmm/base.py), or None (no remote launch recorded)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((Path(box_dir) / PLAN_FILE).read_text())["data"]["remote"]["pool"])
    return None


def forget(conn: libvirt.virConnect, uri: str, box_id: str, pool_of_box: str | None = None
           ) -> list[str]:
    """Delete every volume of box ``box_id`` from the pool (``pool_of_box``, the one its
    launch used, else the configured one); their names.

    Raises:
        EngineError: the daemon refused or did not answer in time.
    """
    pool = RemotePool(uri, conn, pool_of_box or pool_name())
    if not pool.exists():
        return []
    gone = []
    for name in pool.names(f"{BOX_PREFIX}{box_id}-"):
        if pool.delete(name):
            gone.append(name)
    return gone


# -- the box's stream bridge (libvirt_bridge.py), by pid + start time ----------------------------

#: the bridge's identity and parameters, in the box dir
BRIDGE_JSON = "libvirt-bridge.json"
BRIDGE_LOG = "libvirt-bridge.log"
BRIDGE_LOCK = "libvirt-bridge.lock"
#: seconds the bridge has to open the console and listen
BRIDGE_START_LIMIT = 60.0


def live_bridge(box_dir: Path) -> JsonObject | None:
    """BOXDIR/libvirt-bridge.json of the box's running bridge, else None."""
    return live_record(Path(box_dir) / BRIDGE_JSON)


def start_bridge(box_dir: Path, uri: str, uuid: str, port_name: str, agent_socket: Path,
                 console_socket: Path) -> JsonObject:
    """Start the box's bridge (after stopping an earlier one); return once it serves.

    Raises:
        EngineError: it exited or did not serve within BRIDGE_START_LIMIT (its log quoted).
    """
    box_dir = Path(box_dir)
    stop_bridge(box_dir)
    log_path = box_dir / BRIDGE_LOG
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])  # this boxlite_qemu, whatever sys.path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "boxlite_qemu.libvirt_bridge", "--uri", uri, "--uuid", uuid,
             "--port-name", port_name, "--agent-socket", str(agent_socket),
             "--console-socket", str(console_socket)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
            start_new_session=True, close_fds=True)
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], BRIDGE_START_LIMIT)[0]
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line.strip() != b"ready":
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait(5)
        raise EngineError(f"the libvirt stream bridge of {box_dir} did not serve within "
                          f"{BRIDGE_START_LIMIT:g} s; {log_path} ends:\n"
                          f"{log_tail(log_path, 5, 2000) or '(empty)'}")
    threading.Thread(target=proc.wait, daemon=True, name=f"bridge-reaper-{proc.pid}").start()
    info: JsonObject = {"pid": proc.pid, "start_time": start_time(proc.pid) or 0, "uri": uri,
                        "uuid": uuid, "port_name": port_name,
                        "agent_socket": str(agent_socket),
                        "console_socket": str(console_socket)}
    tmp = box_dir / f".{BRIDGE_JSON}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, box_dir / BRIDGE_JSON)
    return info


def stop_bridge(box_dir: Path, grace: float = 5.0) -> bool:
    """End the box's bridge and remove its record. True if one ran."""
    return stop_recorded(Path(box_dir) / BRIDGE_JSON, grace)


def ensure_bridge(box_dir: Path) -> bool:
    """Start the box's bridge again with its recorded parameters if it is not running (the
    machine that ran it rebooted, or it was killed); True if it had to. Serialised between
    processes by BOXDIR/libvirt-bridge.lock.

    Raises:
        EngineError: there is no record to restart it from, or it does not start.
    """
    box_dir = Path(box_dir)
    if live_bridge(box_dir) is not None:
        return False
    with open(box_dir / BRIDGE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if live_bridge(box_dir) is not None:
            return False
        try:
            info = json.loads((box_dir / BRIDGE_JSON).read_text())
            args = (str(info["uri"]), str(info["uuid"]), str(info["port_name"]),
                    Path(info["agent_socket"]), Path(info["console_socket"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"the libvirt stream bridge of {box_dir} is not running and "
                              f"cannot be restarted: {BRIDGE_JSON} is unreadable ({exc})"
                              ) from None
        start_bridge(box_dir, *args)
        return True


def prune(conn: libvirt.virConnect, uri: str) -> list[str]:
    """Delete the pool's content volumes that nothing uses: no box volume's backing file, no
    disk, kernel or initrd of any domain on that daemon (ours or not); their names. An
    unfinished upload (no marker yet: another client's, maybe) is left alone.

    Raises:
        EngineError: the daemon refused or did not answer in time.
    """
    pool = RemotePool(uri, conn)
    if not pool.exists():
        return []
    names = pool.names()
    used: set[str] = set()
    for name in names:
        if name.startswith(BOX_PREFIX):
            vol = bounded("virStorageVolLookupByName", uri, pool.pool().storageVolLookupByName,
                          name)
            xml = ET.fromstring(bounded("virStorageVolGetXMLDesc", uri, vol.XMLDesc, 0))
            used.add(os.path.basename(xml.findtext("backingStore/path") or ""))
    for dom in bounded("virConnectListAllDomains", uri, conn.listAllDomains, 0):
        xml = ET.fromstring(bounded("virDomainGetXMLDesc", uri, dom.XMLDesc, 0))
        paths = [xml.findtext("os/kernel"), xml.findtext("os/initrd")]
        paths += [s.get("file") for s in xml.iterfind("devices/disk/source")]
        used.update(os.path.basename(p) for p in paths if p)
    gone = []
    for name in names:
        if (name.startswith(CONTENT_PREFIX) and not name.endswith(MARK)
                and name + MARK in names and name not in used):
            pool.delete(name + MARK)  # first: a crash in between leaves an unmarked volume
            pool.delete(name)
            gone.append(name)
    return gone
