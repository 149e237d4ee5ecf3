"""Unpacking layer tarballs safely, the way a container runtime does.

A layer is untrusted input: its member names, symlinks and hardlinks must never let a write
land outside the target directory. Every path is resolved component by component *inside* the
target, with chroot semantics: a symlink on the way is followed as the container would see it
(an absolute link restarts at the target root, ``..`` stops at the root), so ``etc -> /etc``
followed by ``etc/passwd`` writes ``TARGET/etc/passwd``, never the host's. Member names holding
``..`` are refused outright: no honest layer has them. The final component is never followed:
extracting over an existing symlink replaces the link.

Two modes:

* ``merged`` — apply on top of what is already in the target (OCI whiteouts delete lower
  entries, opaque dirs clear lower contents). Used by the ``disk`` and ``merged`` strategies.
* ``overlay`` — unpack one layer into its own directory, turning whiteouts into the form
  overlayfs reads: ``.wh.NAME`` becomes a char device 0/0 named NAME and ``.wh..wh..opq``
  becomes the xattr ``trusted.overlay.opaque=y`` on its directory. Both need root on the host;
  the directories are shared read-only into the guest, whose overlayfs reads them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import attrs

from ..diskspace import ensure_free
from ..errors import ImageError
from .compression import DECODE_ERRORS, decompressed
from .oci import LAYER_MEDIA_TYPES

if TYPE_CHECKING:
    from .blobs import BlobStore
    from .model import Image

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_MAX_LINK_HOPS = 40
#: free space is re-checked after this many bytes of unpacked files (and before a big one)
SPACE_CHECK_EVERY = 32 * 1024 * 1024
#: xattrs a layer may set. trusted.* (overlayfs metadata!) and security.selinux are refused:
#: a layer must not be able to forge overlay redirects or host security labels.
_ALLOWED_XATTR_PREFIXES = ("user.", "security.capability")


@attrs.define
class ApplyStats:
    """What one layer did to the target: counts for progress, tests and diagnosis."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    devices: int = 0
    skipped_devices: int = 0
    bytes: int = 0


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _split_member(name: str, layer_name: str) -> list[str]:
    """Member name → path components inside the root. Leading '/' is dropped (as GNU tar
    and containerd do); any '..' is refused as hostile."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ImageError(
            f"layer {layer_name}: member {name!r} contains '..' and could escape the rootfs; "
            "refusing this layer (rebuild the image without such paths)"
        )
    if any("\0" in p for p in parts):
        raise ImageError(f"layer {layer_name}: member {name!r} contains NUL")
    return parts


def resolve_in_root(root: str, parts: list[str], *, follow_last: bool) -> list[str]:
    """Resolve ``parts`` under ``root`` with chroot semantics; return real components.

    Every symlink met on the way (and the last one only when ``follow_last``) is replaced by
    its target, read as if ``root`` were '/'. The result names a path whose parents, if they
    exist, are real directories inside ``root``.
    """
    todo = list(parts)
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        is_last = not todo
        current = os.path.join(root, *done, part)
        if (follow_last or not is_last) and os.path.islink(current):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise ImageError(f"too many levels of symlinks resolving {'/'.join(parts)!r}")
            link = os.readlink(current)
            if link.startswith("/"):
                done = []
            todo = link.split("/") + todo
            continue
        done.append(part)
    return done


def _remove(path: str) -> None:
    """Remove whatever is at path (never following a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class _Applier:
    def __init__(
        self,
        target: Path,
        layer_name: str,
        *,
        mode: str,
        size_limit: int | None,
        allow_devices: bool,
    ) -> None:
        if mode not in ("merged", "overlay"):
            raise ValueError(f"unknown layer apply mode {mode!r}")
        self.root = os.path.realpath(target)
        self.layer = layer_name
        self.mode = mode
        self.size_limit = size_limit
        self.allow_devices = allow_devices
        self.is_root = _is_root()
        self.stats = ApplyStats()
        #: paths (relative, '/'-joined) this layer created: whiteouts/opaque only hit lower ones
        self.written: set[str] = set()
        #: every written path and all its ancestors, for the opaque-dir check
        self.touched: set[str] = set()
        self.dir_times: list[tuple[str, float]] = []
        #: bytes written since the last free-space check (starts "due": check the first file)
        self._unchecked = SPACE_CHECK_EVERY

    # -- paths -------------------------------------------------------------------------
    def _abs(self, parts: list[str]) -> str:
        return os.path.join(self.root, *parts)

    def _ensure_parents(self, parts: list[str]) -> None:
        for i in range(1, len(parts)):
            path = self._abs(parts[:i])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(
                    f"layer {self.layer}: {'/'.join(parts)!r} needs {'/'.join(parts[:i])!r} "
                    "to be a directory but it is not; the image is malformed"
                )

    def _target(self, member: tarfile.TarInfo) -> list[str]:
        parts = _split_member(member.name, self.layer)
        if not parts:
            return []
        parent = resolve_in_root(self.root, parts[:-1], follow_last=True)
        return [*parent, parts[-1]]

    # -- metadata ----------------------------------------------------------------------
    def _metadata(self, path: str, member: tarfile.TarInfo) -> None:
        is_link = member.issym()
        if self.is_root:
            os.lchown(path, member.uid, member.gid)
        if not is_link:
            # after chown: chown clears set-id bits, and a runtime keeps them
            os.chmod(path, member.mode & 0o7777)
        if self.is_root:
            for key, value in member.pax_headers.items():
                if not key.startswith("SCHILY.xattr."):
                    continue
                name = key[len("SCHILY.xattr.") :]
                if not name.startswith(_ALLOWED_XATTR_PREFIXES):
                    continue
                with contextlib.suppress(OSError):
                    os.setxattr(
                        path,
                        name,
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )
        if member.isdir():
            self.dir_times.append((path, member.mtime))
        else:
            with contextlib.suppress(OSError):
                os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    # -- entries -----------------------------------------------------------------------
    def apply(self, tar: tarfile.TarFile) -> ApplyStats:
        for member in tar:
            self._member(tar, member)
        for path, mtime in reversed(self.dir_times):
            with contextlib.suppress(OSError):
                os.utime(path, (mtime, mtime), follow_symlinks=False)
        return self.stats

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._target(member)
        if not parts:
            # the root itself ("./"): take its mode, never replace it
            if member.isdir():
                self._metadata(self.root, member)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
            return
        self._ensure_parents(parts)
        path = self._abs(parts)
        rel = "/".join(parts)
        if member.isdir():
            st = None
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                _remove(path)
                os.mkdir(path, 0o700)
            self.stats.dirs += 1
        elif member.isreg():
            if self.size_limit is not None and self.stats.bytes + member.size > self.size_limit:
                raise ImageError(
                    f"layer {self.layer} exceeds the size limit of {self.size_limit} bytes "
                    f"(at {member.name!r}); raise the limit or use a smaller image"
                )
            _remove(path)
            # a small gzip layer can decompress to anything: check space as the tree grows
            # (between checks at most SPACE_CHECK_EVERY more is written: the reserve covers it)
            self._unchecked += member.size
            if self._unchecked >= SPACE_CHECK_EVERY:
                ensure_free(self.root, member.size,
                            f"unpacking layer {self.layer}")
                self._unchecked = member.size
            src = tar.extractfile(member)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
            self.stats.files += 1
            self.stats.bytes += member.size
        elif member.issym():
            _remove(path)
            os.symlink(member.linkname, path)
            self.stats.symlinks += 1
        elif member.islnk():
            self._hardlink(member, parts, path)
            self._mark(rel)
            return  # a hardlink shares the target's metadata
        elif member.ischr() or member.isblk():
            if not (self.allow_devices and self.is_root):
                self.stats.skipped_devices += 1
                return
            _remove(path)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            self.stats.devices += 1
        elif member.isfifo():
            _remove(path)
            os.mkfifo(path, 0o600)
        else:
            return  # unknown types (e.g. GNU volume headers) carry no file
        self._mark(rel)
        self._metadata(path, member)

    def _mark(self, rel: str) -> None:
        self.written.add(rel)
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            self.touched.add("/".join(parts[:i]))

    def _hardlink(self, member: tarfile.TarInfo, parts: list[str], path: str) -> None:
        link_parts = _split_member(member.linkname, self.layer)
        src_parts = resolve_in_root(self.root, link_parts[:-1], follow_last=True) + link_parts[-1:]
        src = self._abs(src_parts)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise ImageError(
                f"layer {self.layer}: hardlink {member.name!r} points to {member.linkname!r}, "
                "which is not in the rootfs; the layer is malformed"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"layer {self.layer}: hardlink {member.name!r} points to a directory")
        if src_parts == parts:
            return
        _remove(path)
        os.link(src, path, follow_symlinks=False)
        self.stats.hardlinks += 1

    def _whiteout(self, parts: list[str]) -> None:
        parent = parts[:-1]
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self._ensure_parents([*parent, "x"])
            directory = self._abs(parent)
            self.stats.opaque_dirs += 1
            if self.mode == "overlay":
                self._need_root("an opaque directory")
                os.setxattr(directory, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
                return
            prefix = "/".join(parent)
            for name in os.listdir(directory):
                rel = f"{prefix}/{name}" if prefix else name
                if rel not in self.touched:
                    _remove(os.path.join(directory, name))
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name.startswith(WHITEOUT_PREFIX) or name in ("", ".", ".."):
            return  # other aufs metadata (.wh..wh.plnk …): nothing to do
        victim = [*parent, name]
        if "/".join(victim) in self.written:
            return  # whiteouts hide lower layers only
        self.stats.whiteouts += 1
        if self.mode == "overlay":
            self._need_root("a whiteout")
            self._ensure_parents(victim)
            path = self._abs(victim)
            _remove(path)
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            return
        _remove(self._abs(victim))

    def _need_root(self, what: str) -> None:
        if not self.is_root:
            raise ImageError(
                f"layer {self.layer} has {what}; the 'layers' rootfs strategy stores it as "
                "overlayfs expects (char device 0/0, trusted.overlay.* xattr), which needs root "
                "on the host; run as root or use --rootfs disk/merged"
            )


def apply_layer_stream(
    fileobj: BinaryIO,
    target_dir: Path,
    *,
    layer_name: str = "layer",
    mode: str = "merged",
    size_limit: int | None = None,
    allow_devices: bool = True,
) -> ApplyStats:
    """Apply an (optionally compressed) layer tar stream to ``target_dir``."""
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    applier = _Applier(
        Path(target_dir), layer_name, mode=mode, size_limit=size_limit, allow_devices=allow_devices
    )
    with decompressed(fileobj, layer_name) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                return applier.apply(tar)
        except DECODE_ERRORS as exc:
            raise ImageError(f"layer {layer_name} is not a valid tar archive: {exc}") from exc


def apply_layer(
    blob_path: Path,
    media_type: str,
    target_dir: Path,
    *,
    size_limit: int | None = None,
    mode: str = "merged",
    allow_devices: bool = True,
    layer_name: str | None = None,
) -> ApplyStats:
    """Apply the layer blob at ``blob_path`` to ``target_dir`` (see module doc for safety)."""
    if media_type and media_type not in LAYER_MEDIA_TYPES:
        raise ImageError(f"layer {blob_path.name}: unsupported media type {media_type!r}")
    with open(blob_path, "rb") as fh:
        return apply_layer_stream(
            fh,  # type: ignore[arg-type]
            target_dir,
            layer_name=layer_name or blob_path.name,
            mode=mode,
            size_limit=size_limit,
            allow_devices=allow_devices,
        )


def apply_layers_merged(
    image: Image,
    blobs: BlobStore,
    target: Path,
    *,
    size_limit: int | None = None,
    progress: Callable[[str, float | None], None] | None = None,
) -> list[ApplyStats]:
    """Apply every layer of ``image`` in order into one directory (blobs verified on read).

    ``blobs`` is the image store's blob store (``ImageStore.blobs``): unpacking needs the
    bytes, never the index.
    """
    out = []
    n = len(image.layers)
    for i, layer in enumerate(image.layers):
        if progress:
            progress(f"unpacking layer {i + 1}/{n} {layer.digest[7:19]}", i / max(n, 1))
        with blobs.open(layer.digest) as fh:
            out.append(
                apply_layer_stream(
                    fh, target, layer_name=layer.digest, mode="merged", size_limit=size_limit
                )
            )
    if progress:
        progress("layers unpacked", 1.0)
    return out


def unpack_layer_for_overlay(
    blobs: BlobStore, digest: str, target: Path, *, size_limit: int | None = None
) -> ApplyStats:
    """Unpack one layer into its own (empty) directory with overlayfs-style whiteouts."""
    with blobs.open(digest) as fh:
        return apply_layer_stream(
            fh, target, layer_name=digest, mode="overlay", size_limit=size_limit
        )
