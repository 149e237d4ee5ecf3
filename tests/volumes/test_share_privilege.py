"""Nothing privileged crosses a share: a hostile guest (root in its VM, our agent replaced or
not) plants setuid/setgid binaries, a device node, a file capability and root-owned files in a
writable volume; on the host none of it may carry privilege.

Real VMs (QEMU TCG), real virtiofsd / QEMU 9p server, a real host user (``nobody``) running
what the guest planted. Before the fix every set-up gave ``nobody`` euid 0.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from boxlite_conformance.share_privilege import (
    PLANT_SCRIPT,
    build_privilege_helper,
    privilege_problems,
)
from boxlite_core.models import BoxOptions
from boxlite_core.volumes import virtiofsd_launcher as launcher

ROOT = os.geteuid() == 0
#: a root-owned volume and a user's: both must squash and neither may leak privilege
OWNERS = (0, 1000)

needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown to uid 1000, virtiofsd)")


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's helper (euid probe, setcap), compiled static on the host at test time."""
    built = build_privilege_helper(tmp_path_factory.mktemp("helper"))
    if built is None:
        pytest.fail("cannot build the static test helper: apt-get install gcc libc6-dev")
    return built


@pytest.fixture
def volume_root() -> Iterator[Path]:
    """A directory host user ``nobody`` can walk into (pytest's tmp dirs are 0700), so it can
    run what the guest planted, as a local attacker would."""
    root = Path(tempfile.mkdtemp(prefix="boxlite-priv-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _volume(root: Path, owner: int, helper: Path) -> Path:
    vol = root / f"owner{owner}"
    vol.mkdir(mode=0o755)
    shutil.copy(helper, vol / "helper")
    (vol / "helper").chmod(0o755)
    for path in (vol, vol / "helper"):
        os.chown(path, owner, owner)
    return vol


def test_no_privilege_filter_program_runs_double(tmp_path: Path) -> None:
    """The launcher's seccomp filter, applied to a plain program (the double of virtiofsd):
    setuid/setgid modes and device nodes refused, FIFOs and ordinary modes allowed, id switches
    and chown accepted without effect."""
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the filter knows x86_64 and aarch64 call numbers")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, stat\n"
        "def t(f):\n"
        "    try:\n"
        "        f(); return 'ok'\n"
        "    except OSError as e:\n"
        "        return str(e.errno)\n"
        "open('f', 'w').close()\n"
        "r = [t(lambda: os.chmod('f', 0o4755)), t(lambda: os.chmod('f', 0o2755)),\n"
        "     t(lambda: os.chmod('f', 0o755)),\n"
        "     t(lambda: os.close(os.open('n', os.O_CREAT | os.O_WRONLY, 0o6755))),\n"
        "     t(lambda: os.close(os.open('m', os.O_CREAT | os.O_WRONLY, 0o644))),\n"
        "     t(lambda: os.mknod('c', 0o666 | stat.S_IFCHR, os.makedev(1, 3))),\n"
        "     t(lambda: os.mknod('p', 0o600 | stat.S_IFIFO)),\n"
        "     t(lambda: os.chown('f', 4321, 4321)), t(lambda: os.setresuid(-1, 4321, -1))]\n"
        "print(' '.join(r), os.geteuid(), os.stat('f').st_uid, oct(os.stat('f').st_mode))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", launcher.__file__, "--no-privilege", "--squash-ids", "--",
         sys.executable, "-I", str(probe)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    eperm = str(errno.EPERM)
    assert out[:9] == [eperm, eperm, "ok", eperm, "ok", eperm, "ok", "ok", "ok"], out
    assert out[9] == str(os.geteuid()) and out[10] == str(os.geteuid()), out  # no-ops
    assert out[11] == "0o100755", out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m", "p", "probe.py"]


@pytest.mark.vm
@needs_root
@pytest.mark.parametrize("sharer", ["virtiofs", "9p"])
def test_nothing_privileged_crosses_a_share(
    sharer: str, helper: Path, volume_root: Path
) -> None:
    from boxlite_core.plugins import PluginRegistry
    from boxlite_core.runtime.runtime import Runtime

    home = Path(os.environ.get("BOXLITE_TEST_HOME") or "/var/tmp/boxlite-test-home")
    vols = {owner: _volume(volume_root, owner, helper) for owner in OWNERS}
    owned = PluginRegistry().volume_sharer(sharer).idmap
    with Runtime(home) as rt:
        if sharer not in rt.plugins.sharer_names():
            pytest.skip(f"the {sharer} volume sharer is not registered")
        box = rt.create(
            BoxOptions(
                image="busybox",
                name=f"priv-{sharer}-{secrets.token_hex(3)}",
                memory_mib=256,
                volumes=[f"{vols[o]}:/data/owner{o}" for o in OWNERS],
                volume_sharer=sharer,
            )
        )
        try:
            box.start()
            logs = []
            for owner in OWNERS:
                guest = f"/data/owner{owner}"
                done = box.exec(
                    ["sh", "-c", PLANT_SCRIPT, "plant", f"{guest}/plant", str(owner),
                     f"{guest}/helper"],
                    timeout=300,
                )
                logs.append(f"--- owner {owner}:\n{done.text}{done.stderr!r}")
                # a guest user whose uid is the owner's writes too
                by_owner = box.exec(
                    ["sh", "-c", f"echo owner > {guest}/plant/users/by_owner_uid"],
                    user=f"{owner}:{owner}", timeout=60,
                )
                assert by_owner.exit_code == 0, by_owner
        finally:
            box.stop()
            box.remove(force=True)
    print("\n".join(logs))  # what the guest saw: shown with -s, and with a failure
    problems = [
        f"owner {owner}: {line}"
        for owner in OWNERS
        for line in privilege_problems(vols[owner] / "plant", owner if owned else None)
    ]
    assert not problems, "\n".join(problems + logs)
    for owner in OWNERS:  # the guest's writes did land (so the checks above saw something)
        plant = vols[owner] / "plant"
        assert (plant / "own0").read_text() == "x\n", logs
        assert (plant / "users" / "by_owner_uid").read_text() == "owner\n", logs
    for owner in OWNERS:  # and the volume's owner can read what the box wrote (9p: 0644)
        read = subprocess.run(
            ["setpriv", f"--reuid={owner}", f"--regid={owner}", "--clear-groups",
             "cat", str(vols[owner] / "plant" / "users" / "by_owner_uid")],
            capture_output=True, text=True, timeout=30,
        )
        assert read.stdout == "owner\n", f"owner {owner} cannot read the box's file: {read}"


def _run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate the launcher's classic-BPF program on one ``struct seccomp_data`` (the ops it
    uses only), so the aarch64 table and the kill paths are checked on any machine."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:
            acc &= k
        elif code == 0x06:
            return k
        elif code in (0x15, 0x35, 0x45):
            hit = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += jt if hit else jf
        else:
            raise AssertionError(f"unexpected BPF op {code:#x}")
        pc += 1


X86, ARM = 0xC000003E, 0xC00000B7
ALLOW, KILL = launcher.SECCOMP_RET_ALLOW, launcher.SECCOMP_RET_KILL_PROCESS
EPERM_RET = launcher.SECCOMP_RET_ERRNO | errno.EPERM
NOOP = launcher.SECCOMP_RET_ERRNO | 0


@pytest.mark.parametrize("arch", [X86, ARM])
def test_filter_rules_per_architecture(arch: int) -> None:
    prog = launcher.seccomp_program(no_privilege=True, squash_ids=True)
    nr = launcher.SYSCALLS[arch]
    o_creat, tmpfile = launcher.O_CREAT, launcher.O_TMPFILE_BIT
    cases = [
        ("fchmodat", (3, 0, 0o4755), EPERM_RET),
        ("fchmodat", (3, 0, 0o2750), EPERM_RET),
        ("fchmodat", (3, 0, 0o1777), ALLOW),  # sticky is no privilege
        ("fchmod", (3, 0o755), ALLOW),
        ("openat", (3, 0, o_creat, 0o6755), EPERM_RET),
        ("openat", (3, 0, tmpfile, 0o4700), EPERM_RET),
        ("openat", (3, 0, o_creat, 0o644), ALLOW),
        ("openat", (3, 0, 0, 0o4755), ALLOW),  # no O_CREAT: the mode is not used
        ("mknodat", (3, 0, 0o020666, 0x103), EPERM_RET),  # char device
        ("mknodat", (3, 0, 0o060600, 0x700), EPERM_RET),  # block device
        ("mknodat", (3, 0, 0o010644, 0), ALLOW),  # FIFO
        ("mknodat", (3, 0, 0o104644, 0), EPERM_RET),  # regular file with setuid
        ("openat2", (), launcher.SECCOMP_RET_ERRNO | errno.ENOSYS),
        ("fchmodat2", (), launcher.SECCOMP_RET_ERRNO | errno.ENOSYS),
        ("setresuid", (-1 & 0xFFFFFFFF, 1000, -1 & 0xFFFFFFFF), NOOP),
        ("setfsgid", (1000,), NOOP),
        ("fchownat", (3, 0, 0, 0, 0x1000), NOOP),
    ]
    for name, args, want in cases:
        assert _run_bpf(prog, nr[name], arch, args) == want, (name, args)
    assert _run_bpf(prog, 0, arch) == ALLOW  # read (x86_64) / io_setup (aarch64)
    assert _run_bpf(prog, 0x40000000 | 257, arch) == KILL  # x32 ABI slips past the table
    assert _run_bpf(prog, nr["openat"], 0x40000003) == KILL  # i386: a foreign ABI


def test_filter_without_squash_keeps_id_switches() -> None:
    """Rootfs shares keep guest ids: only the no-privilege rules apply."""
    prog = launcher.seccomp_program(no_privilege=True, squash_ids=False)
    nr = launcher.SYSCALLS[X86]
    assert _run_bpf(prog, nr["setresuid"], X86, (0, 1000, 0)) == ALLOW
    assert _run_bpf(prog, nr["fchownat"], X86) == ALLOW
    assert _run_bpf(prog, nr["fchmodat"], X86, (3, 0, 0o4755)) == EPERM_RET
