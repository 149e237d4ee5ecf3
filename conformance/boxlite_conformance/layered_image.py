"""One image whose layers use every OCI layer feature that strategies could show differently,
and the guest's view of it, for T2 ``TestStrategyEquivalence``: ``disk``, ``merged`` and
``layers`` must show it the same, entry for entry.

Three layers on top of the built-in busybox, everything under ``/t`` and ``/top``:

* opaque directories (``.wh..wh..opq``, OCI image spec layer.md "Opaque Whiteout"): the
  input from boxlite issue 17 (``t/app``: lower ``old.conf`` + ``sub/``, upper opaque with
  ``new.conf``), one in a top-level directory (``/top``), and nested ones across layers
  (``t/n`` opaque in the 2nd layer, ``t/n/a`` in the 3rd);
* whiteouts of a file, of a directory, of a directory re-created in the same layer (with and
  without its own directory entry), of something that never existed;
* hardlinks across layers: to a file only a lower layer has (link count 2), a chain over
  three layers (count 3), one whose other name a later layer deletes, one to a file with an
  xattr, owner and mode of its own;
* symlinks: relative, absolute, and a directory symlink a later layer writes through;
* ``user.*`` xattrs on a file and a directory; a directory a later layer adds to without
  listing it (owner, mode and xattr must stay the lower one's).

:data:`EXPECTED` is the view worked out by hand from the OCI rules, so three strategies that
agreed on a wrong view would still fail. The view is read in the guest with busybox
(:data:`LISTING_SCRIPT`), xattrs with a static helper built here when a C compiler is there
(:func:`build_xattr_helper`). Images are written with tarfile and json only.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .static_helper import compile_static

__all__ = [
    "EXPECTED",
    "EXPECTED_XATTRS",
    "LISTING_SCRIPT",
    "XATTR_HELPER",
    "build_xattr_helper",
    "import_into",
    "parse_listing",
    "parse_xattrs",
    "write_layout",
]

MTIME = 1_600_000_000
#: where the xattr helper lives in the image (outside the listed trees)
XATTR_HELPER = "/t-tools/lsxattr"
#: prints ``PATH\tNAME=HEX`` for each user.* xattr of each argument (no symlinks followed)
XATTR_HELPER_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char names[4096], value[4096];
        ssize_t n = llistxattr(argv[i], names, sizeof names);
        if (n < 0) { perror(argv[i]); return 1; }
        for (char *name = names; name < names + n; name += strlen(name) + 1) {
            if (strncmp(name, "user.", 5)) continue;
            ssize_t v = lgetxattr(argv[i], name, value, sizeof value);
            if (v < 0) { perror(name); return 1; }
            printf("%s\t%s=", argv[i], name);
            for (ssize_t k = 0; k < v; k++) printf("%02x", (unsigned char)value[k]);
            printf("\n");
        }
    }
    return 0;
}
"""

#: the guest's view of /t and /top, one line per entry, sorted:
#: ``PATH|TYPE|MODE|UID|GID`` + ``|NLINK|SIZE|MD5`` for files, ``|TARGET`` for symlinks
#: (directory sizes and link counts, and symlink modes, differ by filesystem: left out)
LISTING_SCRIPT = r"""
cd / || exit 1
find t top | sort | while IFS= read -r p; do
  case "$(stat -c %F "$p")" in
    directory) echo "$p|dir|$(stat -c '%a|%u|%g' "$p")" ;;
    regular*) echo "$p|file|$(stat -c '%a|%u|%g|%h|%s' "$p")|$(md5sum < "$p" | cut -d' ' -f1)" ;;
    symbolic*) echo "$p|symlink|-|$(stat -c '%u|%g' "$p")|$(readlink "$p")" ;;
    *) echo "$p|other|$(stat -c '%F|%a|%u|%g' "$p")" ;;
  esac
done
"""


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _file(mode: str, nlink: int, content: str, uid: int = 0) -> str:
    return f"file|{mode}|{uid}|{uid}|{nlink}|{len(content)}|{_md5(content)}"


def _dir(mode: str = "755", uid: int = 0) -> str:
    return f"dir|{mode}|{uid}|{uid}"


