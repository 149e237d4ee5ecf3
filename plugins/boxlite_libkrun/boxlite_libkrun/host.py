"""Host facts for libkrun: is hardware acceleration really usable, and who is a process.

Why this is strict: libkrun has no emulation fallback (no TCG). If KVM cannot run a stock
guest, the backend is unavailable — and ``/dev/kvm`` alone proves nothing (a ``kvm_pvm``
module or a CPU without vmx/svm still gives you the device node).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import attrs


@attrs.frozen
class AccelCheck:
    """Whether the hypervisor can run a libkrun guest here; if not, why and what to do."""

    usable: bool
    reason: str = ""
    fix: str = ""


def check_kvm(root: Path = Path("/")) -> AccelCheck:
    """KVM usable for a stock guest kernel: device read/write, no kvm_pvm, vmx/svm present."""
    dev = root / "dev/kvm"
    if not dev.exists():
        return AccelCheck(
            False,
            "/dev/kvm does not exist (KVM not loaded or not exposed)",
            "load kvm_intel/kvm_amd, or run on a host with hardware virtualization",
        )
    if not os.access(dev, os.R_OK | os.W_OK):
        return AccelCheck(
            False,
            "/dev/kvm is not readable and writable by this user",
            "add the user to the 'kvm' group (usermod -aG kvm $USER), log in again",
        )
    if (root / "sys/module/kvm_pvm").exists():
        return AccelCheck(
            False,
            "KVM here is the kvm_pvm module (PVM), which cannot run libkrun's guest kernel",
            "use a host with kvm_intel or kvm_amd",
        )
    try:
        cpuinfo = (root / "proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    if "aarch64" not in os.uname().machine and not flags & {"vmx", "svm"}:
        return AccelCheck(
            False,
            "the CPU exposes no vmx/svm flag (nested virtualization off?)",
            "enable VT-x/AMD-V (or nested virtualization on the VM host)",
        )
    return AccelCheck(True)


def check_accel() -> AccelCheck:
    """This host's check: KVM on Linux; on macOS libkrun uses Hypervisor.framework."""
    if sys.platform == "darwin":
        return AccelCheck(True)  # HVF is always present on Apple silicon; libkrun checks more
    if sys.platform.startswith("linux"):
        return check_kvm()
    return AccelCheck(False, f"libkrun does not run on {sys.platform}", "use Linux or macOS")
