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
  overlayfs reads: ``.wh.NAME`` becomes a char device 0/0 named NAME (needs root on the host)
  and ``.wh..wh..opq`` the xattr ``user.overlay.opaque=y`` on its directory (the guest mounts
  with ``userxattr``). The directories are shared read-only into the guest, whose overlayfs
  stacks them. Paths are looked up through the lower layers' directories
  (:class:`.overlay_view.LayerView`) so the stack shows what ``merged`` shows: a symlink on
  the way that only a lower layer has is followed, a parent directory this layer lacks is
  made with the lower one's owner, mode and xattrs (containerd's ``mkparent``), a hardlink to
  a file only a lower layer has copies that file up into this layer first (what extracting
  through an overlay mount does), a directory that replaces an entry this layer whited out
  is made opaque, and a whiteout of nothing below is left out.

xattrs named ``user.overlay.*`` are dropped from every layer in both modes: overlayfs reads
them as its own metadata, and the three strategies must show the same files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import attrs

from ..diskspace import ensure_free
from ..errors import ImageError
from .compression import DECODE_ERRORS, decompressed
from .oci import LAYER_MEDIA_TYPES
from .overlay_view import (
    OVERLAY_OPAQUE_XATTR,
    OVERLAY_XATTR_PREFIX,
    Entry,
    LayerView,
    is_whiteout,
)

if TYPE_CHECKING:
    from .blobs import BlobStore
    from .model import Image

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: free space is re-checked after this many bytes of unpacked files (and before a big one)
SPACE_CHECK_EVERY = 32 * 1024 * 1024
#: xattrs a layer may set. trusted.* and user.overlay.* (overlayfs metadata!) and
#: security.selinux are refused: a layer must not forge overlay redirects or host labels.
_ALLOWED_XATTR_PREFIXES = ("user.", "security.capability")


def _layer_may_set(name: str) -> bool:
    return name.startswith(_ALLOWED_XATTR_PREFIXES) and not name.startswith(OVERLAY_XATTR_PREFIX)


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

    Raises:
        ImageError: more than 40 symlinks on the way (a loop).
    """
    return LayerView((root,), overlay=False).resolve(parts, follow_last=follow_last)


def _remove(path: str) -> os.stat_result | None:
    """Remove whatever is at path (never following a symlink); return what it was."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return st


