"""What a built guest kit is, as data the runtime and the VMM backends read."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from ..models import JsonObject
from ..vmm.spec import GuestHints


@attrs.frozen
class MachineProfile:
    """How the kit's kernel must be launched; data so a backend's plan and a vendor can see it.

    Chosen by measurement (TCG, 2 cores, QEMU 7.2, launch → `boxlite-init: start`, ~median):
    microvm + uncompressed generic kernel 2.1 s, q35 + same 2.6 s, q35 + bzImage 7.7 s.
    """

    machine: str                       # "microvm" or "q35"
    virtio_transport: str              # "mmio" (virtio-*-device) or "pci" (virtio-*-pci)
    qemu_globals: tuple[str, ...]      # -global values
    cmdline: tuple[str, ...]           # required kernel cmdline words
    uncompressed_kernel: bool          # -kernel gets the ELF vmlinux (PVH entry)
    needs_tsc_khz: bool                # add tsc_early_khz=<host TSC kHz> at load time

    def to_dict(self) -> JsonObject:
        return attrs.asdict(self)


#: Common cmdline: serial console, quiet kernel but errors shown (loglevel=3), and panic=-1 +
#: reboot=t so a dying guest resets at once (run QEMU with -no-reboot to turn that into exit).
BASE_CMDLINE: tuple[str, ...] = ("console=ttyS0", "quiet", "loglevel=3", "panic=-1", "reboot=t")

#: x86 guests keep the TSC as their clocksource. Under TCG the kernel's clocksource watchdog
#: compares the TSC (QEMU derives it from the host's clock) with jiffies, whose ticks a busy
#: TCG vCPU delivers late, calls the *TSC* unstable ~5 s after boot and falls back to
#: refined-jiffies: 4 ms clock resolution, sleeps rounded up to ticks, and time-derived values
#: that collide (glibc/musl make DNS query ids from the clock: busybox nslookup's A and AAAA
#: queries got one id and it dropped an answer). ``tsc=reliable`` turns that watchdog off
#: (Documentation/admin-guide/kernel-parameters.txt: "in virtualized environment"; Kata
#: Containers boots its guests with it too). Under KVM, kvm-clock outranks the TSC anyway.
X86_CLOCK: tuple[str, ...] = ("tsc=reliable",)

MICROVM = MachineProfile(
    machine="microvm",
    virtio_transport="mmio",
    # vhost-user devices (virtiofs) refuse legacy virtio-mmio, the microvm default
    qemu_globals=("virtio-mmio.force-legacy=false",),
    cmdline=BASE_CMDLINE + X86_CLOCK,
    uncompressed_kernel=True,
    # TSC calibration hangs 2-4 of 5 TCG boots on microvm without it
    needs_tsc_khz=True,
)

Q35 = MachineProfile(
    machine="q35",
    virtio_transport="pci",
    qemu_globals=(),
    cmdline=BASE_CMDLINE + X86_CLOCK,
    uncompressed_kernel=True,
    needs_tsc_khz=False,
)

PROFILES: dict[str, MachineProfile] = {"microvm": MICROVM, "q35": Q35}


@attrs.frozen
class GuestKit:
    """A built, cached guest kit. Paths are inside `directory`, which is never half-built."""

    kit_id: str
    directory: Path
    kernel: Path
    initrd: Path
    root_image: Path
    cmdline: str
    machine: str
    qemu_globals: tuple[str, ...]
    arch: str
    manifest: Path
    virtio_transport: str = "mmio"

    def to_dict(self) -> JsonObject:
        return {
            "kit_id": self.kit_id,
            "directory": str(self.directory),
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "root_image": str(self.root_image),
            "cmdline": self.cmdline,
            "machine": self.machine,
            "qemu_globals": list(self.qemu_globals),
            "arch": self.arch,
            "manifest": str(self.manifest),
            "virtio_transport": self.virtio_transport,
        }

    def guest_hints(self) -> GuestHints:
        """The facts about this kit a VmSpec carries to the backend (``VmSpec.guest``)."""
        return GuestHints(
            arch=self.arch,
            machine=self.machine,
            virtio_transport=self.virtio_transport,
            qemu_globals=self.qemu_globals,
            kit_id=self.kit_id,
        )

    def read_manifest(self) -> JsonObject:
        return json.loads(self.manifest.read_text())
