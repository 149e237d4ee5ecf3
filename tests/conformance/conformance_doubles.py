"""Test doubles of broken (and conformant) VMM backends, as a boxlite plugin module.

Two families. Plan-only doubles cannot launch a VM, so their probe says unavailable (honestly)
and the VM tiers skip; they break T0 rules. ``double-qemu*`` are the real qemu backend under
another name, booting real VMs, each with one fault put in on purpose for the VM tiers. Each
broken double breaks exactly one rule, so the suite must fail the conformance test named for
that rule, and the same test must pass against the unbroken control.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from boxlite_core.errors import ConfigError, EngineError
from boxlite_core.hookspecs import hookimpl
from boxlite_core.vmm.base import LaunchPlan, VmHandle, VmmBackend
from boxlite_core.vmm.spec import Capability, ProbeResult, VmSpec
from boxlite_qemu.backend import QemuBackend
from boxlite_qemu.handle import QemuHandle

_SHARE_CAPS = {"9p": Capability.NINEP, "virtiofs": Capability.VIRTIOFS}


class GoodPlanOnlyDouble(VmmBackend):
    """Follows every T0 rule; the control that proves the suite passes a correct backend."""

    name = "double-good"
    caps = frozenset(
        {Capability.NINEP, Capability.QCOW2, Capability.VIRTIO_SERIAL, Capability.TCG}
    )

    def capabilities(self) -> frozenset[Capability]:
        return self.caps

    def probe(self) -> ProbeResult:
        return ProbeResult(False, reason="a test double cannot boot VMs", fix="use qemu")

    def share_args(self, share: Any) -> list[str]:
        ro = ",readonly=on" if share.read_only else ""
        return ["-virtfs", f"local,path={share.host_path},mount_tag={share.tag}{ro}"]

    def plan(self, spec: VmSpec) -> LaunchPlan:
        argv = ["double-vmm", "-smp", str(spec.cpus), "-m", str(spec.memory_mib)]
        for disk in spec.disks:
            ro = ",readonly=on" if disk.read_only else ""
            argv += ["-drive", f"file={disk.path},format={disk.format}{ro}"]
        for share in spec.shares:
            if _SHARE_CAPS.get(share.kind) not in self.capabilities():
                raise ConfigError(f"backend {self.name!r} cannot attach {share.kind!r} shares")
            argv += self.share_args(share)
        return LaunchPlan(self.name, spec, {"argv": argv})

    def launch(self, plan: LaunchPlan) -> VmHandle:
        raise EngineError("a test double cannot launch VMs")

    def attach(self, box_dir: Path) -> VmHandle | None:
        return None


class NondeterministicPlanDouble(GoodPlanOnlyDouble):
    """Puts a per-call counter in the plan (think: a random MAC or a timestamp)."""

    name = "double-nondeterministic"
    _counter = itertools.count()

    def plan(self, spec: VmSpec) -> LaunchPlan:
        plan = super().plan(spec)
        argv = [*plan.data["argv"], "-uuid", f"00000000-0000-0000-0000-{next(self._counter):012d}"]
        return LaunchPlan(self.name, spec, {"argv": argv})


class ReadOnlyIgnoredDouble(GoodPlanOnlyDouble):
    """Declares 9p, but its plan drops a share's read_only: guests could write to ro volumes."""

    name = "double-ro-ignored"

    def share_args(self, share: Any) -> list[str]:
        return ["-virtfs", f"local,path={share.host_path},mount_tag={share.tag}"]


class WrongProbeShapeDouble(GoodPlanOnlyDouble):
    """Returns a dict from probe() instead of a ProbeResult."""

    name = "double-bad-probe"

    def probe(self) -> Any:
        return {"available": False, "reason": "dicts are not ProbeResults"}


class QemuDouble(QemuBackend):
    """The real qemu backend under another name: the control for the VM-tier doubles."""

    name = "double-qemu"


class QemuReadOnlyIgnoredDouble(QemuDouble):
    """Boots real VMs but drops ``readonly=on`` from its 9p devices: ro volumes are writable."""

    name = "double-qemu-ro-ignored"

    def plan(self, spec: VmSpec) -> LaunchPlan:
        plan = super().plan(spec)
        argv = [
            arg.replace(",readonly=on", "") if arg.startswith("local,id=fs") else arg
            for arg in plan.data["argv"]
        ]
        return LaunchPlan(self.name, spec, {**plan.data, "argv": argv})


class _PauseIgnoredHandle(QemuHandle):
    def pause(self) -> None:
        """Claims success and leaves the vCPUs running."""

    def resume(self) -> None:
        """Nothing was paused."""


class QemuPauseIgnoredDouble(QemuDouble):
    """Declares pause, but its handle's pause() and resume() do nothing."""

    name = "double-qemu-pause-ignored"

    def launch(self, plan: LaunchPlan) -> QemuHandle:
        handle = super().launch(plan)
        handle.__class__ = _PauseIgnoredHandle
        return handle

    def attach(self, box_dir: Path) -> QemuHandle | None:
        handle = super().attach(box_dir)
        if handle is not None:
            handle.__class__ = _PauseIgnoredHandle
        return handle


DOUBLES = (
    GoodPlanOnlyDouble,
    NondeterministicPlanDouble,
    ReadOnlyIgnoredDouble,
    WrongProbeShapeDouble,
    QemuDouble,
    QemuReadOnlyIgnoredDouble,
    QemuPauseIgnoredDouble,
)


@hookimpl
def boxlite_register_vmm_backends(register: Any) -> None:
    for cls in DOUBLES:
        register(cls.name, cls)
