"""Can this host run the hvf backend? Facts are gathered once, then judged by a pure function.

Why split: the judgement (:func:`judge`) is a decision table over plain facts, so every branch
— old macOS, no hv_support, missing PyObjC, unsigned interpreter — is tested on Linux with
facts written out by hand; :func:`gather` only reads the host.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

from boxlite_core.vmm.spec import ProbeResult

#: 12: VZGenericPlatformConfiguration, virtiofs, stopWithCompletionHandler.
#: 12.3: VZVirtioBlockDeviceConfiguration.blockDeviceIdentifier — the disk serial the agent
#: finds its disks by. (13 would add named virtio-console ports, the EFI boot loader and
#: Rosetta; 14 NVMe and network block devices: none of them is used.)
MIN_MACOS = (12, 3)
ENTITLEMENT = "com.apple.security.virtualization"
PYTHON_ENV = "BOXLITE_HVF_PYTHON"
ENTITLEMENTS_FILE = Path(__file__).with_name("vz.entitlements")

LINUX_FIX = (
    "use the qemu backend (pip install boxlite-qemu), or run on macOS 12+ with "
    "pip install boxlite-hvf"
)


@attrs.frozen
class HostFacts:
    system: str                         # platform.system()
    macos_version: tuple[int, ...] = ()
    machine: str = ""                   # arm64 / x86_64
    hv_support: bool | None = None      # sysctl kern.hv_support; None if unreadable
    pyobjc: bool = False                # Virtualization and dispatch importable
    python: str = ""                    # the interpreter the runner will use
    entitled: bool | None = None        # None: could not tell (no codesign)


def runner_python() -> str:
    """The interpreter that runs the VM: BOXLITE_HVF_PYTHON (a signed copy) or this one."""
    return os.environ.get(PYTHON_ENV) or sys.executable


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(".") if p)
    except ValueError:
        return ()


def _sysctl_hv_support() -> bool | None:
    sysctl = shutil.which("sysctl") or "/usr/sbin/sysctl"
    try:
        out = subprocess.run([sysctl, "-n", "kern.hv_support"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() == "1" if out.returncode == 0 else None


def entitlements_of(executable: str) -> bool | None:
    """Does ``executable``'s code signature carry the virtualization entitlement?"""
    codesign = shutil.which("codesign") or "/usr/bin/codesign"
    try:
        out = subprocess.run(
            [codesign, "-d", "--entitlements", "-", "--xml", os.path.realpath(executable)],
            capture_output=True, timeout=20, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).decode(errors="replace")
    if out.returncode != 0 and "not signed" not in text:
        return None
    return ENTITLEMENT in text


def gather() -> HostFacts:
    system = platform.system()
    if system != "Darwin":
        return HostFacts(system=system, machine=platform.machine())
    python = runner_python()
    return HostFacts(
        system=system,
        macos_version=_version(platform.mac_ver()[0]),
        machine=platform.machine(),
        hv_support=_sysctl_hv_support(),
        pyobjc=all(importlib.util.find_spec(m) is not None
                   for m in ("Virtualization", "dispatch")),
        python=python,
        entitled=entitlements_of(python),
    )


def sign_command(python: str) -> str:
    real = os.path.realpath(python) if python else "python3"
    return (
        f"cp {real} ~/.boxlite/python-vz && codesign --force --sign - --entitlements "
        f"{ENTITLEMENTS_FILE} ~/.boxlite/python-vz && export {PYTHON_ENV}=~/.boxlite/python-vz"
    )


def judge(facts: HostFacts) -> ProbeResult:
    details = {
        "system": facts.system,
        "macos": ".".join(map(str, facts.macos_version)),
        "arch": facts.machine,
        "hv_support": facts.hv_support,
        "pyobjc": facts.pyobjc,
        "python": facts.python,
        "entitled": facts.entitled,
        "accel": "hvf",
    }
    if facts.system != "Darwin":
        host = "Linux" if facts.system == "Linux" else (facts.system or "an unknown OS")
        return ProbeResult(
            False, reason=f"Hypervisor.framework needs macOS; this host runs {host}",
            fix=LINUX_FIX, details=details,
        )
    need = ".".join(map(str, MIN_MACOS))
    if facts.macos_version < MIN_MACOS:
        return ProbeResult(
            False,
            reason=f"macOS {details['macos'] or '?'} is too old: the hvf backend needs "
                   f"{need}+ (virtiofs and the generic platform need 12, disk identifiers 12.3)",
            fix=f"update macOS to {need} or later, or use the qemu backend (qemu -accel hvf)",
            details=details,
        )
    if facts.machine not in ("arm64", "x86_64"):
        return ProbeResult(
            False, reason=f"unsupported Mac architecture {facts.machine!r}",
            fix="run on an Apple silicon (arm64) or Intel (x86_64) Mac", details=details,
        )
    if facts.hv_support is False:
        return ProbeResult(
            False,
            reason="sysctl kern.hv_support is 0: this Mac (or the VM it runs in) offers no "
                   "hardware virtualization",
            fix="run on a Mac with virtualization support; inside a macOS VM enable nested "
                "virtualization (M3+, macOS 15), or use the qemu backend with TCG",
            details=details,
        )
    if not facts.pyobjc:
        return ProbeResult(
            False,
            reason="PyObjC's Virtualization/dispatch modules are not importable",
            fix="pip install 'pyobjc-framework-Virtualization>=10' "
                "'pyobjc-framework-libdispatch>=10' (or reinstall boxlite-hvf)",
            details=details,
        )
    if facts.entitled is False:
        return ProbeResult(
            False,
            reason=f"{facts.python} is not signed with the {ENTITLEMENT} entitlement, so "
                   "Virtualization.framework will refuse to start a VM from it",
            fix=f"sign a copy of the interpreter and point boxlite at it: "
                f"{sign_command(facts.python)}",
            details=details,
        )
    return ProbeResult(True, details=details)
