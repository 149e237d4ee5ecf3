"""`boxlite doctor` reports low disk space and a /dev/kvm libvirt's QEMU user cannot open.

Real parts: the real CLI in a subprocess, a real 20 MiB tmpfs as the home, real device nodes
(a copy of /dev/kvm's major/minor made with mknod) and, as ground truth, a real open of the
node as libvirt's QEMU user through setpriv.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from boxlite_core.cli.doctor import _libvirt_kvm
from boxlite_core.vmm.kvm_access import QEMU_CONF, daemon_running, libvirt_qemu_identity
from boxlite_testing.cli import boxlite
from boxlite_testing.tmpfs import small_tmpfs

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mount/mknod/setpriv need root")




@root_only
def test_doctor_warns_on_low_space_under_the_home(tmp_path):
    with small_tmpfs(tmp_path / "home") as home:
        proc = boxlite("doctor", home=home)
    lines = [line for line in proc.stdout.splitlines() if " disk: " in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("fail disk:"), lines[0]
    assert str(home) in lines[0] and "below 1 GiB" in lines[0], lines[0]
    assert "boxlite image prune" in lines[0] and "BOXLITE_HOME" in lines[0], lines[0]


def _opens_as_qemu_user(node: Path) -> bool:
    """Ground truth: can libvirt's QEMU user (with its groups) open ``node`` read-write?"""
    who = libvirt_qemu_identity(QEMU_CONF)
    assert who is not None
    entry = pwd.getpwuid(who.uid)
    groups = ",".join(str(g) for g in sorted(who.gids))
    proc = subprocess.run(
        ["setpriv", f"--reuid={who.uid}", f"--regid={entry.pw_gid}", f"--groups={groups}",
         sys.executable, "-c", f"import os; os.close(os.open({str(node)!r}, os.O_RDWR))"],
        capture_output=True, text=True, timeout=60)
    return proc.returncode == 0


@pytest.fixture
def kvm_node():
    """A /dev/kvm twin (same major:minor) in a directory every user can traverse."""
    real = Path("/dev/kvm")
    if not real.exists():
        pytest.skip("no /dev/kvm on this host")
    if libvirt_qemu_identity(QEMU_CONF) is None:
        pytest.skip("libvirt's QEMU user does not exist here (libvirt-daemon-system)")
    parent = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="boxlite-kvm-test-"))
    os.chmod(parent, 0o755)
    node = parent / "kvm"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.stat(real).st_rdev)
    yield node
    shutil.rmtree(parent, ignore_errors=True)


@root_only
def test_doctor_detects_a_root_only_kvm_node_and_accepts_the_udev_fix(kvm_node):
    os.chown(kvm_node, 0, 0)
    os.chmod(kvm_node, 0o600)
    assert not _opens_as_qemu_user(kvm_node), "ground truth: libvirt-qemu cannot open it"
    check = _libvirt_kvm(kvm_node, QEMU_CONF, daemon="libvirtd")
    assert check.level == "warn"
    assert f"{kvm_node} is root:root 0600" in check.detail, check.detail
    assert "libvirt-qemu cannot open" in check.detail, check.detail
    assert check.fix.startswith("chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"), check.fix

    # what scripts/setup does (and udev would): root:kvm 0660
    os.chown(kvm_node, 0, grp.getgrnam("kvm").gr_gid)
    os.chmod(kvm_node, 0o660)
    assert _opens_as_qemu_user(kvm_node), "ground truth: libvirt-qemu can open it now"
    assert _libvirt_kvm(kvm_node, QEMU_CONF, daemon="libvirtd").level == "ok"
    # no daemon running QEMU as that user: nothing to report
    os.chmod(kvm_node, 0o600)
    assert _libvirt_kvm(kvm_node, QEMU_CONF, daemon=None).level == "ok"


@root_only
def test_doctor_cli_agrees_with_the_kernel_about_this_hosts_real_dev_kvm(tmp_path):
    """This machine's real state, whatever it is today: the line doctor prints matches what
    the kernel says when libvirt's QEMU user opens /dev/kvm."""
    if not Path("/dev/kvm").exists() or libvirt_qemu_identity(QEMU_CONF) is None:
        pytest.skip("no /dev/kvm or no libvirt QEMU user")
    if not daemon_running():
        pytest.skip("no libvirtd/virtqemud running")
    proc = boxlite("doctor", home=tmp_path / "home")
    lines = [line for line in proc.stdout.splitlines() if "libvirt kvm access" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    if _opens_as_qemu_user(Path("/dev/kvm")):
        assert lines[0].startswith("ok "), lines[0]
    else:
        assert lines[0].startswith("warn libvirt kvm access: /dev/kvm is "), lines[0]
        assert "fix: chgrp kvm /dev/kvm && chmod 0660 /dev/kvm" in lines[0], lines[0]


REPO = Path(__file__).resolve().parents[2]


@root_only
def test_setup_fixes_kvm_permissions_like_udev_and_doctor_then_agrees(kvm_node):
    """scripts/setup's step, run on a twin node bind-mounted over /dev/kvm in a private mount
    namespace (the host's real node is never touched)."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) missing")
    os.chown(kvm_node, 0, 0)
    os.chmod(kvm_node, 0o600)
    assert _libvirt_kvm(kvm_node, QEMU_CONF, daemon="libvirtd").level == "warn"
    script = (f"mount --bind {kvm_node} /dev/kvm && {REPO}/scripts/fix-kvm-perms && "
              f"{REPO}/scripts/fix-kvm-perms")  # twice: idempotent
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("setting root:kvm 0660 as udev would") == 1, proc.stderr
    st = os.stat(kvm_node)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (grp.getgrnam("kvm").gr_gid, 0o660)
    assert _opens_as_qemu_user(kvm_node)
    assert _libvirt_kvm(kvm_node, QEMU_CONF, daemon="libvirtd").level == "ok"
    real = os.stat("/dev/kvm")
    assert real.st_ino != st.st_ino or real.st_dev != st.st_dev
