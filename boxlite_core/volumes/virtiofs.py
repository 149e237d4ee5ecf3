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

Auto-idmap with the C virtiofsd (which has no id-translation option): when the host directory
is not owned by root, the daemon runs in a new **user namespace** whose uid/gid maps swap 0
and the owner and keep every other id (see :func:`idmap_lines`). virtiofsd creates files with
the guest caller's ids (setfsuid/setfsgid), so guest root's files land on the host as the
directory's owner, the owner's files appear to the guest as root, and the other guest ids keep
their numbers. The whole id range stays mapped, so ns-root keeps DAC override on every file,
as the daemon had before. A root-owned directory keeps the plain path (no namespace).

Processes are recorded in BOXDIR/virtiofsd.json (pid + /proc start time), so :meth:`stop`
works from any process and never signals a recycled pid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from .. import tools
from ..errors import ConfigError, EngineError, ToolMissingError
from ..models import Capability, HostShare, ShareSpec
from ..vmm.procstat import alive, log_tail, reap, start_time
from .base import VolumeSharer

STATE_FILE = "virtiofsd.json"
SOCKET_WAIT = 10.0
_MAX_SOCKET_PATH = 107

#: ids 0 .. 2**32-2 (2**32-1 is the invalid id -1 and can't be mapped)
_ID_COUNT = 4294967295
_LAUNCHER = str(Path(__file__).with_name("virtiofsd_launcher.py"))


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
    info: VirtiofsdInfo, share: HostShare, socket: Path, *, euid: int = 0
) -> list[str]:
    """The virtiofsd argv for one share (pure; tests compare it)."""
    source = str(share.host_path)
    if info.flavour == "rust":
        argv = [
            info.path,
            f"--socket-path={socket}",
            f"--shared-dir={source}",
            "--cache=auto",
            "--xattr",
            "--sandbox=namespace" if euid == 0 else "--sandbox=none",
        ]
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
        f"--socket-path={socket}",
        "-o", f"source={source}",
        "-o", "cache=auto",
        "-o", "sandbox=namespace",
        "-o", "xattr",
    ]


def idmap_lines(owner: int) -> str:
    """uid_map/gid_map text that swaps ns id 0 and host id ``owner`` and maps every other id
    to itself, so guest root writes as ``owner`` while guest uid 1000 stays 1000. Covers the
    whole id range (not just 0..65535): an unmapped host owner would show up as the overflow
    id and would escape ns-root's DAC override, which the daemon has today as real root."""
    if not 0 <= owner < _ID_COUNT:
        raise ConfigError(f"volume owner id {owner} cannot be mapped; chown the directory")
    if owner == 0:
        return f"0 0 {_ID_COUNT}\n"
    lines = [f"0 {owner} 1"]
    if owner > 1:
        lines.append(f"1 1 {owner - 1}")
    lines.append(f"{owner} 0 1")
    if owner + 1 < _ID_COUNT:
        lines.append(f"{owner + 1} {owner + 1} {_ID_COUNT - owner - 1}")
    return "\n".join(lines) + "\n"


def needs_idmap(info: VirtiofsdInfo, share: HostShare, euid: int) -> bool:
    """Run the daemon in an id-mapped user namespace? Only the C virtiofsd as root (the Rust
    one translates ids itself; without root we could not write arbitrary maps), and only when
    the directory is not root's: then today's path already writes as the owner."""
    if info.flavour != "c" or euid != 0 or share.uid is None or share.gid is None:
        return False
    return (share.uid, share.gid) != (0, 0)


def launcher_argv(
    argv: list[str], read_only_source: str | None, idmap: tuple[int, int] | None
) -> list[str]:
    """Wrap virtiofsd's argv in :mod:`.virtiofsd_launcher` when it needs a read-only bind or
    an id-mapped user namespace. A separate interpreter, not a ``preexec_fn``: see that
    module for the multithreaded-gRPC failure this avoids."""
    if read_only_source is None and idmap is None:
        return argv
    wrapped = [sys.executable, "-I", _LAUNCHER]
    if read_only_source is not None:
        wrapped += ["--read-only-bind", read_only_source]
    if idmap is not None:
        wrapped += ["--uid-map", idmap_lines(idmap[0]), "--gid-map", idmap_lines(idmap[1])]
    return [*wrapped, "--", *argv]


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
        records: list[dict[str, Any]] = []
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

    def _start_one(self, info: VirtiofsdInfo, share: HostShare, box_dir: Path) -> dict[str, Any]:
        socket = box_dir / f"virtiofs-{share.tag}.sock"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"virtiofs socket path {socket} is longer than {_MAX_SOCKET_PATH} bytes; use a "
                "shorter BOXLITE_HOME"
            )
        socket.unlink(missing_ok=True)
        log_path = box_dir / f"virtiofsd-{share.tag}.log"
        argv = virtiofsd_argv(info, share, socket, euid=os.geteuid())
        readonly_mode = "flag" if info.readonly_flag else None
        ro_source = None
        if share.read_only and not info.readonly_flag:
            ro_source = share.host_path
            readonly_mode = "ro-bind-mount"
        idmap = None
        if needs_idmap(info, share, os.geteuid()):
            assert share.uid is not None and share.gid is not None
            idmap = (share.uid, share.gid)
        with open(log_path, "wb") as log, open(os.devnull, "rb") as devnull:
            proc = subprocess.Popen(
                launcher_argv(argv, ro_source, idmap),
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
        self._children[proc.pid] = proc
        record = {
            "tag": share.tag,
            "pid": proc.pid,
            "start_time": start_time(proc.pid),
            "socket": str(socket),
            "log": str(log_path),
            "argv": argv,
            "read_only": share.read_only,
            "read_only_enforced_by": readonly_mode if share.read_only else None,
            # guest ids 0 <-> the owner's, in virtiofsd's user namespace (None: no userns)
            "idmap": {"uid": idmap[0], "gid": idmap[1]} if idmap else None,
        }
        deadline = time.monotonic() + SOCKET_WAIT
        while not socket.exists():
            if proc.poll() is not None:
                raise EngineError(
                    f"virtiofsd for share {share.tag!r} ({share.host_path}) exited with "
                    f"{proc.returncode} before creating {socket}:\n{log_tail(log_path, 15)}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise EngineError(
                    f"virtiofsd for share {share.tag!r} did not create {socket} within "
                    f"{SOCKET_WAIT:.0f}s:\n{log_tail(log_path, 15)}"
                )
            time.sleep(0.01)
        os.chmod(socket, 0o600)
        return record

    @staticmethod
    def _write_state(box_dir: Path, records: list[dict[str, Any]]) -> None:
        path = box_dir / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"processes": records}, indent=2) + "\n")
        os.replace(tmp, path)

    @staticmethod
    def read_state(box_dir: Path) -> list[dict[str, Any]]:
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