class _Applier:
    def __init__(
        self,
        target: Path,
        layer_name: str,
        *,
        mode: str,
        size_limit: int | None,
        allow_devices: bool,
        lowers: Sequence[Path] = (),
    ) -> None:
        if mode not in ("merged", "overlay"):
            raise ValueError(f"unknown layer apply mode {mode!r}")
        self.root = os.path.realpath(target)
        self.overlay = mode == "overlay"
        #: this layer's directory on top of the lower layers' (overlay), or the target alone
        self.view = LayerView((self.root, *map(str, lowers)), overlay=self.overlay)
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
        #: lower layer index → inode → its paths there (hardlink groups, built when needed)
        self._inodes: dict[int, dict[int, list[list[str]]]] = {}
        #: member parent → its resolved components; most members share a few parents, and a
        #: lookup through every layer is the costly part (cleared by whatever changes one)
        self._parents: dict[tuple[str, ...], list[str]] = {}

    # -- paths -------------------------------------------------------------------------
    def _abs(self, parts: list[str]) -> str:
        return os.path.join(self.root, *parts)

    def _ensure_parents(self, parts: list[str]) -> None:
        """Make the missing parent directories of ``parts`` in this layer. In overlay mode a
        parent a lower layer has is made with its owner, mode and xattrs (else the stack
        would show this layer's default ones over it), and one this layer whited out is
        made opaque (what was below it stays deleted)."""
        for i in range(1, len(parts)):
            path = self._abs(parts[:i])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and self.overlay and is_whiteout(st):
                os.unlink(path)
                self._changed()
                os.mkdir(path, 0o755)
                os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
                continue
            if st is None:
                below = self.view.lookup(parts[:i], start=1) if self.overlay else None
                if below is None or stat.S_ISDIR(below.st.st_mode):
                    os.mkdir(path, 0o755)
                    if below is not None:
                        self._copy_attributes(below, path)
                    continue
                st = below.st  # a lower non-directory: as malformed as in merged mode
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(
                    f"layer {self.layer}: {'/'.join(parts)!r} needs {'/'.join(parts[:i])!r} "
                    "to be a directory but it is not; the image is malformed"
                )

    def _target(self, member: tarfile.TarInfo) -> list[str]:
        parts = _split_member(member.name, self.layer)
        if not parts:
            return []
        key = tuple(parts[:-1])
        parent = self._parents.get(key)
        if parent is None:
            parent = self._parents[key] = self.view.resolve(parts[:-1], follow_last=True)
        return [*parent, parts[-1]]

    def _replace(self, path: str) -> None:
        """Remove what is at ``path`` before something new goes there. Only a regular file
        never changes how a path resolves; anything else forgets the resolved parents."""
        old = _remove(path)
        if old is not None and not stat.S_ISREG(old.st_mode):
            self._changed()

    def _changed(self) -> None:
        """A symlink, directory, whiteout or opaque mark changed: resolve parents anew."""
        self._parents.clear()

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
                if not _layer_may_set(name):
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
                self._replace(path)
                os.mkdir(path, 0o700)
                if st is not None and self.overlay and is_whiteout(st):
                    # re-created after this layer deleted it: nothing below may show through
                    os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            self.stats.dirs += 1
        elif member.isreg():
            if self.size_limit is not None and self.stats.bytes + member.size > self.size_limit:
                raise ImageError(
                    f"layer {self.layer} exceeds the size limit of {self.size_limit} bytes "
                    f"(at {member.name!r}); raise the limit or use a smaller image"
                )
            self._replace(path)
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
            self._replace(path)
            os.symlink(member.linkname, path)
            self._changed()
            self.stats.symlinks += 1
        elif member.islnk():
            self._hardlink(member, parts, path)
            self._mark(rel)
            return  # a hardlink shares the target's metadata
        elif member.ischr() or member.isblk():
            if not (self.allow_devices and self.is_root):
                self.stats.skipped_devices += 1
                return
            self._replace(path)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            self.stats.devices += 1
        elif member.isfifo():
            self._replace(path)
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
        src_parts = self.view.resolve(link_parts[:-1], follow_last=True) + link_parts[-1:]
        entry = self.view.lookup(src_parts)
        if entry is None:
            raise ImageError(
                f"layer {self.layer}: hardlink {member.name!r} points to {member.linkname!r}, "
                "which is not in the rootfs; the layer is malformed"
            )
        if stat.S_ISDIR(entry.st.st_mode):
            raise ImageError(f"layer {self.layer}: hardlink {member.name!r} points to a directory")
        if src_parts == parts:
            return
        if entry.layer != 0:  # overlay mode, the file is a lower layer's: copy it up first
            self._copy_up(src_parts, entry)
        self._replace(path)
        os.link(self._abs(src_parts), path, follow_symlinks=False)
        self._changed()  # a link to a symlink is one
        self.stats.hardlinks += 1

    def _copy_up(self, parts: list[str], entry: Entry) -> None:
        """Copy a lower layer's non-directory ``entry`` into this layer at ``parts``: owner,
        mode, xattrs and mtime kept (overlayfs copies up the same way before it links).

        The file's other names in that layer that the stack still shows are linked to the
        copy too, so a link chain across layers counts every name, as one directory does.
        """
        self._copy_file(parts, entry)
        self._changed()
        if entry.st.st_nlink < 2:
            return
        for other in self._names_of(entry):
            shown = self.view.lookup(other, start=1)
            if other == parts or shown is None or shown.layer != entry.layer:
                continue
            if shown.st.st_ino != entry.st.st_ino or os.path.lexists(self._abs(other)):
                continue
            self._ensure_parents(other)
            os.link(self._abs(parts), self._abs(other), follow_symlinks=False)

    def _names_of(self, entry: Entry) -> list[list[str]]:
        """Every path (components) of ``entry``'s inode in its layer's directory."""
        if entry.layer not in self._inodes:
            names: dict[int, list[list[str]]] = {}
            top = self.view.roots[entry.layer]
            for dirpath, _dirs, files in os.walk(top):
                rel = os.path.relpath(dirpath, top)
                base = [] if rel == "." else rel.split(os.sep)
                for name in files:
                    st = os.lstat(os.path.join(dirpath, name))
                    if st.st_nlink > 1:
                        names.setdefault(st.st_ino, []).append([*base, name])
            self._inodes[entry.layer] = names
        return self._inodes[entry.layer].get(entry.st.st_ino, [])

    def _copy_file(self, parts: list[str], entry: Entry) -> None:
        self._ensure_parents(parts)
        dst = self._abs(parts)
        mode = entry.st.st_mode
        if stat.S_ISREG(mode):
            ensure_free(self.root, entry.st.st_size, f"unpacking layer {self.layer}")
            shutil.copyfile(entry.path, dst, follow_symlinks=False)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry.path), dst)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:  # a device node below (only made by root with allow_devices)
            os.mknod(dst, stat.S_IFMT(mode) | 0o600, entry.st.st_rdev)
        self._copy_attributes(entry, dst)

    def _copy_attributes(self, entry: Entry, dst: str) -> None:
        """Owner, mode, the xattrs a layer may set, and mtime of ``entry`` onto ``dst``."""
        st = entry.st
        if self.is_root:
            os.lchown(dst, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(dst, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
        if self.is_root:
            for name in os.listxattr(entry.path, follow_symlinks=False):
                if _layer_may_set(name):
                    value = os.getxattr(entry.path, name, follow_symlinks=False)
                    with contextlib.suppress(OSError):
                        os.setxattr(dst, name, value, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self.dir_times.append((dst, st.st_mtime))
        else:
            with contextlib.suppress(OSError):
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _whiteout(self, parts: list[str]) -> None:
        self._changed()
        parent = parts[:-1]
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self._ensure_parents([*parent, "x"])
            directory = self._abs(parent)
            self.stats.opaque_dirs += 1
            self._clear_lower(parent)
            if self.overlay:
                os.setxattr(directory, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name.startswith(WHITEOUT_PREFIX) or name in ("", ".", ".."):
            return  # other aufs metadata (.wh..wh.plnk …): nothing to do
        victim = [*parent, name]
        if "/".join(victim) in self.written:
            return  # whiteouts hide lower layers only
        self._replace(self._abs(victim))
        if self.overlay and self.view.lookup(victim, start=1) is None:
            return  # nothing below to hide: no marker (merged mode has nothing to delete)
        self.stats.whiteouts += 1
        if self.overlay:
            self._need_root("a whiteout")
            self._ensure_parents(victim)
            os.mknod(self._abs(victim), stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def _clear_lower(self, parts: list[str]) -> None:
        """Remove under ``parts`` everything this layer did not write, at any depth: an opaque
        directory hides every lower entry below it, also inside a subdirectory this layer
        writes into (containerd removes what is not in its unpacked paths the same way). In
        overlay mode what is there unwritten is a copied-up hardlink target."""
        prefix = "/".join(parts)
        directory = self._abs(parts)
        for name in os.listdir(directory):
            rel = f"{prefix}/{name}" if prefix else name
            path = os.path.join(directory, name)
            if rel not in self.touched:
                self._replace(path)
            elif stat.S_ISDIR(os.lstat(path).st_mode):
                self._clear_lower([*parts, name])

    def _need_root(self, what: str) -> None:
        if not self.is_root:
            raise ImageError(
                f"layer {self.layer} has {what}; the 'layers' rootfs strategy stores it as "
                "overlayfs expects (a char device 0/0), which needs root on the host; run as "
                "root or use --rootfs disk/merged"
            )


def apply_layer_stream(
    fileobj: BinaryIO,
    target_dir: Path,
    *,
    layer_name: str = "layer",
    mode: str = "merged",
    size_limit: int | None = None,
    allow_devices: bool = True,
    lowers: Sequence[Path] = (),
) -> ApplyStats:
    """Apply an (optionally compressed) layer tar stream to ``target_dir``.

    ``lowers`` (overlay mode): the directories of the layers below, topmost first, each
    unpacked the same way; paths are looked up through them (see the module docs).
    """
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    applier = _Applier(
        Path(target_dir), layer_name, mode=mode, size_limit=size_limit,
        allow_devices=allow_devices, lowers=lowers,
    )  # fmt: skip
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
    blobs: BlobStore,
    digest: str,
    target: Path,
    *,
    lowers: Sequence[Path] = (),
    size_limit: int | None = None,
) -> ApplyStats:
    """Unpack one layer into its own (empty) directory with overlayfs-style whiteouts, on
    top of ``lowers`` (the directories of the layers below it, topmost first)."""
    with blobs.open(digest) as fh:
        return apply_layer_stream(
            fh, target, layer_name=digest, mode="overlay", size_limit=size_limit, lowers=lowers
        )
