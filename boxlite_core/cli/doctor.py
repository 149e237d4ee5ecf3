"""`boxlite doctor`: what this host lacks, each finding with its fix.

Levels: ok, warn (works, but slower or with fewer features), fail (boxes cannot run).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..tools import PACKAGES, find_tool
from ..vmm.accel import kvm_usable
from ..vmm.kvm_access import KVM_DEV, KVM_FIX, QEMU_CONF, kvm_access_problem

if TYPE_CHECKING:
    from ..plugins import PluginRegistry

MIN_FREE_GIB = 1.0
WARN_FREE_GIB = 5.0


@attrs.frozen
class Check:
    name: str
    level: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _tool(name: str, *, required: bool, why: str) -> Check:
    path = find_tool(name)
    if path:
        return Check(name, "ok", path)
    package = PACKAGES.get(name, name)
    return Check(name, "fail" if required else "warn", f"not found ({why})",
                 f"apt-get install {package}")


def _kvm() -> Check:
    """The core's acceleration probe (vmm/accel.py): /dev/kvm can exist and be unusable."""
    usable, why = kvm_usable()
    if usable:
        return Check("kvm", "ok", "KVM usable (/dev/kvm opens, hardware KVM, vmx/svm)")
    return Check("kvm", "warn", f"KVM not usable: {why}; boxes use TCG (slow boots)",
                 "enable VT-x/AMD-V (or nested virtualisation) and load kvm_intel/kvm_amd")


def _libvirt_kvm(dev: Path = KVM_DEV, qemu_conf: Path = QEMU_CONF,
                 daemon: str | bool | None = True) -> Check:
    """/dev/kvm that libvirt's QEMU user cannot open while libvirtd runs: libvirt re-probes
    QEMU on every call and stalls for minutes (inputs are parameters for tests)."""
    problem = kvm_access_problem(dev, qemu_conf, daemon)
    if problem:
        return Check("libvirt kvm access", "warn", problem, KVM_FIX)
    return Check("libvirt kvm access", "ok", "no libvirt QEMU user locked out of /dev/kvm")


def _disk(home: Path) -> Check:
    """Free space where the home lives: below the thresholds boxlite's own long writes
    (image import, pull, ext4 base, kit build) would start refusing."""
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    detail = f"{free:.1f} GiB free under {probe}"
    fix = ("free space (`boxlite image prune`, `boxlite rm` unused boxes) or set BOXLITE_HOME "
           "to a larger filesystem")
    if free < MIN_FREE_GIB:
        return Check("disk", "fail", detail + f" (below {MIN_FREE_GIB:g} GiB)", fix)
    if free < WARN_FREE_GIB:
        return Check("disk", "warn", detail + f" (below {WARN_FREE_GIB:g} GiB; the guest kit "
                     "and images need a few GiB)", fix)
    return Check("disk", "ok", detail)


def _saved_vms(home: Path, kit_id: str | None) -> Check:
    """Boot templates and snapshots of ``home``: how many and the bytes they hold, with a
    warning for templates no start can use (broken, or of another guest kit than
    ``kit_id``, the current one; None: not built)."""
    from ..runtime.templates import TemplateStore
    from .snapshots import size_text

    store = TemplateStore(home)
    infos = store.list()
    unusable = len(store.broken()) + sum(1 for t in infos if t.kit_id != kit_id)
    detail = (f"{len(infos)} boot template(s) "
              f"({size_text(sum(t.state.disk_bytes for t in infos))})")
    db_path = home / "boxlite.db"
    if db_path.exists():  # no database yet: no snapshot either (and none is created here)
        from ..runtime.snapshots import SnapshotStore
        from ..state.db import Database

        snaps = [s.to_dict() for s in SnapshotStore(Database(db_path), home).list()]
        usage = sum(int(u) for s in snaps if isinstance(u := s.get("disk_usage_bytes"), int))
        detail += f", {len(snaps)} snapshot(s) ({size_text(usage)})"
    if unusable:
        return Check("templates", "warn", f"{detail}; {unusable} broken or of another guest "
                     "kit", "boxlite templates prune")
    return Check("templates", "ok", detail)


def _network(reg: PluginRegistry, usable: list[str]) -> Check:
    """Which backends' boxes can have a network (they declare Capability.NETWORK) and
    whether the host can resolve names for name rules (its /etc/resolv.conf)."""
    from ..vmm.spec import Capability

    with_net = [n for n in usable if Capability.NETWORK in reg.backend(n).capabilities()]
    without = [n for n in usable if n not in with_net]
    if not with_net:
        return Check("network", "warn", "no usable backend declares 'network': boxes run "
                     "without one (--allow-net/--network/-p are refused)",
                     "use the qemu or libvirt backend")
    detail = (f"modes none, allowlist, full and -p work on {', '.join(with_net)} (a host-side "
              "relay per box: no root, no change to the host's firewall or routes)")
    if without:
        detail += f"; not on {', '.join(without)} (no 'network' capability)"
    try:
        import dns.resolver

        dns.resolver.Resolver()
    except Exception as exc:
        return Check("network", "warn", f"{detail}; but the host has no usable resolver "
                     f"({exc}), so name rules resolve nothing (address rules still work)",
                     "configure /etc/resolv.conf")
    return Check("network", "ok", detail)


def run_checks() -> list[Check]:
    from ..plugins import PluginRegistry
    from ..runtime.runtime import default_home

    home = default_home()
    checks = [
        _tool("qemu-system-x86_64", required=True, why="the qemu backend runs VMs with it"),
        _tool("qemu-img", required=True, why="per-box copy-on-write disks"),
        _tool("mkfs.ext4", required=True, why="building rootfs disk images"),
        _tool("virtiofsd", required=False, why="virtiofs volumes; 9p works without it"),
        _kvm(),
        _libvirt_kvm(),
        _disk(home),
    ]
    reg = PluginRegistry()
    probes = reg.probe_all()
    usable = [n for n, p in probes.items() if p.available]
    if usable:
        checks.append(Check("backends", "ok", f"available: {', '.join(usable)}"))
    else:
        why = "; ".join(f"{n}: {p.reason}" for n, p in probes.items()) or "none installed"
        checks.append(Check("backends", "fail", f"no usable VMM backend ({why})",
                            "pip install boxlite-qemu (and the fixes above)"))
    checks.append(_network(reg, usable))
    for failure in reg.failures:
        checks.append(Check(f"plugin {failure.plugin}", "warn",
                            f"failed in {failure.where}: {failure.error}",
                            "reinstall or remove the plugin, or exclude it with BOXLITE_PLUGINS"))
    try:
        from ..kit import find_kit

        kit = find_kit(home)
    except Exception as exc:
        checks.append(Check("guest kit", "warn", f"cannot check: {exc}", ""))
    else:
        if kit is None:
            checks.append(Check("guest kit", "warn", "not built yet (the first box builds it)",
                                "boxlite guest build"))
        else:
            checks.append(Check("guest kit", "ok", f"{kit.kit_id} in {kit.directory}"))
        try:
            checks.append(_saved_vms(home, kit.kit_id if kit is not None else None))
        except Exception as exc:
            checks.append(Check("templates", "warn", f"cannot check: {exc}", ""))
    return checks
