"""Does this host really give a VMM hardware acceleration? The probe every backend may use.

Why not "use KVM when /dev/kvm exists": on some hosts /dev/kvm is served by ``kvm_pvm``
(a paravirtual KVM for nested clouds) and has no vmx/svm under it. Stock guest kernels then
die at once with "KVM internal error". So KVM counts as usable only with all of: /dev/kvm
openable read-write, no ``kvm_pvm`` module, a hardware KVM module (kvm_intel/kvm_amd), and
vmx/svm in the CPU flags. On macOS, HVF counts when ``kern.hv_support`` is 1.

A backend declares what the host gives with :func:`host_acceleration` (in its
``capabilities()``), so the conformance suite and users see KVM only where it boots a guest.
Which accelerator a given VMM then picks (and a user override such as ``BOXLITE_ACCEL``) is
the backend's business (the qemu plugin's ``choose_accel``).

Cheap checks only: no VM is created. The filesystem root is a parameter so tests can hand in
a fake /sys, /proc and /dev.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .spec import Capability


def _modules(root: Path) -> set[str]:
    """Loaded kernel modules: /sys/module entries, plus /proc/modules when it exists
    (some containers hide one or the other). Empty when neither can be read."""
    names: set[str] = set()
    sysmod = root / "sys/module"
    if sysmod.is_dir():
        names.update(p.name for p in sysmod.iterdir())
    procmod = root / "proc/modules"
    try:
        names.update(line.split()[0] for line in procmod.read_text().splitlines() if line)
    except OSError:
        pass
    return names


def _cpu_flags(root: Path) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (``flags`` on x86, ``Features`` on arm)."""
    try:
        text = (root / "proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _kvm_openable(root: Path) -> tuple[bool, str]:
    """(True, "") when this user can open ``root``/dev/kvm read-write, else (False, why)."""
    dev = root / "dev/kvm"
    if not dev.exists():
        return False, "no /dev/kvm"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm is not usable by this user ({exc.strerror})"
    os.close(fd)
    return True, ""


def kvm_usable(root: Path = Path("/")) -> tuple[bool, str]:
    """(usable, why not): whether KVM boots a stock guest kernel on this host (Linux).

    ``why`` is one line a user can act on ("no /dev/kvm", "the CPU has no vmx/svm flag
    (nested virtualisation is off)", ...); empty when usable. Never raises.
    """
    ok, why = _kvm_openable(root)
    if not ok:
        return False, why
    modules = _modules(root)
    if "kvm_pvm" in modules:
        return False, "/dev/kvm is kvm_pvm (paravirtual KVM), which stock guest kernels cannot use"
    flags = _cpu_flags(root)
    if not flags & {"vmx", "svm"}:
        return False, "the CPU has no vmx/svm flag (nested virtualisation is off)"
    if modules and not modules & {"kvm_intel", "kvm_amd"}:
        return False, "neither kvm_intel nor kvm_amd is loaded"
    return True, ""


def hvf_usable() -> tuple[bool, str]:
    """(usable, why not): whether Hypervisor.framework is available (macOS,
    ``sysctl kern.hv_support`` is 1). Never raises; on other systems the sysctl is
    missing, so the answer is (False, why)."""
    try:
        out = subprocess.run(
            ["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"sysctl kern.hv_support failed: {exc}"
    if out.stdout.strip() == "1":
        return True, ""
    return False, "kern.hv_support is not 1 (Hypervisor.framework unavailable)"


def host_acceleration(
    root: Path = Path("/"), system: str | None = None
) -> frozenset[Capability]:
    """The acceleration capabilities this host gives: always TCG (software emulation), plus
    KVM on Linux or HVF on macOS when usable. ``system`` defaults to ``platform.system()``.

    A backend intersects it with what its VMM can use, e.g.
    ``caps |= host_acceleration() & {Capability.KVM, Capability.TCG}``. Never raises.
    """
    system = system or platform.system()
    found = {Capability.TCG}
    if system == "Linux" and kvm_usable(root)[0]:
        found.add(Capability.KVM)
    elif system == "Darwin" and hvf_usable()[0]:
        found.add(Capability.HVF)
    return frozenset(found)
