"""Prepare a private mount and user namespace and a seccomp filter for virtiofsd, then exec it.

Run as its own program (``python -I virtiofsd_launcher.py [options] -- VIRTIOFSD ARGS...``),
never imported into the runtime for its side effects. It used to be a ``preexec_fn`` of the
runtime's ``Popen``, which worked in a quiet process but failed with ``unshare(CLONE_NEWUSER):
Invalid argument`` in one that had live gRPC channels: grpcio's fork handlers restart its
threads in the forked child, and the kernel refuses a new user namespace to a multithreaded
process. A fresh interpreter that imports nothing but the standard library is single-threaded
by construction. It costs one interpreter start (~20 ms) per share.

Failures are written to stderr (the daemon's log) as one ``boxlite:`` line and exit 126, so
the runtime's "virtiofsd ... exited with 126 before ..." error carries the reason.

**The share's privilege guard** (``--no-privilege``, ``--squash-ids``): the guest is root in its
VM and can replace our agent, so every request virtiofsd serves is hostile. A seccomp filter,
installed last, right before the exec (filters stack with virtiofsd's own; the strictest action
wins), makes sure nothing a guest asks for becomes host privilege:

* ``--no-privilege``: chmod/fchmod/fchmodat with S_ISUID or S_ISGID, and open/openat/creat
  creating a file (O_CREAT, O_TMPFILE) with either bit fail with EPERM; mknod/mknodat of a
  character or block device, or with either bit, fail with EPERM (FIFOs and sockets stay:
  they grant nothing); openat2 and fchmodat2 (mode in a struct / newer than the filter) fail
  with ENOSYS, so libc falls back to the calls checked here. mkdir is not filtered: the kernel
  keeps only 0777|S_ISVTX of mkdir's mode, and a setgid *directory* (inherited from its
  parent) only sets the group of new files, never an executable's privilege.
* ``--squash-ids``: setresuid/setresgid/setfsuid/setfsgid (and setuid/setgid/setreuid/
  setregid) return success without doing anything, and the chown family too: virtiofsd keeps
  ns-root's ids, which the user namespace maps to the directory's owner, whatever guest id it
  tries to switch to or chown to (squash, like 9p's ``security_model=none``).
* an unknown audit architecture or an x32 call number kills the process: the numbers below are
  x86_64's and aarch64's, and a call under a foreign ABI would slip past them.

Standard library only: this file is executed by path with ``-I``, outside the package.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
#: exit status when the namespaces could not be set up (as a shell's "cannot execute")
SETUP_FAILED = 126

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
EPERM = 1
ENOSYS = 38
#: classic BPF opcodes (linux/filter.h)
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
#: struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 * i (low word first: LE only)
_NR, _ARCH = 0, 4
SUID_SGID = 0o6000
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000
O_CREAT, O_TMPFILE_BIT = 0o100, 0o20000000  # same values on x86_64 and aarch64
X32_BIT = 0x40000000

#: per audit arch: call name -> number (aarch64 has no open/creat/chmod/chown/mknod/mkdir)
SYSCALLS: dict[int, dict[str, int]] = {
    0xC000003E: {  # AUDIT_ARCH_X86_64
        "open": 2, "creat": 85, "openat": 257, "openat2": 437,
        "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452,
        "mknod": 133, "mknodat": 259,
        "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260,
        "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114,
        "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123,
    },
    0xC00000B7: {  # AUDIT_ARCH_AARCH64
        "openat": 56, "openat2": 437,
        "fchmod": 52, "fchmodat": 53, "fchmodat2": 452,
        "mknodat": 33,
        "fchownat": 54, "fchown": 55,
        "setregid": 143, "setgid": 144, "setreuid": 145, "setuid": 146,
        "setresuid": 147, "setresgid": 149, "setfsuid": 151, "setfsgid": 152,
    },
}
#: (flags arg, mode arg) of the calls that may create a file with a mode
_CREATING = {"open": (1, 2), "openat": (2, 3), "creat": (None, 1)}
#: mode arg of chmod-like calls
_CHMODS = {"chmod": 1, "fchmod": 1, "fchmodat": 2}
_MKNODS = {"mknod": 1, "mknodat": 2}
_SQUASHED = (
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
    "setfsgid", "chown", "fchown", "lchown", "fchownat",
)
_NEW_MODE_CALLS = ("openat2", "fchmodat2")


def _arg(index: int) -> int:
    return 16 + 8 * index


class _Asm:
    """A tiny classic-BPF assembler: instructions with symbolic jump targets, resolved to the
    relative offsets the kernel wants (forward only, at most 255 apart)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.code):
            offs = []
            for target in (jt, jf):
                if isinstance(target, str):
                    off = self.labels[target] - pc - 1
                    if not 0 <= off <= 255:
                        raise ValueError(f"BPF jump to {target} out of range ({off})")
                    offs.append(off)
                else:
                    offs.append(int(target))  # type: ignore[call-overload]
            out += struct.pack("=HBBI", code, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)


