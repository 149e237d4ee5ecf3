"""Reading image archives into the blob store: OCI layout dir, OCI archive tar, docker save tar.

Every importer ends the same way — an OCI manifest, its config and layer blobs in the blob
store — so everything downstream (rootfs strategies, the index) only ever sees OCI. Importers
touch no database rows: the store writes the index in one transaction once an importer has
returned, so a failure half way leaves at most verified blobs (a harmless cache) behind.

Below the store (see the package docstring for the dependency direction): importers know
blobs, media types and local names, never the index.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import attrs

from ..diskspace import ensure_free
from ..errors import ConfigError, ImageError
from ..fscopy import open_regular
from ..models import JsonObject, JsonValue
from .blobs import BlobStore, check_digest
from .compression import check_layer, sniff_media_type
from .oci import (
    INDEX_TYPES,
    LAYER_MEDIA_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    REF_ANNOTATIONS,
    canonical_json,
    host_arch,
)
from .reference import normalize_reference

#: a manifest or config bigger than this is not an image we want to parse
MAX_JSON = 8 * 1024 * 1024
#: links followed to reach one archive member (the kernel's limit for a path, 40)
MAX_LINK_HOPS = 40

ProgressFn = Callable[[str, float | None], None]


@attrs.frozen
class Imported:
    """An image whose blobs are all in the store; what the index needs to record it."""

    manifest_digest: str
    manifest: JsonObject
    manifest_bytes: bytes
    config_digest: str
    config: JsonObject
    config_bytes: bytes
    #: reference names the archive itself carries (docker RepoTags, OCI ref annotations)
    names: tuple[str, ...] = ()


# -- sources: a directory or a tar, read by relative path ----------------------------------
class _Source:
    label: str

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        raise NotImplementedError
        yield  # pragma: no cover

    def read_json(self, rel: str) -> JsonValue:
        if not self.exists(rel):
            raise ImageError(f"{self.label}: {rel} is missing; this is not a complete image")
        with self.open(rel) as fh:
            data = fh.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageError(f"{self.label}: {rel} is larger than {MAX_JSON} bytes")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ImageError(f"{self.label}: {rel} is not valid JSON ({exc})") from exc


def _norm(rel: str) -> str:
    return str(PurePosixPath("/", rel)).lstrip("/")


class _DirSource(_Source):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.label = str(root)

    def _path(self, rel: str) -> Path:
        path = (self.root / _norm(rel)).resolve()
        if not path.is_relative_to(self.root):
            raise ImageError(f"{self.label}: {rel!r} points outside the image directory")
        return path

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        # a device node or FIFO named like a blob is refused, never read (finding 9)
        try:
            fh = open_regular(self._path(rel), f"image {self.label}")
        except ConfigError as exc:
            raise ImageError(str(exc)) from None
        with fh:
            yield fh


class _TarSource(_Source):
    def __init__(self, path: Path) -> None:
        self.label = str(path)
        try:
            self._fh = open_regular(path, "image import")
        except ConfigError as exc:
            raise ImageError(str(exc)) from None
        try:
            self.tar = tarfile.open(fileobj=self._fh, mode="r:*")  # noqa: SIM115
            members = self.tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ImageError(f"{path} is not a readable tar archive ({exc})") from exc
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            self.members[_norm(member.name)] = member

    def _resolve(self, rel: str) -> tarfile.TarInfo | None:
        """The regular member that ``rel`` names, following links inside the archive.

        ``docker save`` writes one copy of identical layers and links the others to it
        (``ID/layer.tar -> ../OTHER/layer.tar``; skopeo: ``../DIGEST.tar``), so links are
        followed the way a file system would after extraction, but lexically and never
        leaving the archive: a symlink's target is read relative to its own directory, ``..``
        is collapsed, a hardlink names a member from the archive root, and a link on a
        directory on the way is followed too.

        Returns None when nothing (or no regular file) is there. Raises ImageError for a link
        that climbs out of the archive (``..`` past its root, or an absolute target) and for
        a chain longer than :data:`MAX_LINK_HOPS` (a loop).
        """
        todo = [p for p in rel.split("/") if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                if not done:
                    raise ImageError(
                        f"{self.label}: {rel!r} leads outside the archive through a link; "
                        "the archive is malformed: save the image again"
                    )
                done.pop()
                continue
            member = self.members.get("/".join([*done, part]))
            if member is None or not (member.issym() or member.islnk()):
                done.append(part)
                continue
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise ImageError(
                    f"{self.label}: {rel!r}: more than {MAX_LINK_HOPS} links to follow (a link "
                    "loop); the archive is malformed: save the image again"
                )
            target = member.linkname
            if target.startswith("/"):
                raise ImageError(
                    f"{self.label}: {member.name!r} links to the absolute path {target!r}, "
                    "outside the archive; the archive is malformed: save the image again"
                )
            if member.islnk():  # a hardlink names a member from the archive root
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
        member = self.members.get("/".join(done))
        return member if member is not None and member.isreg() else None

    def exists(self, rel: str) -> bool:
        return self._resolve(rel) is not None

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        member = self._resolve(rel)
        if member is None:
            raise ImageError(f"{self.label}: {rel} is missing from the archive")
        fh = self.tar.extractfile(member)
        assert fh is not None
        yield fh  # type: ignore[misc]

    def close(self) -> None:
        self.tar.close()
        self._fh.close()


# -- OCI layout ------------------------------------------------------------------------------
def _blob_rel(digest: str) -> str:
    algo, _, hexpart = check_digest(digest).partition(":")
    return f"blobs/{algo}/{hexpart}"


def _descriptor(desc: JsonValue, where: str) -> tuple[str, str, int]:
    if not isinstance(desc, dict):
        raise ImageError(f"{where}: descriptor is not an object")
    try:
        digest = check_digest(desc["digest"])
        media_type = str(desc.get("mediaType", ""))
        size = int(desc.get("size", -1))
    except KeyError as exc:
        raise ImageError(f"{where}: descriptor lacks {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ImageError(f"{where}: bad descriptor ({exc})") from exc
    return digest, media_type, size


def _copy_blob(src: _Source, blobs: BlobStore, digest: str, size: int) -> None:
    rel = _blob_rel(digest)
    if blobs.exists(digest):
        return
    if not src.exists(rel):
        raise ImageError(f"{src.label}: blob {digest} is missing ({rel}); the image is incomplete")
    with src.open(rel) as fh:
        _, got = blobs.put_stream(fh, expected_digest=digest,
                                  size_hint=size if size > 0 else None)
    if size >= 0 and got != size:
        blobs.delete(digest)
        raise ImageError(f"{src.label}: blob {digest} has {got} bytes, descriptor says {size}")


def _read_blob_json(
    src: _Source, blobs: BlobStore, digest: str, size: int
) -> tuple[JsonValue, bytes]:
    _copy_blob(src, blobs, digest, size)
    data = blobs.read_bytes(digest)
    if len(data) > MAX_JSON:
        raise ImageError(f"{src.label}: {digest} is too large for a manifest/config")
    try:
        return json.loads(data), data
    except ValueError as exc:
        raise ImageError(f"{src.label}: blob {digest} is not valid JSON ({exc})") from exc


def _platform_ok(desc: JsonObject, arch: str) -> bool:
    plat = desc.get("platform")
    if not isinstance(plat, dict):
        return True
    return plat.get("os", "linux") == "linux" and plat.get("architecture") == arch


def _entry_names(desc: JsonObject) -> tuple[str, ...]:
    notes = desc.get("annotations") or {}
    out = []
    for key in REF_ANNOTATIONS:
        value = notes.get(key)
        if isinstance(value, str) and value:
            out.append(value)
    return tuple(out)


def _pick(entries: JsonValue, where: str, arch: str, want: str | None) -> JsonObject:
    """Choose one manifest: the host architecture's, or the one whose ref annotation matches."""
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{where}: index lists no manifests")
    usable = [e for e in entries if isinstance(e, dict) and _platform_ok(e, arch)]
    if not usable:
        plats = sorted(
            f"{(e.get('platform') or {}).get('os')}/{(e.get('platform') or {}).get('architecture')}"
            for e in entries
            if isinstance(e, dict)
        )
        raise ImageError(
            f"{where}: no manifest for linux/{arch} (has: {', '.join(plats)}); "
            f"export the image for linux/{arch}"
        )
    if want and len(usable) > 1:
        named = [
            e
            for e in usable
            if any(normalize_reference(n) == normalize_reference(want) for n in _entry_names(e))
        ]
        usable = named or usable
    return usable[0]


