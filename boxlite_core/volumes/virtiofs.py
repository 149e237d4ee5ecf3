"""virtiofs: one virtiofsd per share, speaking vhost-user on BOXDIR/virtiofs-TAG.sock.

Two virtiofsd implementations exist and take different flags, so the flavour is detected
from ``--help``:

* the C one shipped with QEMU ≤ 7.2 (Debian 12: /usr/lib/qemu/virtiofsd, package
  qemu-system-common): ``--socket-path=`` and ``-o source=,cache=,sandbox=``. It has **no
  read-only option**, so for a read-only share we start it in a private mount namespace where
  the shared directory is a read-only bind mount of itself: the kernel refuses writes with
  EROFS on the host side, whatever the guest does. Needs root (so does this virtiofsd).
* the Rust one (virtiofsd ≥ 1.x): ``--shared-dir``, ``--readonly``, ``--sandbox``, and
  ``--translate-uid/--translate-gid`` which we use for auto-idmap when it offers them.

**Nothing privileged crosses a share** (the guest is root in its VM and can replace our agent,
so every request virtiofsd serves is hostile). Every virtiofsd starts through
:mod:`.virtiofsd_launcher`, whose seccomp filter refuses setuid/setgid modes and device nodes
(``--no-privilege``); virtiofsd itself drops CAP_FSETID, CAP_MKNOD and CAP_SETFCAP
(``modcaps``): a write to an existing setuid file then clears the bit, as the kernel does for
an unprivileged writer, and the kernel refuses to set a ``security.capability`` xattr (a file
capability) without CAP_SETFCAP. Not an ``xattrmap`` too: QEMU 7.2's virtiofsd exits at start
when a rule refuses ``security.capability`` ("Failed to map security.capability"), and
renaming it (``prefix``) makes every chown fail with EBADF (it then removes the renamed xattr
through an O_PATH fd).

Auto-idmap = **squash** with the C virtiofsd (which has no id-translation option): for a user
volume (owner known) the daemon runs in a new **user namespace** that maps only ns id 0 to
the directory's owner (see :func:`idmap_lines`), and the launcher's ``--squash-ids`` makes its
per-request id switches and every chown succeed without effect. So every file the guest
writes, whatever guest id wrote it or chowned it, belongs to the directory's owner on the host;
host root is reachable only when the owner is root; device nodes cannot be made at all (the
kernel refuses mknod of devices in a user namespace). The owner's files show as root in the
guest, every other host id as the overflow id (65534). ns-root keeps DAC override only over
the owner's files (the kernel grants a namespace's capabilities on inodes whose ids it maps).

Rootfs shares (``merged``/``layers``: no owner recorded, the box's own tree with many owners)
keep guest ids as they are, but get the same no-privilege filter.

Processes are recorded in BOXDIR/virtiofsd.json (pid + /proc start time), so :meth:`stop`
works from any process and never signals a recycled pid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import signal
import socket as socketlib
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import attrs

from .. import tools
from ..errors import ConfigError, EngineError, ToolMissingError
from ..models import HostShare
from ..vmm.consolelog import start_pipe_writer, wait_gone
from ..vmm.procstat import alive, log_tail, reap, start_time
from ..vmm.spec import Capability, ShareSpec
from .base import VolumeSharer
from .virtiofsd_launcher import EXPOSED_SOURCE

STATE_FILE = "virtiofsd.json"
SOCKET_WAIT = 10.0
_MAX_SOCKET_PATH = 107

#: ids 0 .. 2**32-2 (2**32-1 is the invalid id -1 and can't be mapped)
_ID_COUNT = 4294967295
#: capabilities virtiofsd must not keep: FSETID (would keep setuid bits across a write and
#: allow a setgid bit for a foreign group), MKNOD (device nodes), SETFCAP (file capabilities)
MODCAPS = "-fsetid:-mknod:-setfcap"
_LAUNCHER = str(Path(__file__).with_name("virtiofsd_launcher.py"))


class DaemonRecord(TypedDict):
    """One virtiofsd as BOXDIR/virtiofsd.json records it (so any process can stop it)."""

    tag: str
    pid: int
    #: /proc start time (clock ticks since boot): never signal a recycled pid
    start_time: int | None
    socket: str
    log: str
    argv: list[str]
    read_only: bool
    #: "flag" (--readonly) | "ro-bind-mount" (C virtiofsd) | None (a writable share)
    read_only_enforced_by: str | None
    #: {"uid", "gid"} ns id 0 maps to (every guest id squashed to it), None: no user namespace
    idmap: dict[str, int] | None


@attrs.frozen
class VirtiofsdInfo:
    """Which virtiofsd is installed and what it can do."""

    path: str
    flavour: str  # "c" (QEMU's) or "rust"
    readonly_flag: bool  # Rust --readonly
    translate_ids: bool  # Rust --translate-uid/--translate-gid


@functools.cache
def detect_virtiofsd(path: str) -> VirtiofsdInfo:
    """Tell the C and Rust virtiofsd apart by their ``--help`` text."""
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"virtiofsd at {path} does not run ({exc}); reinstall it") from exc
    if "--shared-dir" in text:
        return VirtiofsdInfo(path, "rust", "--readonly" in text, "--translate-uid" in text)
    return VirtiofsdInfo(path, "c", False, False)


def virtiofsd_argv(
    info: VirtiofsdInfo,
    share: HostShare,
    socket: Path,
    *,
    euid: int = 0,
    listen_fd: int | None = None,
    source: str | None = None,
) -> list[str]:
    """The virtiofsd argv for one share (pure; tests compare it). ``listen_fd``: the C daemon
    gets its vhost-user socket already listening (``--fd=``) instead of a path: squashed, it is
    the volume's owner on the host and may neither create a socket in the root-only box
    directory nor take its lock file under /run/virtiofsd — and the socket stays root's.
    ``source``: where the daemon finds the share, when not at its host path (squashed: the
    launcher's :data:`~.virtiofsd_launcher.EXPOSED_SOURCE`)."""
    source = source or str(share.host_path)
    if info.flavour == "rust":
        argv = [
            info.path,
            f"--socket-path={socket}",
            f"--shared-dir={source}",
            "--cache=auto",
            "--xattr",
            "--sandbox=namespace" if euid == 0 else "--sandbox=none",
        ]
        if euid == 0:  # unprivileged it has no capabilities to drop
            argv.append(f"--modcaps={MODCAPS}")
        if share.read_only:
            argv.append("--readonly")
        if info.translate_ids and euid == 0 and share.uid is not None and share.gid is not None:
            # every guest uid/gid is written as the volume's owner on the host (auto-idmap)
            argv += [
                f"--translate-uid=squash-guest:0:{share.uid}:4294967295",
                f"--translate-gid=squash-guest:0:{share.gid}:4294967295",
            ]
        return argv
    # QEMU's C virtiofsd: one -o per option (values with ',' would otherwise split)
    return [
        info.path,
        f"--fd={listen_fd}" if listen_fd is not None else f"--socket-path={socket}",
        "-o", f"source={source}",
        "-o", "cache=auto",
        "-o", "sandbox=namespace",
        "-o", "xattr",
        "-o", f"modcaps={MODCAPS}",
    ]


def idmap_lines(owner: int) -> str:
    """uid_map/gid_map text mapping only ns id 0 to host id ``owner`` (squash): the daemon is
    ns-root, so whatever it creates belongs to ``owner``, and no other host id, root above
    all, exists in its namespace. One line, so any kernel takes it."""
    if not 0 <= owner < _ID_COUNT:
        raise ConfigError(f"volume owner id {owner} cannot be mapped; chown the directory")
    return f"0 {owner} 1\n"


def needs_idmap(info: VirtiofsdInfo, share: HostShare, euid: int) -> bool:
    """Run the daemon squashed in a user namespace? Only the C virtiofsd as root (the Rust one
    translates ids itself; without root we could not write arbitrary maps), and only for a
    share whose owner is known (a user volume) — a root-owned one too: the namespace confines
    the daemon's capabilities (no device nodes) and keeps its ids fixed."""
    return info.flavour == "c" and euid == 0 and share.uid is not None and share.gid is not None


def launcher_argv(
    argv: list[str],
    read_only_source: str | os.PathLike[str] | None,
    idmap: tuple[int, int] | None,
    expose: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Wrap virtiofsd's argv in :mod:`.virtiofsd_launcher`: always its no-privilege seccomp
    filter, plus a read-only bind and a squashing user namespace when asked. A separate
    interpreter, not a ``preexec_fn``: see that module for the multithreaded-gRPC failure this
    avoids."""
    wrapped = [sys.executable, "-I", _LAUNCHER, "--no-privilege"]
    if read_only_source is not None:
        wrapped += ["--read-only-bind", str(read_only_source)]
    if expose is not None:
        wrapped += ["--expose", str(expose)]
    if idmap is not None:
        wrapped += [
            "--uid-map", idmap_lines(idmap[0]), "--gid-map", idmap_lines(idmap[1]),
            "--squash-ids",
        ]
    return [*wrapped, "--", *argv]


#: accept/accept4 call numbers per machine: a daemon blocked in one of them is ready
_ACCEPT_CALLS = {"x86_64": {43, 288}, "aarch64": {202, 242}}


def _accepting(pid: int) -> bool:
    """Is ``pid``'s main thread blocked in accept (virtiofsd waiting for QEMU)? Read from
    /proc/PID/syscall; on a machine whose numbers we do not know, ready once it runs
    virtiofsd (no longer the launcher)."""
    calls = _ACCEPT_CALLS.get(platform.machine())
    try:
        if calls is None:
            return "virtiofsd" in os.readlink(f"/proc/{pid}/exe")
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return first.lstrip("-").isdigit() and int(first) in calls


class VirtiofsSharer(VolumeSharer):
    """virtio-fs through virtiofsd: fast, POSIX-faithful, needs a shared-memory guest RAM."""

    name = "virtiofs"
    capability = Capability.VIRTIOFS
    guest_fstype = "virtiofs"
    idmap = True

    def __init__(self) -> None:
        # Popen objects of the daemons we started, so we can reap them (no zombies)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def info(self) -> VirtiofsdInfo:
        path = tools.find_tool("virtiofsd")
        if path is None:
            raise ToolMissingError(
                "virtiofsd", "qemu-system-common (Debian 12) or virtiofsd (Debian 13+)",
                "share host directories with virtiofs",
            )
        return detect_virtiofsd(path)

    def check(self) -> None:
        info = self.info()
        if info.flavour == "c" and os.geteuid() != 0:
            raise ConfigError(
                f"virtiofsd at {info.path} is QEMU's C virtiofsd, which needs root; run boxlite "
                "as root, install the Rust virtiofsd, or use the 9p sharer (--sharer 9p)"
            )

    def start(self, shares: Sequence[HostShare], box_dir: Path) -> tuple[ShareSpec, ...]:
        self.check()
        info = self.info()
        box_dir = Path(box_dir)
        box_dir.mkdir(parents=True, exist_ok=True)
        self.stop(box_dir)  # leftovers of an earlier start of this box
        records: list[DaemonRecord] = []
        specs: list[ShareSpec] = []
        try:
            for share in shares:
                record = self._start_one(info, share, box_dir)
                records.append(record)
                self._write_state(box_dir, records)
                specs.append(
                    ShareSpec(
                        tag=share.tag,
                        host_path=Path(share.host_path),
                        kind=self.name,
                        read_only=share.read_only,
                        socket=Path(record["socket"]),
                        uid=share.uid,
                        gid=share.gid,
                    )
                )
        except BaseException:
            self.stop(box_dir)
            raise
        return tuple(specs)

    def _start_one(self, info: VirtiofsdInfo, share: HostShare, box_dir: Path) -> DaemonRecord:
        socket = box_dir / f"virtiofs-{share.tag}.sock"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"virtiofs socket path {socket} is longer than {_MAX_SOCKET_PATH} bytes; use a "
                "shorter BOXLITE_HOME"
            )
        socket.unlink(missing_ok=True)
        log_path = box_dir / f"virtiofsd-{share.tag}.log"
        listener = None
        if info.flavour == "c":
            # we bind and listen as root; the daemon inherits the listening socket (--fd)
            listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            try:
                listener.bind(str(socket))
                os.chmod(socket, 0o600)
                listener.listen(1)
            except OSError as exc:
                listener.close()
                raise EngineError(
                    f"cannot listen on {socket} for share {share.tag!r}: {exc}; check that the "
                    "box directory is writable"
                ) from exc
        readonly_mode = "flag" if info.readonly_flag else None
        ro_source = None
        if share.read_only and not info.readonly_flag:
            ro_source = share.host_path
            readonly_mode = "ro-bind-mount"
        idmap = None
        if needs_idmap(info, share, os.geteuid()):
            assert share.uid is not None and share.gid is not None
            idmap = (share.uid, share.gid)
        argv = virtiofsd_argv(
            info, share, socket, euid=os.geteuid(),
            listen_fd=listener.fileno() if listener is not None else None,
            source=EXPOSED_SOURCE if idmap else None,
        )
        try:
            # through a capped, rotating writer: a guest root grows this log at will (each
            # virtio device reset it forces logs ~400 bytes; ~200 KB/s measured)
            log_w, log_writer = start_pipe_writer(log_path)
            with os.fdopen(log_w, "wb") as log, open(os.devnull, "rb") as devnull:
                proc = subprocess.Popen(
                    launcher_argv(argv, ro_source, idmap, share.host_path if idmap else None),
                    stdin=devnull,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    umask=0o077,
                    pass_fds=(listener.fileno(),) if listener is not None else (),
                )
        finally:
            # only the daemon may hold it: if it dies, QEMU's connect is refused at once
            # instead of waiting in a backlog nobody accepts from
            if listener is not None:
                listener.close()
        self._children[proc.pid] = proc
        record: DaemonRecord = {
            "tag": share.tag,
            "pid": proc.pid,
            "start_time": start_time(proc.pid),
            "socket": str(socket),
            "log": str(log_path),
            "argv": argv,
            "read_only": share.read_only,
            "read_only_enforced_by": readonly_mode if share.read_only else None,
            # ns id 0 -> the owner's, every guest id squashed to it (None: no userns)
            "idmap": {"uid": idmap[0], "gid": idmap[1]} if idmap else None,
        }
        what = "start accepting on" if listener is not None else "create"
        deadline = time.monotonic() + SOCKET_WAIT
        while not (_accepting(proc.pid) if listener is not None else socket.exists()):
            if proc.poll() is not None:
                wait_gone(log_writer, 2.0)  # it copies the daemon's last lines into the log
                raise EngineError(
                    f"virtiofsd for share {share.tag!r} ({share.host_path}) exited with "
                    f"{proc.returncode} before it could {what} {socket}:\n"
                    f"{log_tail(log_path, 15)}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise EngineError(
                    f"virtiofsd for share {share.tag!r} did not {what} {socket} within "
                    f"{SOCKET_WAIT:.0f}s:\n{log_tail(log_path, 15)}"
                )
            time.sleep(0.01)
        os.chmod(socket, 0o600)
        return record

    @staticmethod
    def _write_state(box_dir: Path, records: list[DaemonRecord]) -> None:
        path = box_dir / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"processes": records}, indent=2) + "\n")
        os.replace(tmp, path)

    @staticmethod
    def read_state(box_dir: Path) -> list[DaemonRecord]:
        try:
            return list(json.loads((Path(box_dir) / STATE_FILE).read_text())["processes"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def stop(self, box_dir: Path) -> None:
        box_dir = Path(box_dir)
        for pid in list(self._children):  # collect daemons another process already stopped
            self._reap_child(pid)
        records = self.read_state(box_dir)
        live = [r for r in records if alive(int(r["pid"]), r.get("start_time"))]
        for record in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(record["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for record in live:
            pid = int(record["pid"])
            while alive(pid, record.get("start_time")):
                self._reap_child(pid)
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(0.05)
                    self._reap_child(pid)
                    break
                time.sleep(0.02)
        for record in records:
            self._reap_child(int(record["pid"]))
            Path(record["socket"]).unlink(missing_ok=True)
        (box_dir / STATE_FILE).unlink(missing_ok=True)

    def _reap_child(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None:
            if proc.poll() is not None:
                del self._children[pid]
        else:
            reap(pid)
