"""ExampleBackend: a VmSpec becomes a Firecracker config file plus one argv.

The vsock example (the QEMU one, ``boxlite-example-qemu``, is the one that boots here).
Firecracker reaches the guest agent over *hybrid vsock*: it listens on a unix socket
(``vsock.uds_path``) and, for each connection, wants ``CONNECT <port>\\n`` before the stream
is the guest's. The backend only declares that (``channel_kind = VSOCK``,
``channel_handshake = FIRECRACKER_CONNECT``): the core sends the handshake, and the core adds
``boxlite.agent_vsock=<port>`` to ``spec.cmdline`` so the guest agent listens on vsock.

Firecracker takes raw virtio-blk drives and a vsock device; it has no 9p or virtiofs, no
qcow2 and no TCG, so the backend declares exactly RAW, VSOCK and KVM and refuses the rest in
``plan``. What it can boot: the kit's raw root image (read-only, found by the guest by its
serial) plus a raw rootfs disk. The core's ``disk`` rootfs makes a qcow2 overlay, which this
backend refuses by name; a vendor shipping it would register a raw rootfs strategy too
(``boxlite_register_rootfs_strategies``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from boxlite_core.vendor import (
    Capability,
    ChannelKind,
    ConfigError,
    EngineError,
    Handshake,
    LaunchPlan,
    ProbeResult,
    ProcessVmHandle,
    VmHandle,
    VmmBackend,
    VmSpec,
    kvm_usable,
    start_time,
)

BINARY = "firecracker"
CONFIG_NAME = "firecracker.json"
STATE_NAME = "example-vm.json"  # what attach() reads: pid + process start time
GUEST_CID = 3


class ExampleHandle(ProcessVmHandle):
    """A Firecracker process. The core's ProcessVmHandle does the bookkeeping every one-process
    VMM needs: pid + start time (so a recycled pid is never taken for the VM), wait, and stop
    as SIGTERM then SIGKILL (Firecracker has no ACPI powerdown without its API socket)."""

    def exit_reason(self) -> str | None:
        if self.is_running():
            return None
        code = self.returncode()
        return "firecracker exited" + (f" with code {code}" if code is not None else "")


class ExampleBackend(VmmBackend):
    name = "example"
    channel_kind = ChannelKind.VSOCK  # every connect on spec.agent.socket is a fresh stream
    channel_handshake = Handshake.FIRECRACKER_CONNECT  # ... after "CONNECT <port>\n" / "OK n\n"

    def capabilities(self) -> frozenset[Capability]:
        # KVM: Firecracker has no TCG fallback; probe() says when this host cannot give it
        return frozenset({Capability.RAW, Capability.VSOCK, Capability.KVM})

    def probe(self) -> ProbeResult:
        binary = shutil.which(BINARY)
        if binary is None:
            return ProbeResult(
                False,
                reason=f"{BINARY} is not on PATH",
                fix="install Firecracker (https://github.com/firecracker-microvm/firecracker "
                "releases) and put `firecracker` on PATH",
            )
        usable, why = kvm_usable()  # the core's probe: module, /dev/kvm, CPU flags
        if not usable:
            return ProbeResult(
                False,
                reason=f"KVM is not usable here ({why}); Firecracker has no TCG fallback",
                fix="run on a host with KVM enabled and add this user to the 'kvm' group",
                details={"binary": binary},
            )
        return ProbeResult(True, details={"binary": binary})

    def plan(self, spec: VmSpec) -> LaunchPlan:
        for share in spec.shares:
            raise ConfigError(
                f"backend 'example' cannot attach {share.kind!r} share {share.tag!r}: "
                "Firecracker has no filesystem sharing; use a disk rootfs and no volumes"
            )
        drives = []
        for disk in spec.disks:
            if disk.format != "raw":
                raise ConfigError(
                    f"backend 'example' cannot use {disk.format!r} disk {disk.path}: "
                    "Firecracker reads raw images only; use a raw rootfs strategy"
                )
            drives.append({
                "drive_id": disk.serial or f"disk{len(drives)}",
                "path_on_host": str(disk.path),
                "is_root_device": False,  # the kit's initrd finds its root by serial
                "is_read_only": disk.read_only,
            })
        config = {
            "boot-source": {
                "kernel_image_path": str(spec.kernel),
                "initrd_path": str(spec.initrd),
                "boot_args": spec.cmdline,  # verbatim: it carries boxlite.agent_vsock=PORT
            },
            "drives": drives,
            "machine-config": {"vcpu_count": spec.cpus, "mem_size_mib": spec.memory_mib},
            # Firecracker creates uds_path as a server; the core dials it and says CONNECT
            "vsock": {"guest_cid": GUEST_CID, "uds_path": str(spec.agent.socket)},
            "network-interfaces": [],
        }
        config_path = spec.box_dir / CONFIG_NAME
        argv = [BINARY, "--no-api", "--config-file", str(config_path)]
        return LaunchPlan(
            self.name, spec, {"argv": argv, "config": config, "config_path": str(config_path)}
        )

    def launch(self, plan: LaunchPlan) -> VmHandle:
        if plan.backend != self.name:
            raise ConfigError(f"plan is for backend {plan.backend!r}, not {self.name!r}")
        probe = self.probe()
        if not probe.available:
            raise EngineError(f"backend 'example' cannot launch: {probe.reason}; {probe.fix}")
        spec = plan.spec
        Path(plan.data["config_path"]).write_text(json.dumps(plan.data["config"], indent=2))
        Path(spec.agent.socket).unlink(missing_ok=True)  # Firecracker refuses an existing path
        with open(spec.console_log, "ab") as console:
            proc = subprocess.Popen(
                plan.data["argv"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                start_new_session=True,
            )
        started = start_time(proc.pid)
        if started is None:
            raise EngineError(f"firecracker exited at once; see {spec.console_log}")
        (spec.box_dir / STATE_NAME).write_text(
            json.dumps({"pid": proc.pid, "start_time": started})
        )
        return ExampleHandle(proc.pid, started, proc)

    def attach(self, box_dir: Path) -> VmHandle | None:
        try:
            state = json.loads((Path(box_dir) / STATE_NAME).read_text())
        except (OSError, ValueError):
            return None
        handle = ExampleHandle(int(state["pid"]), int(state["start_time"]))
        return handle if handle.is_running() else None