def import_oci(
    src: _Source, blobs: BlobStore, *, want: str | None = None, progress: ProgressFn | None = None
) -> Imported:
    layout = src.read_json("oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise ImageError(f"{src.label}: oci-layout has no imageLayoutVersion")
    index = src.read_json("index.json")
    if not isinstance(index, dict):
        raise ImageError(f"{src.label}: index.json is not an object")
    arch = host_arch()
    desc = _pick(index.get("manifests"), f"{src.label}: index.json", arch, want)
    names = _entry_names(desc)
    for _depth in range(4):  # nested indexes (docker's layouts nest one level)
        digest, media_type, size = _descriptor(desc, f"{src.label}: manifest descriptor")
        doc, raw = _read_blob_json(src, blobs, digest, size)
        kind = media_type or (doc.get("mediaType", "") if isinstance(doc, dict) else "")
        if kind in INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc):
            desc = _pick(doc.get("manifests"), f"{src.label}: index {digest}", arch, want)
            names = names or _entry_names(desc)
            continue
        break
    else:
        raise ImageError(f"{src.label}: image indexes nest too deeply")
    if not isinstance(doc, dict) or "layers" not in doc or "config" not in doc:
        raise ImageError(f"{src.label}: manifest {digest} lacks config or layers")
    manifest_digest, manifest = digest, doc
    cfg_digest, _cfg_type, cfg_size = _descriptor(doc["config"], f"{src.label}: config")
    config, config_raw = _read_blob_json(src, blobs, cfg_digest, cfg_size)
    if not isinstance(config, dict):
        raise ImageError(f"{src.label}: config {cfg_digest} is not an object")
    layers = doc["layers"]
    if not isinstance(layers, list):
        raise ImageError(f"{src.label}: manifest {digest}: layers is not a list")
    digests = []
    for i, layer in enumerate(layers):
        ldigest, ltype, lsize = _descriptor(layer, f"{src.label}: layer {i}")
        if ltype not in LAYER_MEDIA_TYPES:
            raise ImageError(f"{src.label}: layer {i} has unsupported media type {ltype!r}")
        if progress:
            progress(f"copying layer {i + 1}/{len(layers)}", i / max(len(layers), 1))
        _copy_blob(src, blobs, ldigest, lsize)
        digests.append(ldigest)
    check_layers(blobs, digests, config, src.label, progress)
    return Imported(manifest_digest, manifest, raw, cfg_digest, config, config_raw, names)


