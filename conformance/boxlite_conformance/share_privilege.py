"""What a hostile guest plants in a writable volume, and the host-side check that none of it is
privilege ("nothing privileged crosses a share"). Shared by the conformance suite (every
vendor's backend, every sharer it declares) and boxlite's own VM tests.

The guest is root in its VM and can replace our agent, so a share must never turn guest
metadata into host privilege: no setuid/setgid bit, device node or file capability may appear
on the host, and a planted program run by host user ``nobody`` must not get euid 0.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

from .static_helper import compile_static

__all__ = [
    "PLANTED_EXECUTABLES",
    "PLANT_SCRIPT",
    "PRIVILEGE_HELPER_C",
    "build_privilege_helper",
    "privilege_problems",
]

#: host user that runs what a guest planted (a local attacker with no privilege)
NOBODY = 65534
#: the guest's tools for what busybox cannot do: print the euid after trying setuid(0) (so a
#: file capability shows too) and set a ``security.capability`` xattr. Built on the host at
#: test time (:func:`build_privilege_helper`), never a binary in git.
PRIVILEGE_HELPER_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "euid")) {
        if (setuid(0) != 0) { /* no privilege: expected */ }
        printf("%d\n", (int)geteuid());
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "setcap")) {
        /* VFS_CAP_REVISION_2 | effective; permitted = CAP_SETGID | CAP_SETUID */
        unsigned int cap[5] = {0x02000001u, (1u << 6) | (1u << 7), 0, 0, 0};
        if (setxattr(argv[2], "security.capability", cap, sizeof cap, 0)) {
            perror("setxattr security.capability");
            return 1;
        }
        return 0;
    }
    fprintf(stderr, "usage: helper euid | setcap FILE\n");
    return 2;
}
"""
#: what a hostile guest (root) does in a writable volume: ``sh -c PLANT_SCRIPT plant DIR
#: OWNER_UID [HELPER]``; every step may fail (that is the point), each reports its status
PLANT_SCRIPT = r"""
mkdir -p "$1" && cd "$1" || exit 1
o="$2"; h="$3"
cp /bin/busybox sbox; chmod u+s,g+s sbox; echo "sbox $?"
cp /bin/busybox sbox_root; chown 0:0 sbox_root; chmod 6755 sbox_root; echo "sbox_root $?"
mknod cdev c 1 3; echo "cdev $?"
mknod bdev b 7 0; echo "bdev $?"
mkfifo fifo; echo "fifo $?"
echo x > own0; chown 0:0 own0; echo "own0 $?"
echo x > own_owner; chown "$o:$o" own_owner; echo "own_owner $?"
mkdir -m 777 users; echo "users $?"
if [ -n "$h" ]; then
  cp "$h" suid; chmod 6755 suid; echo "suid $?"
  cp "$h" suid_owner; chown "$o:$o" suid_owner; chmod 6755 suid_owner; echo "suid_owner $?"
  cp "$h" suid_root; chown 0:0 suid_root; chmod 6755 suid_root; echo "suid_root $?"
  cp "$h" capbin; "$h" setcap capbin; echo "capbin $?"
fi
"""
#: planted executables and the arguments that make them print their euid
PLANTED_EXECUTABLES = {
    "sbox": ["id", "-u"],
    "sbox_root": ["id", "-u"],
    "suid": ["euid"],
    "suid_owner": ["euid"],
    "suid_root": ["euid"],
    "capbin": ["euid"],
}


def build_privilege_helper(where: Path) -> Path | None:
    """Compile :data:`PRIVILEGE_HELPER_C` static into ``where``; None when this host has no C
    compiler with a static libc (Debian: gcc, libc6-dev) — the checks that need it are then
    left out, the others still run."""
    return compile_static(where, "helper", PRIVILEGE_HELPER_C)


def _run_as_nobody(path: Path, args: list[str]) -> subprocess.CompletedProcess[str] | None:
    setpriv = shutil.which("setpriv")  # util-linux
    if setpriv is None or os.geteuid() != 0:
        return None
    return subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(path), *args],
        capture_output=True, text=True, timeout=30,
    )


def privilege_problems(planted: Path, owner: int | None) -> list[str]:
    """Everything under ``planted`` (what a guest wrote) that is host privilege, as readable
    lines: a setuid/setgid file, a device node, a ``security.capability`` xattr, a file not
    owned by ``owner`` (None: ownership not checked), a planted program that host user
    ``nobody`` (as root only) runs with euid 0."""
    problems: list[str] = []
    for path in sorted(planted.rglob("*")):
        st = path.lstat()
        name = str(path.relative_to(planted))
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(st.st_mode):
            problems.append(f"{name}: mode {stat.filemode(st.st_mode)} (setuid/setgid)")
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            problems.append(
                f"{name}: a device node {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} "
                f"({stat.filemode(st.st_mode)})"
            )
        if not stat.S_ISLNK(st.st_mode):
            try:
                os.getxattr(path, "security.capability", follow_symlinks=False)
                problems.append(f"{name}: has a security.capability xattr")
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
        if owner is not None and (st.st_uid, st.st_gid) != (owner, owner):
            problems.append(f"{name}: owned by {st.st_uid}:{st.st_gid}, not the owner {owner}")
    for exe, args in PLANTED_EXECUTABLES.items():
        if (planted / exe).is_file():
            got = _run_as_nobody(planted / exe, args)
            if got is not None and got.returncode == 0 and got.stdout.strip() == "0":
                problems.append(f"{exe}: host user nobody ran it with euid 0")
    return problems
