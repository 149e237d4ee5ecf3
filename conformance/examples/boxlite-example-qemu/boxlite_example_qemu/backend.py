"""ExampleQemuBackend: a VmSpec becomes one QEMU command line; the VM is that one process.

What the guest kit needs, and where each piece comes from (the guide's "Your first boot"):

* boot: ``spec.kernel`` + ``spec.initrd``, and ``spec.cmdline`` passed verbatim;
* disks: every ``spec.disks`` entry as virtio-blk with its ``serial`` (the guest's /init finds
  its read-only root image by serial; the box's rootfs disk, if any, likewise);
* agent: a virtio-serial port named ``spec.agent.port_name`` on a unix socket at
  ``spec.agent.socket`` that QEMU serves and the core dials;
* console: the guest's serial console (ttyS0) on a socket that the core's capped writer
  copies into ``spec.console_log`` (the guest may flood it: never give QEMU a plain file);
* shares: 9p with ``mount_tag = share.tag``; virtiofs through the sharer's vhost-user socket
  ``share.socket``, which needs guest RAM to be shareable memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
from pathlib import Path

from boxlite_core.vendor import (
    CONSOLE_SOCKET,
    Capability,
    ConfigError,
    EngineError,
    Fingerprint,
    LaunchPlan,
    ProbeResult,
    ProcessVmHandle,
    ShareSpec,
    StateError,
    ToolMissingError,
    VmmBackend,
    VmSpec,
    host_acceleration,
    start_time,
    start_writer,
    stop_writer,
    wait_writer,
)

QEMU = "qemu-system-x86_64"
STATE_FILE = "example-qemu.json"  # what attach() reads: pid + process start time
QEMU_LOG = "example-qemu.log"  # QEMU's own messages (a bad option), capped like the console
MAX_SOCKET_PATH = 107  # a unix socket path holds 108 bytes with its NUL


def _q(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option: a comma is written twice."""
    return str(value).replace(",", ",,")


def _last_line(path: Path, block: int = 4096) -> str:
    """The last non-empty line of a log (reads its tail only)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - block))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


class ExampleQemuHandle(ProcessVmHandle):
    """The QEMU process. ProcessVmHandle (from the core) does what every one-process VMM
    needs: pid + start time (a recycled pid is never taken for the VM), wait, and stop as
    SIGTERM then SIGKILL (QEMU exits on SIGTERM)."""

    def __init__(self, box_dir: Path, pid: int, started: Fingerprint | None,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        super().__init__(pid, started, popen)
        self.box_dir = Path(box_dir)

    def exit_reason(self) -> str | None:
        """Why QEMU is gone. The core puts this first in its error when the VM dies before
        the agent answers, so a refused option (QEMU exits 1 after creating its sockets)
        reads as QEMU's own last line."""
        if self.is_running():
            return None
        code = self.returncode()  # known only in the process that launched QEMU
        if code is None:
            return "QEMU exited"
        if code < 0:
            return f"QEMU killed by signal {-code}"
        wait_writer(self.box_dir, 2.0)  # it copies QEMU's last stderr bytes into the log
        said = _last_line(self.box_dir / QEMU_LOG) if code else ""
        return f"QEMU exited with code {code}" + (f": {said}" if said else "")

    # Capability.PAUSE: freezing the whole QEMU process freezes its vCPUs. A backend with a
    # monitor would send QMP "stop"/"cont" instead. Raises StateError when the VM is gone.
    def pause(self) -> None:
        self._send(signal.SIGSTOP, "pause")

    def resume(self) -> None:
        self._send(signal.SIGCONT, "resume")

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(StateError):  # a paused QEMU handles SIGTERM once continued
            self._send(signal.SIGCONT, "stop")
        super().stop(timeout)
        self._finish_console()

    def kill(self) -> None:
        super().kill()
        self._finish_console()

    def _finish_console(self) -> None:
        """QEMU is gone: its writer drains the last bytes and exits; make sure it has."""
        if not self.is_running():
            wait_writer(self.box_dir, 2.0)
            stop_writer(self.box_dir)

    def _send(self, sig: int, what: str) -> None:
        pid = self.pid
        try:
            if pid is None or not self.is_running():  # pid + start time: never a recycled pid
                raise ProcessLookupError
            os.kill(pid, sig)
        except ProcessLookupError:
            raise StateError(f"cannot {what} the VM: QEMU (pid {pid}) is not running") from None