def config_diff_ids(config: JsonObject, layers: int, label: str) -> list[str | None]:
    """The config's ``rootfs.diff_ids``, one per layer (None each when the config lists none).

    Raises:
        ImageError: the config lists a different number of layers than the manifest.
    """
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not diff_ids:
        return [None] * layers
    if not isinstance(diff_ids, list):
        raise ImageError(f"{label}: the config's rootfs.diff_ids is not a list")
    if len(diff_ids) != layers:
        raise ImageError(
            f"{label}: the config lists {len(diff_ids)} layers (rootfs.diff_ids), the "
            f"manifest {layers}; the image is damaged"
        )
    return [str(x) for x in diff_ids]


def check_layers(
    blobs: BlobStore,
    digests: list[str],
    config: JsonObject,
    label: str,
    progress: ProgressFn | None = None,
) -> None:
    """Decode every layer blob now and compare it with the config's diff ID
    (:func:`.compression.check_layer`): a damaged layer fails its import or pull, never a
    box start.

    Raises:
        ImageError: a layer does not decode or does not match its diff ID.
    """
    diff_ids = config_diff_ids(config, len(digests), label)
    for i, (digest, diff_id) in enumerate(zip(digests, diff_ids, strict=True)):
        if progress:
            progress(f"checking layer {i + 1}/{len(digests)}", i / max(len(digests), 1))
        check_layer(blobs, digest, diff_id, label)


