"""Can libvirt's QEMU user open /dev/kvm? A host without udev leaves it root:root 0600.

Why this matters (finding 8): libvirtd probes QEMU as root and sees KVM, then runs QEMU as its
unprivileged user (Debian: ``libvirt-qemu``, in group ``kvm``), which cannot open a 0600
root-owned /dev/kvm. libvirt then re-probes QEMU on every lookup ("KVM was enabled when
probing … but it is not available now"), and each probe waits on QEMU processes: ``createXML``
hung for minutes and a conformance run took 23 min instead of ~2. Debian's udev rule makes the
node ``root:kvm 0660``; on hosts without udev nothing does, so ``scripts/setup`` does, and
``boxlite doctor`` and the libvirt backend's ``probe()`` report it with this module.

It sits next to :mod:`.accel`, which asks whether KVM works for *this* process's VMM; this
module asks whether libvirt's QEMU user can open the same node.

The check reads only file metadata and /etc/libvirt/qemu.conf; every input is a parameter so
tests can point it at their own device node and config. POSIX ACLs on the node are not read.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from collections.abc import Callable
from pathlib import Path

import attrs

KVM_DEV = Path("/dev/kvm")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: Debian's build default when qemu.conf sets no user/group
DEFAULT_USER = "libvirt-qemu"
DEFAULT_GROUP = "libvirt-qemu"
DAEMONS = ("libvirtd", "virtqemud")
KVM_FIX = ("chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (what Debian's udev rule does; "
           "scripts/setup does it on hosts without udev)")


@attrs.frozen
class QemuIdentity:
    """The user and groups libvirt runs QEMU as."""

    user: str
    uid: int
    gids: frozenset[int]


def _conf_value(text: str, key: str) -> str | None:
    match = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    return match.group(1) if match else None


def _uid(name: str) -> int | None:
    if name.startswith("+") and name[1:].isdigit():
        return int(name[1:])
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return int(name) if name.isdigit() else None


def _gid(name: str) -> int | None:
    if name.startswith("+") and name[1:].isdigit():
        return int(name[1:])
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return int(name) if name.isdigit() else None


def libvirt_qemu_identity(qemu_conf: Path = QEMU_CONF) -> QemuIdentity | None:
    """Who libvirt's system daemon runs QEMU as (qemu.conf ``user``/``group``, else Debian's
    defaults), with the user's supplementary groups; None if that user does not exist."""
    try:
        text = Path(qemu_conf).read_text()
    except OSError:
        text = ""
    user = _conf_value(text, "user") or DEFAULT_USER
    group = _conf_value(text, "group") or DEFAULT_GROUP
    uid = _uid(user)
    if uid is None:
        return None
    gids: set[int] = set()
    gid = _gid(group)
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    if gid is None and entry is not None:
        gid = entry.pw_gid
    if gid is not None:
        gids.add(gid)
    if entry is not None:
        # like libvirt's virGetGroupList: the user's primary group and its supplementary
        # groups count too (Debian's libvirt-qemu has primary group kvm)
        gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return QemuIdentity(user, uid, frozenset(gids))


def can_open_rw(st: os.stat_result, uid: int, gids: frozenset[int]) -> bool:
    """Would ``uid`` with ``gids`` get read+write on a node with this stat (classic modes)?"""
    if uid == 0:
        return True
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return mode & 0o600 == 0o600
    if st.st_gid in gids:
        return mode & 0o060 == 0o060
    return mode & 0o006 == 0o006


def daemon_running(proc: Path = Path("/proc")) -> str | None:
    """The name of a running libvirt QEMU daemon (libvirtd or virtqemud), else None."""
    for comm in proc.glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in DAEMONS:
            return name
    return None


def kvm_access_problem(dev: Path = KVM_DEV, qemu_conf: Path = QEMU_CONF,
                       daemon: str | bool | None = True) -> str | None:
    """A one-line description of the bad state, or None when there is none (or nothing to
    check: no /dev/kvm, no libvirt QEMU user, no daemon).

    ``daemon``: True to look for a running libvirtd/virtqemud, a name to assume one runs,
    None/False to assume none does.
    """
    if daemon is True:
        daemon = daemon_running()
    if not daemon:
        return None
    try:
        st = os.stat(dev)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    who = libvirt_qemu_identity(qemu_conf)
    if who is None or can_open_rw(st, who.uid, who.gids):
        return None
    owner = _name(pwd.getpwuid, st.st_uid, "pw_name")
    group = _name(grp.getgrgid, st.st_gid, "gr_name")
    return (f"{dev} is {owner}:{group} {stat.S_IMODE(st.st_mode):04o}, which libvirt's QEMU "
            f"user {who.user} cannot open while {daemon} runs QEMU as that user: libvirt "
            "re-probes QEMU on every call and createXML/lookups stall for minutes")


def _name(lookup: Callable[[int], object], ident: int, attr: str) -> str:
    try:
        return str(getattr(lookup(ident), attr))
    except KeyError:
        return str(ident)
