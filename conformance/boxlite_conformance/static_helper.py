"""Small C programs the suite runs in a box, for what busybox cannot do, compiled static on
the host at test time (never a binary in git): the guest image has no libc to link against.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["COMPILER_PACKAGES", "OPEN_UNLINKED_C", "compile_static"]

#: Debian's packages for :func:`compile_static`, for skip reasons
COMPILER_PACKAGES = "gcc, libc6-dev"

#: ``helper PATH``: create PATH, write 10 bytes, unlink it while open, then ftruncate(fd, 4)
#: and fchmod(fd, 0600) on the descriptor; prints each failure, then ``size=N mode=M`` from
#: fstat. Exit 0 only when both calls worked (POSIX: an open file outlives its name).
OPEN_UNLINKED_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct stat st;
    int bad = 0, fd;
    if (argc != 2) { fprintf(stderr, "usage: helper PATH\n"); return 2; }
    fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { printf("open: %s\n", strerror(errno)); return 2; }
    if (write(fd, "0123456789", 10) != 10) { printf("write: %s\n", strerror(errno)); return 2; }
    if (unlink(argv[1]) != 0) { printf("unlink: %s\n", strerror(errno)); return 2; }
    if (ftruncate(fd, 4) != 0) { printf("ftruncate: %s\n", strerror(errno)); bad = 1; }
    if (fchmod(fd, 0600) != 0) { printf("fchmod: %s\n", strerror(errno)); bad = 1; }
    if (fstat(fd, &st) != 0) { printf("fstat: %s\n", strerror(errno)); return 1; }
    printf("size=%lld mode=%o\n", (long long)st.st_size, (unsigned)(st.st_mode & 07777));
    return bad;
}
"""


def compile_static(where: Path, name: str, source: str) -> Path | None:
    """Compile C ``source`` static into ``where/name``; None when this host has no C
    compiler with a static libc (:data:`COMPILER_PACKAGES`), bounded at 120 s."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    (where / f"{name}.c").write_text(source)
    try:
        subprocess.run(
            [gcc, "-static", "-O1", "-o", str(where / name), str(where / f"{name}.c")],
            check=True, timeout=120, capture_output=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return where / name
