"""Built-in images, made locally from distribution packages: no registry, no network.

``busybox:latest`` is Debian's ``busybox-static`` binary plus its applet links and the few
files a shell expects (/etc/passwd, /tmp, …), packed as one deterministic layer (sorted
entries, fixed mtime, root-owned) so the same binary always yields the same image digest.
It goes through the ordinary OCI-layout importer: the built-in path tests the real one.

Below the store (see the package docstring for the dependency direction): a builder writes an
OCI image layout into a directory it is given and returns its path; the store imports it
like any other layout. So this module never sees the index.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from ..errors import ToolMissingError
from ..fscopy import copy_file
from ..models import JsonObject, JsonValue
from ..tools import find_tool, run
from .blobs import sha256_bytes, sha256_file
from .oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, canonical_json, host_arch

#: a built-in image's builder: writes an OCI image layout under the (empty, private) work
#: directory it is given and returns the layout's path
BuiltinBuilder: TypeAlias = Callable[[Path], Path]

FIXED_MTIME = 946684800  # 2000-01-01: deterministic layers
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH_ENV = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _is_static_elf(path: Path) -> bool:
    """True for an ELF without a PT_INTERP header (it runs without a libc in the rootfs)."""
    try:
        with open(path, "rb") as fh:
            ident = fh.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
                return False
            end = "<" if ident[5] == 1 else ">"
            phoff = struct.unpack(end + "Q", ident[32:40])[0]
            phentsize, phnum = struct.unpack(end + "HH", ident[54:58])
            fh.seek(phoff)
            for _ in range(phnum):
                entry = fh.read(phentsize)
                if struct.unpack(end + "I", entry[:4])[0] == 3:  # PT_INTERP
                    return False
            return True
    except (OSError, struct.error, IndexError):
        return False


def find_static_busybox(workdir: Path) -> Path:
    """The host's static busybox, else one unpacked from ``apt-get download busybox-static``."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if _is_static_elf(Path(candidate)):
            return Path(candidate)
    apt = find_tool("apt-get")
    dpkg = find_tool("dpkg-deb")
    if apt and dpkg:
        dl = workdir / "deb"
        dl.mkdir()
        proc = run([apt, "download", BUSYBOX_PACKAGE], cwd=dl, check=False, timeout=300)
        debs = sorted(dl.glob("busybox-static_*.deb"))
        if proc.returncode == 0 and debs:
            out = workdir / "pkg"
            run([dpkg, "-x", debs[0], out], timeout=120)
            for rel in ("bin/busybox", "usr/bin/busybox"):
                if _is_static_elf(out / rel):
                    return out / rel
    raise ToolMissingError("busybox (static)", BUSYBOX_PACKAGE, "build the built-in busybox image")


def build_busybox_rootfs(busybox: Path, root: Path) -> None:
    """Lay out a minimal busybox root filesystem in ``root``."""
    for d, mode in (
        ("bin", 0o755), ("sbin", 0o755), ("usr", 0o755), ("usr/bin", 0o755),
        ("usr/sbin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777),
        ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("var", 0o755), ("home", 0o755),
    ):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    copy_file(busybox, root / "bin/busybox", "built-in busybox image", preserve=False)
    os.chmod(root / "bin/busybox", 0o755)
    listing = run([busybox, "--list-full"], timeout=30).stdout.decode().split()
    for rel in sorted(set(listing)):
        rel = rel.strip("/")
        if not rel or ".." in rel.split("/") or rel == "bin/busybox":
            continue
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    for rel, text in (
        ("etc/passwd", _PASSWD),
        ("etc/group", _GROUP),
        ("etc/hostname", "box\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost box\n::1\tlocalhost\n"),
    ):
        (root / rel).write_text(text)
        os.chmod(root / rel, 0o644)


def deterministic_layer(root: Path, out: Path) -> None:
    """Pack ``root`` into an uncompressed tar: sorted, root-owned, fixed mtime."""

    def entries(base: Path) -> list[Path]:
        result = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                result.append(Path(dirpath, name))
        return sorted(result, key=lambda p: p.relative_to(base).as_posix())

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in entries(root):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = FIXED_MTIME
            if info.isreg():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)


def write_oci_layout(
    dest: Path, layer_tars: list[Path], config: JsonObject, ref_name: str | None = None
) -> str:
    """Write an OCI image layout with uncompressed tar layers; return the manifest digest."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers: list[JsonValue] = []
    diff_ids: list[JsonValue] = []
    for tar_path in layer_tars:
        digest = sha256_file(tar_path)
        copy_file(tar_path, blobs / digest[7:], "built-in image layer", preserve=False)
        layers.append(
            {"mediaType": OCI_LAYER_TAR, "digest": digest, "size": tar_path.stat().st_size}
        )
        diff_ids.append(digest)
    config = {**config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_raw = canonical_json(config)
    config_digest = sha256_bytes(config_raw)
    (blobs / config_digest[7:]).write_bytes(config_raw)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": layers,
    }
    raw = canonical_json(manifest)
    digest = sha256_bytes(raw)
    (blobs / digest[7:]).write_bytes(raw)
    desc: JsonObject = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(raw)}
    if ref_name:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                    "manifests": [desc]})
    )  # fmt: skip
    return digest


def busybox_config() -> JsonObject:
    return {
        "architecture": host_arch(),
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "config": {"Env": [BUSYBOX_PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"},
    }


def build_busybox_layout(work: Path) -> Path:
    """Lay out ``busybox:latest`` (from the host's busybox-static) as an OCI layout in ``work``.

    Raises:
        ToolMissingError: no static busybox on the host and none to download.
    """
    busybox = find_static_busybox(work)
    root = work / "rootfs"
    root.mkdir()
    build_busybox_rootfs(busybox, root)
    layer = work / "layer.tar"
    deterministic_layer(root, layer)
    layout = work / "layout"
    write_oci_layout(layout, [layer], busybox_config(), "busybox:latest")
    return layout


#: built-in images by normalised reference; the store builds one on first use
BUILTIN_IMAGES: dict[str, BuiltinBuilder] = {
    "busybox:latest": build_busybox_layout,
}

__all__ = [
    "BUILTIN_IMAGES",
    "BuiltinBuilder",
    "build_busybox_layout",
    "deterministic_layer",
    "write_oci_layout",
]
