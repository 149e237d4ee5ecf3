"""Builders for test images, written with tarfile + json only (independent of the importers)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import zstandard

T0 = 1_600_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry(kind: str, name: str, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "name": name, **kw}


def f(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> dict[str, Any]:
    if isinstance(data, str):
        data = data.encode()
    return entry("file", name, data=data, mode=mode, **kw)


def d(name: str, mode: int = 0o755, **kw: Any) -> dict[str, Any]:
    return entry("dir", name, mode=mode, **kw)


def sym(name: str, target: str) -> dict[str, Any]:
    return entry("symlink", name, target=target)


def hard(name: str, target: str) -> dict[str, Any]:
    return entry("hardlink", name, target=target)


def chrdev(name: str, major: int = 1, minor: int = 3) -> dict[str, Any]:
    return entry("chr", name, major=major, minor=minor)


def layer_tar(entries: list[dict[str, Any]]) -> bytes:
    """An uncompressed layer tar holding ``entries`` in the given order (an entry's
    ``xattrs`` ({name: value}) go in PAX ``SCHILY.xattr.*`` headers, as docker writes them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.mtime = T0
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            info.mode = e.get("mode", 0o644)
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.get("xattrs", {}).items()}
            data = None
            kind = e["kind"]
            if kind == "file":
                data = e["data"]
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e["target"]
                info.mode = 0o777
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = e["target"]
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = e["major"], e["minor"]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def zstd_compress(data: bytes, *, frames: int = 1, skippable: bytes = b"") -> bytes:
    """``data`` as ``frames`` concatenated zstd frames (zstd:chunked writes one per file),
    led by a skippable frame holding ``skippable`` when given (RFC 8878 3.1.2). Each frame
    carries its content checksum, as the zstd command line writes it."""
    out = b""
    if skippable:
        out += (0x184D2A50).to_bytes(4, "little") + len(skippable).to_bytes(4, "little")
        out += skippable
    step = max(1, -(-len(data) // frames))
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    for start in range(0, max(len(data), 1), step):
        out += cctx.compress(data[start : start + step])
    return out


def decode(raw: bytes) -> bytes:
    """A layer blob's tar bytes (gzip, zstd or plain): what its diff ID hashes."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:4] == ZSTD_MAGIC or raw[:4] == (0x184D2A50).to_bytes(4, "little"):
        dctx = zstandard.ZstdDecompressor()
        return dctx.stream_reader(io.BytesIO(raw), read_across_frames=True).read()
    return raw


def compress_layer(tar: bytes, codec: str | None) -> tuple[bytes, str]:
    """(blob, OCI media type) of a layer tar compressed with ``codec`` (gzip, zstd or None)."""
    if codec == "gzip":
        return gzip.compress(tar, mtime=0), OCI_LAYER + "+gzip"
    if codec == "zstd":
        return zstd_compress(tar), OCI_LAYER + "+zstd"
    if codec is None:
        return tar, OCI_LAYER
    raise ValueError(f"unknown codec {codec!r}")


def config_for(layers_raw: list[bytes], **cfg: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], **cfg},
        "rootfs": {"type": "layers", "diff_ids": [sha(decode(r)) for r in layers_raw]},
    }


def oci_layout_files(
    layers: list[bytes],
    *,
    ref: str | None = "test:1",
    gzip_layers: bool = True,
    codec: str | None = None,
    extra_platforms: tuple[str, ...] = (),
    damaged: dict[int, bytes] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """{relative path: bytes} of an OCI image layout. Layers are gzip-compressed, or stored
    as they are with ``gzip_layers=False``, or compressed with ``codec`` ("gzip", "zstd")
    when given. ``extra_platforms`` adds decoy manifests for other architectures (listed
    first, so picking the first would be wrong). ``damaged`` ({index: blob}) stores those
    bytes as layer ``index``: the manifest's digest matches them, the config keeps the
    intact layer's diff ID (an image damaged before it was saved or pushed). ``config``:
    keys of the image config's ``config`` object over the defaults (``Env`` PATH=/bin,
    ``Cmd`` sh); a key set to None is left out."""
    files: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        digest = sha(data)
        files[f"blobs/sha256/{digest[7:]}"] = data
        return digest

    if codec is None and gzip_layers:
        codec = "gzip"
    compressed = [compress_layer(x, codec) for x in layers]
    image_config = config_for([blob for blob, _mt in compressed], **(config or {}))
    image_config["config"] = {k: v for k, v in image_config["config"].items() if v is not None}
    cfg = json.dumps(image_config).encode()
    for i, blob in (damaged or {}).items():
        compressed[i] = (blob, compressed[i][1])
    layer_descs = [{"mediaType": mt, "digest": put(r), "size": len(r)} for r, mt in compressed]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(cfg),
                "size": len(cfg),
            },
            "layers": layer_descs,
        }
    ).encode()
    mdesc: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest),
        "size": len(manifest),
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    if ref:
        mdesc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    decoys = []
    for arch in extra_platforms:
        decoy = json.dumps({"schemaVersion": 2, "config": {}, "layers": [], "arch": arch}).encode()
        decoys.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(decoy),
                "size": len(decoy),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [*decoys, mdesc]}).encode()
    files["_manifest_digest"] = mdesc["digest"].encode()
    return files


def docker_save_files(
    layers: list[bytes], *, tags: list[str], blobs_style: bool = False
) -> dict[str, bytes]:
    """{relative path: bytes} of a `docker save` archive (legacy <id>/layer.tar or the
    newer blobs/sha256/<hex> naming)."""
    files: dict[str, bytes] = {}
    layer_paths = []
    for i, raw in enumerate(layers):
        rel = f"blobs/sha256/{sha(raw)[7:]}" if blobs_style else f"{i:064x}/layer.tar"
        files[rel] = raw
        layer_paths.append(rel)
    cfg = json.dumps(config_for(layers)).encode()
    cfg_rel = f"blobs/sha256/{sha(cfg)[7:]}" if blobs_style else f"{sha(cfg)[7:]}.json"
    files[cfg_rel] = cfg
    files["manifest.json"] = json.dumps(
        [{"Config": cfg_rel, "RepoTags": tags, "Layers": layer_paths}]
    ).encode()
    return files


def write_dir(files: dict[str, bytes], dest: Path) -> Path:
    for rel, data in files.items():
        if rel.startswith("_"):
            continue
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


def write_tar(
    files: dict[str, bytes],
    dest: Path,
    *,
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> Path:
    """``files`` as a tar archive, then ``symlinks`` / ``hardlinks`` ({member: link target})
    as link members (``docker save`` and skopeo link identical layers this way)."""
    with tarfile.open(dest, "w") as tar:
        for rel, data in files.items():
            if rel.startswith("_"):
                continue
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mtime = T0
            tar.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for rel, target in (links or {}).items():
                info = tarfile.TarInfo(rel)
                info.type = kind
                info.linkname = target
                info.mtime = T0
                tar.addfile(info)
    return dest


def index_rows(db: Any) -> tuple[int, int]:
    """(rows in images, rows in image_refs): a failed import must leave both unchanged."""
    conn = db.connection()
    return (
        conn.execute("SELECT count(*) FROM images").fetchone()[0],
        conn.execute("SELECT count(*) FROM image_refs").fetchone()[0],
    )