# -- docker save -----------------------------------------------------------------------------
def import_docker_save(
    src: _Source, blobs: BlobStore, *, want: str | None = None, progress: ProgressFn | None = None
) -> Imported:
    entries = src.read_json("manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{src.label}: manifest.json lists no images")
    entry = entries[0]
    if len(entries) > 1:
        matches = [
            e
            for e in entries
            if want
            and any(
                normalize_reference(t) == normalize_reference(want) for t in e.get("RepoTags") or ()
            )
        ]
        if not matches:
            tags = [t for e in entries for t in (e.get("RepoTags") or ["<untagged>"])]
            raise ImageError(
                f"{src.label} holds {len(entries)} images ({', '.join(tags)}); "
                "pass the name of the one to import"
            )
        entry = matches[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
        raise ImageError(f"{src.label}: manifest.json entry lacks Config")
    layer_files = entry.get("Layers")
    if not isinstance(layer_files, list) or not all(isinstance(x, str) for x in layer_files):
        raise ImageError(f"{src.label}: manifest.json entry lacks a Layers list")
    config = src.read_json(entry["Config"])
    if not isinstance(config, dict):
        raise ImageError(f"{src.label}: {entry['Config']} is not an object")
    with src.open(entry["Config"]) as fh:
        config_raw = fh.read()
    cfg_digest, cfg_size = blobs.put_bytes(config_raw)
    config_diff_ids(config, len(layer_files), src.label)  # refuse a count mismatch up front
    layer_descs = []
    for i, rel in enumerate(layer_files):
        if progress:
            progress(f"copying layer {i + 1}/{len(layer_files)}", i / max(len(layer_files), 1))
        if not src.exists(rel):
            raise ImageError(f"{src.label}: layer {rel} is missing from the archive")
        with src.open(rel) as fh:
            digest, size = blobs.put_stream(fh)
        with open(blobs.path(digest), "rb") as head:
            media_type = sniff_media_type(head.read(4))
        layer_descs.append({"mediaType": media_type, "digest": digest, "size": size})
    check_layers(blobs, [x["digest"] for x in layer_descs], config, src.label, progress)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": layer_descs,
    }
    raw = canonical_json(manifest)
    digest, _ = blobs.put_bytes(raw)
    names = tuple(t for t in entry.get("RepoTags") or () if isinstance(t, str))
    return Imported(digest, manifest, raw, cfg_digest, config, config_raw, names)


def _source_bytes(path: Path) -> int:
    """Bytes of an image source: the tar's size, or the regular files of a layout dir."""
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def import_any(
    path: Path, blobs: BlobStore, *, want: str | None = None, progress: ProgressFn | None = None
) -> Imported:
    """Detect the format of ``path`` and import it (blobs only; no index rows)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path} does not exist; pass an OCI layout dir or an image tar")
    src: _Source = _DirSource(path) if path.is_dir() else _TarSource(path)
    try:
        # the blobs take at most what the source holds: refuse up front, not at ENOSPC
        ensure_free(blobs.tmp, _source_bytes(path), f"importing image {path}")
        if src.exists("oci-layout") and src.exists("index.json"):
            return import_oci(src, blobs, want=want, progress=progress)
        if src.exists("manifest.json"):
            return import_docker_save(src, blobs, want=want, progress=progress)
        raise ImageError(
            f"{path} is neither an OCI image layout (oci-layout + index.json) nor a "
            "`docker save` archive (manifest.json)"
        )
    finally:
        if isinstance(src, _TarSource):
            src.close()