#: path → what the guest must show (see LISTING_SCRIPT); ``None``: the entry must be there,
#: its line is not compared (t/hl/wo2: its other name was deleted by a later layer, and
#: overlayfs reports the count of the lower inode, which still has both: 2, not 1)
EXPECTED: dict[str, str | None] = {
    "t": _dir(),
    "t/app": _dir(),
    "t/app/new.conf": _file("644", 1, "new\n"),
    "t/hl": _dir(),
    "t/hl/base": _file("644", 2, "base\n"),
    "t/hl/link": _file("644", 2, "base\n"),
    "t/hl/c0": _file("644", 3, "chain\n"),
    "t/hl/c1": _file("644", 3, "chain\n"),
    "t/hl/c2": _file("644", 3, "chain\n"),
    "t/hl/wo2": None,
    "t/n": _dir(),
    "t/n/a": _dir(),
    "t/n/a/b": _dir(),
    "t/n/a/b/w": _file("644", 1, "w\n"),
    "t/n/a/r": _file("644", 1, "r\n"),
    "t/priv": _dir("750", 1000),
    "t/priv/added": _file("644", 1, "added\n"),
    "t/priv/old": _file("600", 1, "old\n", 1000),
    "t/redo": _dir("700"),
    "t/redo/new": _file("644", 1, "new\n"),
    "t/redo2": _dir(),
    "t/redo2/new": _file("644", 1, "new\n"),
    "t/sym": _dir(),
    "t/sym/abs": "symlink|-|0|0|/t/sym/real/f",
    "t/sym/dirlink": "symlink|-|0|0|real",
    "t/sym/filelink": "symlink|-|0|0|real/f",
    "t/sym/real": _dir(),
    "t/sym/real/f": _file("644", 1, "real\n"),
    "t/sym/real/new": _file("644", 1, "through the link\n"),
    "t/x": _dir(),
    "t/x/dir": _dir(),
    "t/x/file": _file("640", 2, "colour\n", 1000),
    "t/x/file2": _file("640", 2, "colour\n", 1000),
    "top": _dir(),
    "top/k2": _file("644", 1, "k2\n"),
}
#: path → {user xattr: value} the guest must show (every other entry: none)
EXPECTED_XATTRS: dict[str, dict[str, bytes]] = {
    "t/priv": {"user.note": b"private"},
    "t/x/dir": {"user.kind": b"dir"},
    "t/x/file": {"user.color": b"blue"},
    "t/x/file2": {"user.color": b"blue"},
}


def _entries_a() -> list[dict[str, Any]]:
    return [
        _d("t"), _d("t/app"), _f("t/app/old.conf", "old\n"), _d("t/app/sub"),
        _f("t/app/sub/deep", "deep\n"),
        _f("t/gone", "gone\n"), _d("t/gonedir"), _f("t/gonedir/f", "f\n"),
        _d("t/redo"), _f("t/redo/old", "old\n"), _d("t/redo2"), _f("t/redo2/old", "old\n"),
        _d("t/n"), _d("t/n/a"), _f("t/n/a/x", "x\n"), _d("t/n/a/b"), _f("t/n/a/b/y", "y\n"),
        _f("t/n/c", "c\n"),
        _d("t/hl"), _f("t/hl/base", "base\n"), _f("t/hl/c0", "chain\n"), _f("t/hl/wo", "wo\n"),
        _d("t/sym"), _d("t/sym/real"), _f("t/sym/real/f", "real\n"),
        _link("t/sym/dirlink", "real"), _link("t/sym/filelink", "real/f"),
        _d("t/priv", 0o750, uid=1000, xattrs={"user.note": "private"}),
        _f("t/priv/old", "old\n", 0o600, uid=1000),
        _d("t/x"), _f("t/x/file", "colour\n", 0o640, uid=1000, xattrs={"user.color": "blue"}),
        _d("t/x/dir", xattrs={"user.kind": "dir"}),
        _d("top"), _f("top/k1", "k1\n"),
    ]  # fmt: skip


def _entries_b() -> list[dict[str, Any]]:
    return [
        _d("t/app"), _f("t/app/.wh..wh..opq"), _f("t/app/new.conf", "new\n"),
        _f("t/.wh.gone"), _f("t/.wh.gonedir"),
        _f("t/.wh.redo"), _d("t/redo", 0o700), _f("t/redo/new", "new\n"),
        _d("t/n"), _f("t/n/.wh..wh..opq"), _d("t/n/a"), _f("t/n/a/q", "q\n"),
        _hard("t/hl/link", "t/hl/base"), _hard("t/hl/c1", "t/hl/c0"), _hard("t/hl/wo2", "t/hl/wo"),
        _f("t/sym/dirlink/new", "through the link\n"), _link("t/sym/abs", "/t/sym/real/f"),
        _f("t/priv/added", "added\n"),
        _hard("t/x/file2", "t/x/file"), _f("t/x/.wh.never"),
        _d("top"), _f("top/.wh..wh..opq"), _f("top/k2", "k2\n"),
    ]  # fmt: skip