def seccomp_program(*, no_privilege: bool, squash_ids: bool) -> bytes:
    """The filter as packed ``struct sock_filter`` array (see the module docstring for the
    rules). Pure, so tests can read and run it."""
    asm = _Asm()
    allow, eperm, enosys, noop = "allow", "eperm", "enosys", "noop"
    asm.op(_LD_ABS, _ARCH)
    for arch in SYSCALLS:
        asm.op(_JEQ, arch, f"arch{arch:x}", 0)
    asm.op(_RET, SECCOMP_RET_KILL_PROCESS)
    for arch, table in SYSCALLS.items():
        asm.label(f"arch{arch:x}")
        asm.op(_LD_ABS, _NR)
        asm.op(_JGE, X32_BIT, "kill", 0)
        blocks: list[tuple[str, list[tuple[int, int, object, object]]]] = []
        if squash_ids:
            for name in _SQUASHED:
                if name in table:
                    asm.op(_JEQ, table[name], noop, 0)
        if no_privilege:
            for name in _NEW_MODE_CALLS:
                if name in table:
                    asm.op(_JEQ, table[name], enosys, 0)
            for name, (flags, mode) in _CREATING.items():
                if name in table:
                    asm.op(_JEQ, table[name], f"{name}{arch:x}", 0)
                    body: list[tuple[int, int, object, object]] = []
                    if flags is not None:
                        body.append((_LD_ABS, _arg(flags), 0, 0))
                        body.append((_JSET, O_CREAT | O_TMPFILE_BIT, 0, allow))
                    body.append((_LD_ABS, _arg(mode), 0, 0))
                    body.append((_JSET, SUID_SGID, eperm, allow))
                    blocks.append((f"{name}{arch:x}", body))
            for name, mode in _CHMODS.items():
                if name in table:
                    asm.op(_JEQ, table[name], f"{name}{arch:x}", 0)
                    blocks.append((
                        f"{name}{arch:x}",
                        [(_LD_ABS, _arg(mode), 0, 0), (_JSET, SUID_SGID, eperm, allow)],
                    ))
            for name, mode in _MKNODS.items():
                if name in table:
                    asm.op(_JEQ, table[name], f"{name}{arch:x}", 0)
                    blocks.append((
                        f"{name}{arch:x}",
                        [
                            (_LD_ABS, _arg(mode), 0, 0),
                            (_JSET, SUID_SGID, eperm, 0),
                            (_AND, S_IFMT, 0, 0),
                            (_JEQ, S_IFCHR, eperm, 0),
                            (_JEQ, S_IFBLK, eperm, allow),
                        ],
                    ))
        asm.op(_RET, SECCOMP_RET_ALLOW)
        for name, body in blocks:
            asm.label(name)
            for code, k, jt, jf in body:
                asm.op(code, k, jt, jf)
    asm.label(allow)
    asm.op(_RET, SECCOMP_RET_ALLOW)
    asm.label(eperm)
    asm.op(_RET, SECCOMP_RET_ERRNO | EPERM)
    asm.label(enosys)
    asm.op(_RET, SECCOMP_RET_ERRNO | ENOSYS)
    asm.label(noop)
    asm.op(_RET, SECCOMP_RET_ERRNO | 0)
    asm.label("kill")
    asm.op(_RET, SECCOMP_RET_KILL_PROCESS)
    return asm.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(program: bytes) -> None:
    """Set no_new_privs (the kernel's price for an unprivileged filter; virtiofsd sets it too)
    and install ``program``. Survives exec, inherited by every thread and child."""
    if sys.byteorder != "little":
        raise OSError(f"the seccomp filter reads argument low words at little-endian offsets "
                      f"and this is a {sys.byteorder}-endian {platform.machine()}")
    libc = _libc()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                      ctypes.c_ulong]
    _check(prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_mount_namespace() -> None:
    """A mount namespace of our own whose mounts do not propagate back to the host."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")


def readonly_bind(source: bytes) -> None:
    """``source`` bound read-only onto itself (in our private mount namespace). Non-recursive
    on purpose: mounts below the share stay hidden, not writable."""
    libc = _libc()
    _check(libc.mount(source, source, None, MS_BIND, None), f"bind mount {source!r}")
    _check(
        libc.mount(None, source, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
        f"remount {source!r} read-only",
    )


#: where a squashed daemon finds its share: a tmpfs (mode 0755) over /tmp in the launcher's
#: mount namespace, holding a bind of the share
EXPOSE_PARENT = b"/tmp"
EXPOSED_SOURCE = "/tmp/boxlite-share"


def expose(source: bytes, read_only: bool) -> None:
    """Bind ``source`` at :data:`EXPOSED_SOURCE`. A squashed daemon is the share's owner on
    the host with no override over anybody else's directories, so it could not walk a path
    like /root/work/vol (0700 root) to its own directory; the bind is made as root, through an
    O_PATH descriptor opened before the tmpfs covers /tmp (the share may live under it)."""
    libc = _libc()
    fd = os.open(source, os.O_PATH | os.O_DIRECTORY)
    try:
        _check(
            libc.mount(b"tmpfs", EXPOSE_PARENT, b"tmpfs", 0, b"mode=0755,size=64k"),
            "mount a tmpfs on /tmp",
        )
        target = os.fsencode(EXPOSED_SOURCE)
        os.mkdir(target, 0o755)
        _check(
            libc.mount(f"/proc/self/fd/{fd}".encode(), target, None, MS_BIND, None),
            f"bind {source!r} at {EXPOSED_SOURCE}",
        )
        if read_only:
            _check(
                libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
                f"remount {EXPOSED_SOURCE} read-only",
            )
    finally:
        os.close(fd)


def _write_map(pid: int, name: str, text: str) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_idmapped_userns(uid_map: str, gid_map: str) -> None:
    """Enter a new user namespace with these maps and become its root, so virtiofsd starts as
    ns-root (full capabilities in the namespace, which its pid/mount/net sandbox needs) while
    its host ids are the ones the maps give to ns id 0.

    A process cannot write its own maps with ids beyond its own, so a helper forked first
    (still real root in the parent namespace) writes them once we have unshared; we wait for
    it, then setresuid(0): exec would drop the capabilities of a non-root ns uid."""
    libc = _libc()
    me = os.getpid()
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # helper: wait for the unshare, write both maps, report by exit status
        status = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"u":
                _write_map(me, "uid_map", uid_map)
                _write_map(me, "gid_map", gid_map)
                status = 0
        except BaseException as exc:  # anything: the helper must reach os._exit
            with contextlib.suppress(OSError):
                os.write(2, f"boxlite: writing the user namespace maps: {exc}\n".encode())
        os._exit(status)
    os.close(ready_r)
    failed = libc.unshare(CLONE_NEWUSER) != 0
    err = ctypes.get_errno()
    os.write(ready_w, b"x" if failed else b"u")
    os.close(ready_w)
    _pid, status = os.waitpid(helper, 0)
    if failed:
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
    if status != 0:
        raise OSError("the user namespace maps were not written")
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtiofsd_launcher", description=__doc__)
    parser.add_argument("--read-only-bind", metavar="DIR", help="share DIR read-only")
    parser.add_argument(
        "--expose", metavar="DIR", help=f"bind DIR at {EXPOSED_SOURCE} (after --read-only-bind)"
    )
    parser.add_argument("--uid-map", help="uid_map text for a new user namespace")
    parser.add_argument("--gid-map", help="gid_map text (with --uid-map)")
    parser.add_argument(
        "--no-privilege", action="store_true",
        help="refuse setuid/setgid modes and device nodes (seccomp)",
    )
    parser.add_argument(
        "--squash-ids", action="store_true",
        help="make id switches and chown succeed without effect (seccomp)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- VIRTIOFSD ARGS...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("boxlite: virtiofsd_launcher: no command after --", file=sys.stderr)
        return 2
    if (args.uid_map is None) != (args.gid_map is None):
        print("boxlite: virtiofsd_launcher: --uid-map and --gid-map go together", file=sys.stderr)
        return 2
    try:
        # read-only bind first, as real root, *then* the user namespace: virtiofsd's own
        # mount-namespace copy then happens in a less privileged user namespace, so the
        # kernel locks the read-only flag (MNT_LOCK_READONLY); not even ns-root can undo it
        if args.read_only_bind is not None or args.expose is not None:
            private_mount_namespace()
        if args.read_only_bind is not None:
            readonly_bind(os.fsencode(args.read_only_bind))
        if args.expose is not None:
            expose(os.fsencode(args.expose), read_only=args.read_only_bind is not None)
        if args.uid_map is not None:
            enter_idmapped_userns(args.uid_map, args.gid_map)
        if args.no_privilege or args.squash_ids:
            install_seccomp(
                seccomp_program(no_privilege=args.no_privilege, squash_ids=args.squash_ids)
            )
    except OSError as exc:
        print(f"boxlite: preparing virtiofsd's namespaces: {exc}", file=sys.stderr)
        return SETUP_FAILED
    sys.stderr.flush()
    try:
        os.execv(command[0], command)
    except OSError as exc:
        print(f"boxlite: cannot execute {command[0]}: {exc}", file=sys.stderr)
    return SETUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
