"""The ``qemu`` VMM backend: probe the host once, plan argv purely, launch and re-attach.

Launch model: QEMU is started as our child in its own session (``start_new_session``), stdio
on files, so it outlives the host process (``boxlite run -d``) and never gets the terminal's
Ctrl-C. We keep the Popen while we live (exact exit status, no zombies); every other process
finds it through BOXDIR/vm.json (pid + /proc start time).

Snapshots (``Capability.SNAPSHOT``) are QEMU migration to and from a file: the handle's
``save_state`` writes it; a plan with ``spec.restore_from`` starts the same argv with
``-incoming defer`` and :meth:`QemuBackend.launch` feeds the file in over QMP, then ``cont``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import attrs

from boxlite_core import tools
from boxlite_core.errors import (
    BoxliteError,
    ConfigError,
    EngineError,
    ToolMissingError,
    UnsupportedError,
)
from boxlite_core.vmm.base import LaunchPlan, VmmBackend
from boxlite_core.vmm.consolelog import (
    WRITER_LOG,
    ensure_writer,
    start_writer,
    stop_writer,
    wait_writer,
    writer_running,
    writer_tail,
)
from boxlite_core.vmm.procstat import log_tail, start_time
from boxlite_core.vmm.spec import Capability, ProbeResult, VmSpec

from .accel import AccelChoice, host_accel
from .argv import QEMU_BINARY, QemuHost, build_argv
from .handle import (
    MIGRATION_FD,
    QemuHandle,
    migration_bound,
    migration_finished,
    write_state,
)
from .listeners import bound, connect_now, pass_listeners
from .memimage import IGNORE_SHARED, saved_memory_image, with_memory_image
from .qmp import Poll, QmpError, QmpStep, qmp_command, qmp_poll

log = logging.getLogger(__name__)

QMP_READY_TIMEOUT = 30.0
_FIX_PACKAGE = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@attrs.frozen
class HostFacts:
    """Probed once per backend instance: what plan() and probe() report."""

    arch: str
    binary: str | None
    qemu_img: str | None
    version: str
    sandbox: bool
    accel: AccelChoice | None
    accel_error: str = ""


#: successful probes by (binary, size, mtime in ns): a QEMU upgraded in place is probed anew
_VERSIONS: dict[tuple[str, int, int], tuple[str, bool]] = {}


def _binary_id(binary: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of the file ``binary`` names; None if it cannot be read."""
    try:
        st = os.stat(binary)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _qemu_version(binary: str) -> tuple[str, bool] | None:
    """(version, supports -sandbox); None if the probe failed. QEMU built without seccomp
    omits -sandbox from -help.

    Only a successful probe is remembered: a failed one (e.g. ``-help`` timing out on a
    loaded host) is tried again next time, instead of turning -sandbox off for every later
    VM of this process.
    """
    ident = _binary_id(binary)
    key = (binary, *ident) if ident is not None else None
    if key is not None and key in _VERSIONS:
        return _VERSIONS[key]
    try:
        # one run: -help starts with the same "QEMU emulator version X" line as --version
        helptext = subprocess.run([binary, "-help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    first = helptext.stdout.partition("\n")[0]
    match = re.search(r"version (\S+)", first)
    found = (match.group(1) if match else first.strip()), "-sandbox" in helptext.stdout
    if key is not None:
        _VERSIONS[key] = found
    return found


class QemuBackend(VmmBackend):
    """QEMU (qemu-system-<hostarch>) with KVM/HVF when it really works, else TCG."""

    name = "qemu"

    def __init__(self, host: QemuHost | None = None) -> None:
        """``host`` pins the planning facts (tests, or a vendor that knows better);
        by default they are probed on first use."""
        self._pinned = host
        self._facts: HostFacts | None = None

    # -- host facts ----------------------------------------------------------------------

    @property
    def facts(self) -> HostFacts:
        """The host, probed on first use and kept, unless QEMU's version probe failed (then
        version "unknown", no -sandbox, for this call only: probed again next time, so one
        slow ``-help`` under load does not turn -sandbox off for the process's life)."""
        if self._facts is not None:
            return self._facts
        arch = host_arch()
        binary = tools.find_tool(QEMU_BINARY.get(arch, f"qemu-system-{arch}"))
        probed = _qemu_version(binary) if binary else ("", False)
        version, sandbox = probed or ("unknown", False)
        accel: AccelChoice | None = None
        accel_error = ""
        try:
            accel = host_accel()
        except ConfigError as exc:
            accel_error = str(exc)
        facts = HostFacts(arch, binary, tools.find_tool("qemu-img"), version, sandbox, accel,
                          accel_error)
        if probed is not None:
            self._facts = facts
        return facts

    def host(self) -> QemuHost:
        """The planning facts: pinned, or probed (raises if QEMU is missing)."""
        if self._pinned is not None:
            return self._pinned
        facts = self.facts
        if facts.binary is None:
            raise ToolMissingError(
                QEMU_BINARY.get(facts.arch, f"qemu-system-{facts.arch}"),
                _FIX_PACKAGE.get(facts.arch),
                "run boxes with the qemu backend",
            )
        if facts.accel is None:
            raise ConfigError(facts.accel_error)
        return QemuHost(
            binary=facts.binary,
            arch=facts.arch,
            accel=facts.accel.accel,
            sandbox=facts.sandbox,
            euid=os.geteuid(),
        )

    # -- VmmBackend ----------------------------------------------------------------------------

    def capabilities(self) -> frozenset[Capability]:
        caps = {
            Capability.NINEP,
            Capability.QCOW2,
            Capability.RAW,
            Capability.VIRTIO_SERIAL,
            Capability.PAUSE,
            Capability.SNAPSHOT,
            Capability.ATTACH,
            Capability.NETWORK,
            Capability.TCG,
        }
        if tools.find_tool("virtiofsd"):
            caps.add(Capability.VIRTIOFS)
        accel = self._pinned.accel if self._pinned else (
            self.facts.accel.accel if self.facts.accel else "tcg"
        )
        if accel == "kvm":
            caps.add(Capability.KVM)
        elif accel == "hvf":
            caps.add(Capability.HVF)
        return frozenset(caps)

    def probe(self) -> ProbeResult:
        facts = self.facts
        qemu_name = QEMU_BINARY.get(facts.arch, f"qemu-system-{facts.arch}")
        package = _FIX_PACKAGE.get(facts.arch, "qemu-system")
        if facts.binary is None:
            return ProbeResult(False, reason=f"{qemu_name} not found",
                               fix=f"apt-get install {package}")
        if facts.qemu_img is None:
            return ProbeResult(False, reason="qemu-img not found", fix="apt-get install qemu-utils")
        if facts.accel is None:
            return ProbeResult(False, reason=facts.accel_error,
                               fix="set BOXLITE_ACCEL to kvm, tcg or hvf, or unset it")
        details = {
            "qemu": facts.binary,
            "qemu_version": facts.version,
            "qemu_img": facts.qemu_img,
            "accel": facts.accel.accel,
            "accel_reason": facts.accel.reason,
            "sandbox": facts.sandbox,
            "virtiofsd": tools.find_tool("virtiofsd"),
        }
        if facts.accel.notice:
            details["accel_notice"] = facts.accel.notice
        if not facts.sandbox:
            details["sandbox_notice"] = "this QEMU has no -sandbox (seccomp); running without it"
        return ProbeResult(True, details=details)

    def plan(self, spec: VmSpec) -> LaunchPlan:
        """The QEMU argv and the facts launch/attach/save_state need (sockets, log, the
        ``drives`` map of disk serial → drive id). With ``spec.restore_from``: the same argv
        plus ``-incoming defer``, and ``restore_state``, the stream file launch loads.

        Raises:
            UnsupportedError: ``spec.restore_from`` with a virtiofs share (see
                :meth:`snapshot_compat`).
            ConfigError, ToolMissingError: as ``VmmBackend.plan``.
        """
        if spec.restore_from is not None:
            self._refuse_unmigratable(spec)
        argv, facts = build_argv(spec, self.host())
        image = saved_memory_image(Path(spec.restore_from)) if spec.restore_from else None
        if image is not None:
            # the RAM mapped copy-on-write from the image; the stream holds devices only
            argv = with_memory_image(argv, str(image["ram_id"]), spec.memory_mib,
                                     Path(spec.restore_from) / str(image["ram_image"]),
                                     shared=False)
            facts["restore_state"] = str(Path(spec.restore_from) / str(image["device_state"]))
            facts["restore_capabilities"] = [IGNORE_SHARED]
        return LaunchPlan(backend=self.name, spec=spec, data={"argv": argv, **facts})

    def snapshot_compat(self, spec: VmSpec) -> str:
        """``qemu=<binary> <version> (<bytes> bytes, mtime <ns>); accel=<-accel value>;
        machine=<-machine value>; cpu=<-cpu value, empty for QEMU's default>; sandbox=on|off``:
        what beyond the device layout a saved state depends on (the CPU model: the guest's
        CPUID must not change under a running kernel). The binary's size and mtime (as
        libvirt's) make a QEMU upgraded in place under the same path and version string (a
        distro rebuild) a new key.

        Raises:
            UnsupportedError: a virtiofs share (QEMU < 8.2 cannot migrate vhost-user-fs).
            ConfigError, ToolMissingError: as :meth:`plan` (the spec or host is unusable).
        """
        self._refuse_unmigratable(spec)
        host = self.host()
        argv, _facts = build_argv(attrs.evolve(spec, restore_from=None), host)
        version, _sandbox = _qemu_version(host.binary) or ("unknown", False)
        ident = _binary_id(host.binary)
        binary = f"{ident[0]} bytes, mtime {ident[1]}" if ident else "not readable here"

        def value(option: str) -> str:
            return argv[argv.index(option) + 1] if option in argv else ""

        return (
            f"qemu={host.binary} {version} ({binary}); accel={value('-accel') or host.accel}; "
            f"machine={value('-machine')}; cpu={value('-cpu')}; "
            f"sandbox={'on' if host.sandbox else 'off'}"
        )

    def _refuse_unmigratable(self, spec: VmSpec) -> None:
        for share in spec.shares:
            if share.kind == "virtiofs":
                version = self.facts.version or "unknown"
                raise UnsupportedError(
                    f"share {share.tag!r} is virtiofs: QEMU's vhost-user-fs device cannot be "
                    f"migrated by QEMU < 8.2 (this one is {version}), so the qemu backend "
                    "cannot save or restore this VM's state; use 9p for its volumes, or boot "
                    "it cold"
                )

    def launch(self, plan: LaunchPlan) -> QemuHandle:
        """Start QEMU as described in ``plan``; for a restore plan, also load the saved state
        and let the VM run (see :meth:`_restore`). Raises as ``VmmBackend.launch``; a restore
        plan whose state file cannot be read fails with EngineError before QEMU starts."""
        if plan.backend != self.name:
            raise ConfigError(f"plan is for backend {plan.backend!r}, not {self.name!r}")
        restore = plan.data.get("restore_state")
        state_fd = self._open_state(Path(str(restore))) if restore else None
        try:
            return self._start(plan, state_fd)
        finally:
            if state_fd is not None:
                os.close(state_fd)

    @staticmethod
    def _open_state(state: Path) -> int:
        """The saved state, opened read-only before QEMU starts (so a missing file fails
        with nothing started)."""
        try:
            return os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise EngineError(
                f"cannot restore the VM from {state.parent}: its state file {state} cannot "
                f"be read ({exc.strerror or exc}); save the state again, or boot without it"
            ) from None

    def _start(self, plan: LaunchPlan, state_fd: int | None) -> QemuHandle:
        spec = plan.spec
        box = Path(spec.box_dir)
        box.mkdir(parents=True, exist_ok=True)
        qmp_socket = Path(plan.data["qmp_socket"])
        log_path = Path(plan.data["log"])
        console = plan.data.get("console_socket")
        console_socket = Path(console) if console else None
        for stale in (qmp_socket, Path(spec.agent.socket), Path(plan.data["pidfile"]),
                      console_socket):
            if stale is not None:
                stale.unlink(missing_ok=True)
        listen = [Path(str(p)) for p in plan.data.get("listen") or []]
        with bound(listen) as socks:
            argv = pass_listeners([str(a) for a in plan.data["argv"]],
                                  {path: sock.fileno() for path, sock in socks.items()})
            connected = (connect_now(console_socket)
                         if console_socket is not None and str(console_socket) in socks
                         else None)
            try:
                popen = self._spawn(plan, argv, console_socket, connected,
                                    [sock.fileno() for sock in socks.values()])
            finally:
                if connected is not None:
                    connected.close()
        handle = QemuHandle(
            box, popen.pid, start_time(popen.pid), qmp_socket, Path(spec.console_log),
            log_path, popen,
            drives=dict(plan.data.get("drives") or {}),
            shares={s.tag: str(s.host_path) for s in spec.shares},
        )
        restored: dict[str, float | str] = {}
        try:
            self._wait_qmp(handle, popen)
            if state_fd is not None:
                restored = self._restore(
                    handle, popen, state_fd, Path(str(plan.data["restore_state"])),
                    [str(c) for c in plan.data.get("restore_capabilities") or []])
        except BaseException:
            handle.kill()
            stop_writer(box)
            raise
        for sock in (qmp_socket, Path(spec.agent.socket), console_socket):
            if sock is not None and sock.exists():
                os.chmod(sock, 0o600)
        write_state(box / "vm.json", {
            **handle.state(),
            "backend": self.name,
            "argv": argv,
            "accel": plan.data.get("accel"),
            "machine": plan.data.get("machine"),
            "launched_at": time.time(),
            **restored,
        })
        return handle

    def _spawn(self, plan: LaunchPlan, argv: list[str], console_socket: Path | None,
               connected: socket.socket | None, pass_fds: list[int]) -> subprocess.Popen[bytes]:
        """Start the console writer (``connected``: its connection to the console socket,
        made already) and QEMU, which inherits ``pass_fds`` (its listening sockets)."""
        spec = plan.spec
        box = Path(spec.box_dir)
        log_path = Path(plan.data["log"])
        stderr_w: int | None = None
        if console_socket is not None:
            # first: QEMU waits (wait=on) for the writer before it runs the guest; with the
            # socket bound by us the writer's connection is made already, so it never waits
            # on the writer's start-up. The same writer caps QEMU's stderr (qemu.log): a
            # guest can provoke QEMU's error lines
            stop_writer(box)  # a writer left from an earlier boot of this box
            stderr_r, stderr_w = os.pipe()
            try:
                start_writer(
                    box, console_socket, Path(spec.console_log),
                    int(plan.data.get("console_log_max_bytes") or spec.console_log_max_bytes),
                    stdin_fd=stderr_r, stdin_out=log_path, connected=connected,
                )
            except BaseException:
                os.close(stderr_w)
                raise
            finally:
                os.close(stderr_r)
        log_target = (
            open(log_path, "wb")  # noqa: SIM115 - closed by the with below
            if stderr_w is None else os.fdopen(stderr_w, "wb")
        )
        with log_target as log, open(os.devnull, "rb") as devnull:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=devnull,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # survives our exit and our terminal's signals
                    # 022, not 077: the box dir (0700) already keeps QEMU's sockets and
                    # pidfile private; this umask also shapes what a guest creates through
                    # a writable 9p share (mapped-xattr fmode/dmode), which the volume's
                    # owner must be able to read (0644/0755, never executable or setuid)
                    umask=0o022,
                    close_fds=True,
                    pass_fds=pass_fds,
                )
            except FileNotFoundError as exc:
                stop_writer(box)
                raise ToolMissingError(argv[0], _FIX_PACKAGE.get(host_arch())) from exc
        return popen

    def _restore(
        self, handle: QemuHandle, popen: subprocess.Popen[bytes], state_fd: int, state: Path,
        capabilities: list[str],
    ) -> dict[str, float | str]:
        """Feed the saved state into the waiting QEMU (``-incoming defer``), wait until it is
        loaded, then ``cont`` (the VM was paused when saved, so it stays paused after
        loading). ``capabilities``: migration capabilities set first (``x-ignore-shared``
        for a memory image's device state). What vm.json records about it: the file and the
        seconds it took."""
        started = time.monotonic()
        size = os.fstat(state_fd).st_size
        what = f"loading the saved VM state {state} into QEMU (pid {popen.pid})"

        def gone() -> EngineError:
            return EngineError(
                f"{what} failed: " + self._death_message(handle, popen.wait())
            )

        # one QMP session: hand over the fd, start loading, poll until loaded, then cont
        # (the VM was paused when saved, so it stays paused after loading)
        # a memory image's device state was saved with x-ignore-shared: set it here too, and
        # clear it once loaded: QEMU announces its capabilities in every stream it sends, so
        # a later snapshot of this VM would demand x-ignore-shared of its restores (measured:
        # "Capability x-ignore-shared is off, but received capability is on")
        def setting(state: bool) -> QmpStep:
            return ("migrate-set-capabilities",
                    {"capabilities": [{"capability": name, "state": state}
                                      for name in capabilities]})

        poll = Poll("query-migrate", functools.partial(migration_finished, what),
                    migration_bound(size),
                    f"{what} (QMP query-migrate on {handle.qmp_socket})",
                    then=((setting(False),) if capabilities else ()) + (("cont", None),))
        steps: list[QmpStep] = [setting(True)] if capabilities else []
        steps += [("getfd", {"fdname": MIGRATION_FD}),
                  ("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})]
        try:
            qmp_poll(handle.qmp_socket, steps, poll, fds={len(steps) - 2: state_fd},
                     timeout=10.0)
        except QmpError as exc:
            if not handle.still_running(2.0):
                raise gone() from None
            raise EngineError(
                f"{what} failed: {exc}\n--- QEMU stderr ---\n"
                f"{log_tail(handle.log or Path(os.devnull))}"
            ) from exc
        except EngineError:
            if not handle.still_running(2.0):
                raise gone() from None
            raise
        return {"restored_from": str(state),
                "restore_seconds": round(time.monotonic() - started, 3)}

    def _wait_qmp(self, handle: QemuHandle, popen: subprocess.Popen[bytes]) -> None:
        """Until QMP answers: QEMU has parsed its argv, opened every device and socket."""
        deadline = time.monotonic() + QMP_READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise EngineError(self._death_message(handle, popen.returncode))
            if handle.qmp_socket.exists():
                try:
                    qmp_command(handle.qmp_socket, "query-status", timeout=2.0)
                    return
                except QmpError as exc:
                    last = str(exc)
            time.sleep(0.02)
        raise EngineError(
            f"QEMU (pid {popen.pid}) did not open its QMP socket {handle.qmp_socket} within "
            f"{QMP_READY_TIMEOUT:.0f}s ({last or 'no socket'}); QEMU log:\n"
            + log_tail(handle.log or Path(os.devnull))
            # QEMU waits for the console writer (wait=on) before QMP: say if it is the culprit
            + ("\nconsole log writer not running: " + writer_tail(handle.box_dir)
               if (handle.box_dir / WRITER_LOG).exists() and not writer_running(handle.box_dir)
               else "")
        )

    @staticmethod
    def _death_message(handle: QemuHandle, returncode: int) -> str:
        wait_writer(handle.box_dir, 2.0)  # it copies QEMU's last stderr lines into the log
        log = log_tail(handle.log) if handle.log else ""
        console = handle.console_tail()
        msg = f"QEMU exited during start-up with status {returncode}"
        if log:
            msg += f"\n--- QEMU stderr ---\n{log}"
        if console:
            msg += f"\n--- guest console (last lines) ---\n{console}"
        return msg

    def attach(self, box_dir: Path) -> QemuHandle | None:
        state_file = Path(box_dir) / "vm.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return None
        if state.get("backend", self.name) != self.name or "pid" not in state:
            return None
        handle = QemuHandle.from_state(Path(box_dir), state)
        if not handle.is_running():
            return None
        try:
            ensure_writer(Path(box_dir))  # a console writer that died: QEMU reconnects it
        except BoxliteError as exc:
            log.warning("box dir %s: could not restart the console log writer: %s", box_dir, exc)
        return handle
