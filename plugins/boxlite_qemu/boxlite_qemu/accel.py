"""Which accelerator QEMU gets: KVM/HVF only where it really boots a guest, else TCG.

Why not "use KVM when /dev/kvm exists": on some hosts /dev/kvm is served by ``kvm_pvm``
(a paravirtual KVM for nested clouds) and has no vmx/svm under it. Stock guest kernels then
die at once with "KVM internal error". So KVM needs all of: /dev/kvm openable read-write,
no ``kvm_pvm`` module, a hardware KVM module (kvm_intel/kvm_amd), and vmx/svm in the CPU
flags. Anything short of that is TCG, with a one-line notice saying why.

The filesystem root and environment are parameters so tests can hand in a fake /sys and
/proc; :func:`host_accel` is the cached answer for the real host.
"""

from __future__ import annotations

import functools
import logging
import os
import platform as _platform
import subprocess
from collections.abc import Mapping
from pathlib import Path

import attrs

from boxlite_core.errors import ConfigError

log = logging.getLogger(__name__)

ENV_ACCEL = "BOXLITE_ACCEL"
ACCELS = ("kvm", "tcg", "hvf")


@attrs.frozen
class AccelChoice:
    """The accelerator and why: ``notice`` is the one line a user sees when we fell back."""

    accel: str
    reason: str
    notice: str = ""
    forced: bool = False

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def _modules(root: Path) -> set[str]:
    """Loaded kernel modules: /sys/module entries, plus /proc/modules when it exists
    (some containers hide one or the other)."""
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
    """(usable, why not). Cheap checks only; no VM is created."""
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


def _hvf_usable(run_sysctl: bool = True) -> tuple[bool, str]:
    if not run_sysctl:
        return False, "not checked"
    try:
        out = subprocess.run(
            ["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"sysctl kern.hv_support failed: {exc}"
    if out.stdout.strip() == "1":
        return True, ""
    return False, "kern.hv_support is not 1 (Hypervisor.framework unavailable)"


def choose_accel(
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    system: str | None = None,
) -> AccelChoice:
    """Decide the accelerator for this host. ``BOXLITE_ACCEL=kvm|tcg|hvf`` overrides.

    Raises ConfigError for an unknown override value (the user typed it; say so).
    """
    env = os.environ if env is None else env
    system = system or _platform.system()
    forced = env.get(ENV_ACCEL, "").strip().lower()
    if forced:
        if forced not in ACCELS:
            raise ConfigError(
                f"{ENV_ACCEL}={forced!r}: must be one of {', '.join(ACCELS)} (or unset to probe)"
            )
        return AccelChoice(forced, f"forced by {ENV_ACCEL}={forced}", forced=True)
    if system == "Darwin":
        ok, why = _hvf_usable()
        if ok:
            return AccelChoice("hvf", "kern.hv_support=1")
    elif system == "Linux":
        ok, why = kvm_usable(root)
        if ok:
            return AccelChoice("kvm", "/dev/kvm usable with hardware virtualisation")
    else:
        why = f"no hardware accelerator support for {system}"
    notice = f"boxlite: using QEMU TCG (software emulation, slow): {why}"
    return AccelChoice("tcg", why, notice=notice)


@functools.cache
def _cached(forced: str) -> AccelChoice:
    choice = choose_accel(env={ENV_ACCEL: forced} if forced else {})
    if choice.notice:
        log.warning("%s", choice.notice)
    return choice


def host_accel() -> AccelChoice:
    """The accelerator for this process's host, probed once (per override value)."""
    return _cached(os.environ.get(ENV_ACCEL, "").strip().lower())
