"""ExampleBackend: a VmSpec becomes a Firecracker config file plus one argv.

Firecracker takes raw virtio-blk drives and a vsock device; it has no 9p or virtiofs and no
qcow2, so the backend declares exactly RAW, VSOCK and KVM and refuses the rest in ``plan``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from boxlite_core.errors import ConfigError, EngineError
from boxlite_core.models import Capability, ProbeResult, VmSpec
from boxlite_core.vmm.base import LaunchPlan, VmHandle, VmmBackend
from boxlite_core.vmm.process import ProcessVmHandle
from boxlite_core.vmm.procstat import start_time

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

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.RAW, Capability.VSOCK, Capability.KVM})

    @property
    def agent_kind(self) -> str:
        return "stream"  # vsock: every connect is a fresh stream

    def probe(self) -> ProbeResult:
        binary = shutil.which(BINARY)
        if binary is None:
            return ProbeResult(
                False,
                reason=f"{BINARY} is not on PATH",
                fix="install Firecracker (https://github.com/firecracker-microvm/firecracker "
                "releases) and put `firecracker` on PATH",
            )
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return ProbeResult(
                False,
                reason="/dev/kvm is missing or not accessible; Firecracker has no TCG fallback",
                fix="run on a host with KVM enabled and add this user to the 'kvm' group",
                details={"binary": binary},
            )
        return ProbeResult(True, details={"binary": binary})

    def plan(self, spec: VmSpec) -> LaunchPlan:
        for share in spec.shares:
            raise ConfigError(
                f"backend 'example' cannot attach {share.kind!r} share {share.tag!r}: "
                "Firecracker has no filesystem sharing; use the 'disk' rootfs and no volumes"
            )
        drives = []
        for disk in spec.disks:
            if disk.format != "raw":
                raise ConfigError(
                    f"backend 'example' cannot use {disk.format!r} disk {disk.path}: "
                    "Firecracker reads raw images only"
                )
            drives.append({
                "drive_id": disk.serial or f"disk{len(drives)}",
                "path_on_host": str(disk.path),
                "is_root_device": False,
                "is_read_only": disk.read_only,
            })
        config = {
            "boot-source": {
                "kernel_image_path": str(spec.kernel),
                "initrd_path": str(spec.initrd),
                "boot_args": spec.cmdline,
            },
            "drives": drives,
            "machine-config": {"vcpu_count": spec.cpus, "mem_size_mib": spec.memory_mib},
            "vsock": {"guest_cid": GUEST_CID, "uds_path": str(spec.agent.socket)},
            "network-interfaces": [],
        }
        config_path = spec.box_dir / CONFIG_NAME
        argv = [BINARY, "--no-api", "--config-file", str(config_path)]
        return LaunchPlan(
            self.name, spec, {"argv": argv, "config": config, "config_path": str(config_path)}
        )

    def launch(self, plan: LaunchPlan) -> VmHandle:
        probe = self.probe()
        if not probe.available:
            raise EngineError(f"backend 'example' cannot launch: {probe.reason}; {probe.fix}")
        spec = plan.spec
        Path(plan.data["config_path"]).write_text(json.dumps(plan.data["config"], indent=2))
        with open(spec.console_log, "ab") as console:
            proc = subprocess.Popen(
                plan.data["argv"], stdin=subprocess.DEVNULL, stdout=console, stderr=console,
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
