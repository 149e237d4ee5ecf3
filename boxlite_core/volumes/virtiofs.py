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

Processes are recorded in BOXDIR/virtiofsd.json (pid + /proc start time), so :meth:`stop`
works from any process and never signals a recycled pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from .. import tools
from ..errors import ConfigError, EngineError, ToolMissingError
from ..models import Capability, HostShare, ShareSpec
from .base import VolumeSharer

STATE_FILE = "virtiofsd.json"
SOCKET_WAIT = 10.0
_MAX_SOCKET_PATH = 107

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


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


def _readonly_bind(source: bytes) -> None:
    """In the child before exec: private mount namespace, ``source`` bound read-only onto
    itself. Non-recursive on purpose: mounts below the share stay hidden, not writable."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    check(libc.mount(source, source, None, _MS_BIND, None), "bind mount")
    check(
        libc.mount(None, source, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None),
        "remount read-only",
    )


def _start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2 :].split()[19])


def _alive(pid: int, started: int | None) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = text[text.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class VirtiofsSharer(VolumeSharer):
    """virtio-fs through virtiofsd: fast, POSIX-faithful, needs a shared-memory guest RAM."""

    name = "virtiofs"
    capability = Capability.VIRTIOFS
    guest_fstype = "virtiofs"

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
        preexec = None
        readonly_mode = "flag" if info.readonly_flag else None
        if share.read_only and not info.readonly_flag:
            source = os.fsencode(share.host_path)
            preexec = functools.partial(_readonly_bind, source)
            readonly_mode = "ro-bind-mount"
        with open(log_path, "wb") as log, open(os.devnull, "rb") as devnull:
            proc = subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
                preexec_fn=preexec,
            )
        self._children[proc.pid] = proc
        record = {
            "tag": share.tag,
            "pid": proc.pid,
            "start_time": _start_time(proc.pid),
            "socket": str(socket),
            "log": str(log_path),
            "argv": argv,
            "read_only": share.read_only,
            "read_only_enforced_by": readonly_mode if share.read_only else None,
        }
        deadline = time.monotonic() + SOCKET_WAIT
        while not socket.exists():
            if proc.poll() is not None:
                raise EngineError(
                    f"virtiofsd for share {share.tag!r} ({share.host_path}) exited with "
                    f"{proc.returncode} before creating {socket}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise EngineError(
                    f"virtiofsd for share {share.tag!r} did not create {socket} within "
                    f"{SOCKET_WAIT:.0f}s:\n{_tail(log_path)}"
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
        live = [r for r in records if _alive(int(r["pid"]), r.get("start_time"))]
        for record in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(record["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for record in live:
            pid = int(record["pid"])
            while _alive(pid, record.get("start_time")):
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
            _reap(pid)
