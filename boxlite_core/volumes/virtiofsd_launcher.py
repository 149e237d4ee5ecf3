"""Prepare a private mount and user namespace for the C virtiofsd, then exec it.

Run as its own program (``python -I virtiofsd_launcher.py [options] -- VIRTIOFSD ARGS...``),
never imported into the runtime for its side effects. It used to be a ``preexec_fn`` of the
runtime's ``Popen``, which worked in a quiet process but failed with ``unshare(CLONE_NEWUSER):
Invalid argument`` in one that had live gRPC channels: grpcio's fork handlers restart its
threads in the forked child, and the kernel refuses a new user namespace to a multithreaded
process. A fresh interpreter that imports nothing but the standard library is single-threaded
by construction. It costs one interpreter start (~20 ms) per share.

Failures are written to stderr (the daemon's log) as one ``boxlite:`` line and exit 126, so
the runtime's "virtiofsd exited before creating its socket" error carries the reason.

Standard library only: this file is executed by path with ``-I``, outside the package.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def readonly_bind(source: bytes) -> None:
    """Private mount namespace with ``source`` bound read-only onto itself. Non-recursive on
    purpose: mounts below the share stay hidden, not writable."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(source, source, None, MS_BIND, None), f"bind mount {source!r}")
    _check(
        libc.mount(None, source, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
        f"remount {source!r} read-only",
    )


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
    parser.add_argument("--uid-map", help="uid_map text for a new user namespace")
    parser.add_argument("--gid-map", help="gid_map text (with --uid-map)")
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
        if args.read_only_bind is not None:
            readonly_bind(os.fsencode(args.read_only_bind))
        if args.uid_map is not None:
            enter_idmapped_userns(args.uid_map, args.gid_map)
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