def _entries_c() -> list[dict[str, Any]]:
    return [
        _f("t/hl/.wh.wo"), _hard("t/hl/c2", "t/hl/c1"),
        _d("t/n/a"), _f("t/n/a/.wh..wh..opq"), _f("t/n/a/r", "r\n"), _f("t/n/a/b/w", "w\n"),
        _f("t/.wh.redo2"), _f("t/redo2/new", "new\n"),
    ]  # fmt: skip


def _d(name: str, mode: int = 0o755, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": tarfile.DIRTYPE, "mode": mode, **kw}


def _f(name: str, data: str = "", mode: int = 0o644, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": tarfile.REGTYPE, "mode": mode, "data": data.encode(), **kw}


def _link(name: str, target: str) -> dict[str, Any]:
    return {"name": name, "type": tarfile.SYMTYPE, "mode": 0o777, "target": target}


def _hard(name: str, target: str) -> dict[str, Any]:
    return {"name": name, "type": tarfile.LNKTYPE, "mode": 0o644, "target": target}


def layer_tar(entries: Iterable[dict[str, Any]], extra: dict[str, bytes] | None = None) -> bytes:
    """An uncompressed PAX layer of ``entries``, then ``extra`` ({path: executable bytes})."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type, info.mode, info.mtime = e["type"], e["mode"], MTIME
            info.uid = info.gid = e.get("uid", 0)
            info.linkname = e.get("target", "")
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.get("xattrs", {}).items()}
            data = e.get("data")
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        for path, data in (extra or {}).items():
            info = tarfile.TarInfo(path)
            info.mode, info.mtime, info.size = 0o755, MTIME, len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def layers(xattr_helper: Path | None) -> list[bytes]:
    """The three layer tars, bottom first (the helper, when built, in the first one)."""
    extra = {XATTR_HELPER.lstrip("/"): xattr_helper.read_bytes()} if xattr_helper else None
    return [layer_tar(_entries_a(), extra), layer_tar(_entries_b()), layer_tar(_entries_c())]


def build_xattr_helper(where: Path) -> Path | None:
    """The static xattr lister for the guest, or None without a C compiler and static libc."""
    return compile_static(where, "lsxattr", XATTR_HELPER_C)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(
    dest: Path,
    base_config: dict[str, Any],
    base_layers: list[tuple[bytes, str]],
    new_layers: list[bytes],
    ref: str,
) -> Path:
    """An OCI image layout at ``dest``: ``base_layers`` ((blob, media type), bottom first,
    with ``base_config``'s diff IDs) and then ``new_layers`` (uncompressed tars)."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        blobs[_sha(data)] = data
        return _sha(data)

    descs = [{"mediaType": mt, "digest": put(b), "size": len(b)} for b, mt in base_layers]
    descs += [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": put(t),
               "size": len(t)} for t in new_layers]  # fmt: skip
    config = dict(base_config)
    rootfs = dict(config.get("rootfs") or {})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), *(_sha(t) for t in new_layers)]
    config["rootfs"] = rootfs
    raw_config = json.dumps(config, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(raw_config), "size": len(raw_config)},
        "layers": descs,
    }).encode()  # fmt: skip
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": ref},
    }]}  # fmt: skip
    (dest / "blobs" / "sha256").mkdir(parents=True)
    for digest, data in blobs.items():
        (dest / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def import_into(store: Any, ref: str, base: str = "busybox") -> bool:
    """Build the image on top of ``base`` and import it into ``store`` (a runtime's
    ``images``) as ``ref``; True when it carries the xattr helper (a compiler was there)."""
    work = Path(tempfile.mkdtemp(prefix="boxlite-layered-image-"))
    try:
        image = store.get(base)
        base_layers = [
            (store.blobs.path(x.digest).read_bytes(), x.media_type) for x in image.layers
        ]
        helper = build_xattr_helper(work)
        layout = write_layout(work / "layout", store.config_json(image), base_layers,
                              layers(helper), ref)  # fmt: skip
        store.import_path(layout, name=ref)
        return helper is not None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_listing(text: str) -> dict[str, str]:
    """LISTING_SCRIPT's output → {path: the rest of its line}."""
    out = {}
    for line in text.splitlines():
        path, _, rest = line.partition("|")
        out[path] = rest
    return out


def parse_xattrs(text: str) -> dict[str, dict[str, bytes]]:
    """The xattr helper's output → {path: {name: value}}."""
    out: dict[str, dict[str, bytes]] = {}
    for line in text.splitlines():
        path, _, pair = line.partition("\t")
        name, _, value = pair.partition("=")
        out.setdefault(path, {})[name] = bytes.fromhex(value)
    return out