class ExampleQemuBackend(VmmBackend):
    name = "example-qemu"
    # channel_kind / channel_handshake keep their defaults: virtio-serial, no handshake.

    def capabilities(self) -> frozenset[Capability]:
        devices = {Capability.RAW, Capability.QCOW2, Capability.VIRTIO_SERIAL,
                   Capability.NINEP, Capability.VIRTIOFS}
        operations = {Capability.PAUSE, Capability.ATTACH}
        # TCG always; KVM only when /dev/kvm really works here (the core's probe says)
        accel = host_acceleration() & {Capability.KVM, Capability.TCG}
        return frozenset(devices | operations | accel)

    def probe(self) -> ProbeResult:
        if platform.machine() != "x86_64":
            return ProbeResult(False, reason=f"this example drives {QEMU} on x86_64 hosts only",
                               fix="run it on an x86_64 host, or use the qemu backend")
        binary = shutil.which(QEMU)
        if binary is None:
            return ProbeResult(False, reason=f"{QEMU} is not on PATH",
                               fix="apt-get install qemu-system-x86")
        return ProbeResult(True, details={"qemu": binary})

    def plan(self, spec: VmSpec) -> LaunchPlan:
        """Pure: reads the spec (and which accelerator works), writes nothing."""
        if spec.network:
            raise ConfigError("backend 'example-qemu' has no network device; run without one")
        console = Path(spec.box_dir) / CONSOLE_SOCKET  # served by QEMU, read by the writer
        for path in (spec.agent.socket, console, *(s.socket for s in spec.shares if s.socket)):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ConfigError(f"socket path {path} is too long for a unix socket; "
                                  "use a shorter BOXLITE_HOME")
        # The kit says which machine its kernel was tuned for; its kernel drives virtio-mmio
        # (microvm: no PCI bus, devices are virtio-*-device) and virtio-pci (q35) alike.
        machine = spec.guest.machine or "q35"
        transport = spec.guest.virtio_transport or ("mmio" if machine == "microvm" else "pci")
        bus = "device" if transport == "mmio" else "pci"
        machine_opts = machine + (",isa-serial=on" if machine == "microvm" else "")
        mem = f"{spec.memory_mib}M"
        virtiofs = any(s.kind == "virtiofs" for s in spec.shares)
        if virtiofs:  # vhost-user-fs: virtiofsd maps guest RAM, so RAM must be a shared memfd
            machine_opts += ",memory-backend=mem"
        if Capability.KVM in host_acceleration():
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:  # TCG: one host thread per vCPU when there are several; ARAT lets the guest
            # run high-resolution timers (the suite's T1 clock test says why)
            accel = ["-accel", "tcg,thread=multi" if spec.cpus > 1 else "tcg",
                     "-cpu", "qemu64,+arat"]
        argv = [
            QEMU, "-name", _q(f"boxlite-{spec.box_id}"),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",  # guest reboot = exit
            "-machine", machine_opts, *accel,
            "-smp", str(spec.cpus), "-m", mem,
            "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
            "-append", spec.cmdline,  # verbatim: the core may have added keys of its own
            # wait=on: QEMU runs the guest only once the writer is connected (no line lost)
            "-chardev", f"socket,id=console,path={_q(console)},server=on,wait=on",
            "-serial", "chardev:console",  # the kit's cmdline says console=ttyS0
            "-nic", "none",
        ]
        if virtiofs:
            argv += ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]
        for glob in spec.guest.qemu_globals:  # e.g. virtio-mmio.force-legacy=false on microvm
            argv += ["-global", glob]
        for i, disk in enumerate(spec.disks):
            serial = f",serial={_q(disk.serial)}" if disk.serial else ""
            argv += ["-drive", f"file={_q(disk.path)},format={disk.format},if=none,id=disk{i},"
                     f"readonly={'on' if disk.read_only else 'off'}",
                     "-device", f"virtio-blk-{bus},drive=disk{i}{serial}"]
        for i, share in enumerate(spec.shares):
            argv += self._share_args(share, i, bus)
        argv += [
            "-chardev", f"socket,id=agent,path={_q(spec.agent.socket)},server=on,wait=off",
            "-device", f"virtio-serial-{bus}",
            "-device", f"virtserialport,chardev=agent,name={_q(spec.agent.port_name)}",
        ]
        return LaunchPlan(self.name, spec, {"argv": argv, "console_socket": str(console)})

    @staticmethod
    def _share_args(share: ShareSpec, i: int, bus: str) -> list[str]:
        if share.kind == "9p":
            # A writable user volume (owner known) keeps guest owners/modes in xattrs, so a
            # guest's setuid file or device node never lands on the host as one. Rootfs and
            # read-only shares are served as they are. QEMU enforces readonly=on itself.
            if not share.read_only and share.uid is not None:
                model = "mapped-xattr,fmode=0644,dmode=0755"
            else:
                model = "passthrough" if os.geteuid() == 0 else "none"
            fsdev = f"local,id=fs{i},path={_q(share.host_path)},security_model={model}"
            return ["-fsdev", fsdev + (",readonly=on" if share.read_only else ""),
                    "-device", f"virtio-9p-{bus},fsdev=fs{i},mount_tag={_q(share.tag)}"]
        if share.kind == "virtiofs":
            # Read-only is enforced by the sharer's virtiofsd, not by this device.
            if share.socket is None:
                raise ConfigError(f"virtiofs share {share.tag!r} has no vhost-user socket")
            return ["-chardev", f"socket,id=vfs{i},path={_q(share.socket)}",
                    "-device", f"vhost-user-fs-{bus},chardev=vfs{i},tag={_q(share.tag)}"]
        raise ConfigError(f"backend 'example-qemu' cannot attach {share.kind!r} share "
                          f"{share.tag!r}: it knows '9p' and 'virtiofs'")

    def launch(self, plan: LaunchPlan) -> ExampleQemuHandle:
        """Start QEMU and return: the core waits for the agent socket while the handle says
        QEMU runs, and quotes exit_reason() if it dies first. Waiting for the socket here
        would prove nothing: QEMU creates its chardev sockets before it checks its devices.

        Raises ConfigError for another backend's plan, ToolMissingError without QEMU,
        EngineError when the console writer cannot start."""
        if plan.backend != self.name:
            raise ConfigError(f"plan is for backend {plan.backend!r}, not {self.name!r}")
        spec = plan.spec
        box = Path(spec.box_dir)
        Path(spec.agent.socket).unlink(missing_ok=True)  # a stale socket would look ready
        # The capped writer first (QEMU waits for it, wait=on); it also caps QEMU's stderr,
        # which a guest can provoke, through a pipe.
        stop_writer(box)  # a writer left from an earlier boot of this box
        stderr_r, stderr_w = os.pipe()
        try:
            start_writer(box, Path(plan.data["console_socket"]), Path(spec.console_log),
                         spec.console_log_max_bytes, stdin_fd=stderr_r,
                         stdin_out=box / QEMU_LOG)
        except BaseException:
            os.close(stderr_w)
            raise
        finally:
            os.close(stderr_r)
        with os.fdopen(stderr_w, "wb") as log:
            try:
                proc = subprocess.Popen(
                    plan.data["argv"], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives `boxlite run -d`, never gets our ^C
                    umask=0o022,  # what a guest writes through 9p mapped-xattr: 0644/0755
                )
            except FileNotFoundError as exc:
                stop_writer(box)
                raise ToolMissingError(QEMU, "qemu-system-x86", "run example-qemu boxes") from exc
            except OSError as exc:
                stop_writer(box)
                raise EngineError(f"could not start {QEMU}: {exc}") from exc
        started = start_time(proc.pid)
        try:  # what attach() needs; without it nobody could find (or stop) this QEMU again
            (box / STATE_FILE).write_text(json.dumps({"pid": proc.pid, "start_time": started}))
        except OSError as exc:
            proc.kill()
            proc.wait()
            stop_writer(box)
            raise EngineError(f"could not record QEMU's pid in {box / STATE_FILE}: {exc}") from exc
        return ExampleQemuHandle(box, proc.pid, started, proc)

    def attach(self, box_dir: Path) -> ExampleQemuHandle | None:
        try:
            state = json.loads((Path(box_dir) / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        handle = ExampleQemuHandle(Path(box_dir), int(state["pid"]), state["start_time"])
        return handle if handle.is_running() else None
