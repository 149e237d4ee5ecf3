"""A real registry (Debian's docker-registry) on 127.0.0.1, and the push side of the API.

Pushing uses the same HTTP client as boxlite's pull (requests): POST an upload, PUT it with
``?digest=``, PUT the manifest. Images are built here with tarfile + json, independent of
boxlite's own code, so a pull is checked against bytes boxlite did not produce.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import attrs
import requests

from .oci import zstd_compress

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REGISTRY_BIN = "/usr/bin/docker-registry"
#: the account of the registry that demands a password (the ``auth_registry`` fixture)
USER, PASSWORD = "boxuser", "s3cret-pw"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"registry exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def make_htpasswd(path: Path, user: str, password: str) -> None:
    """bcrypt entry (the only hash docker-registry accepts): htpasswd, else bcrypt, else crypt."""
    tool = shutil.which("htpasswd")
    if tool:
        subprocess.run([tool, "-B", "-b", "-c", str(path), user, password], check=True,
                       capture_output=True)
        return
    try:
        import bcrypt

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    except ImportError:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # libxcrypt on Debian does bcrypt ($2b$)

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
        if not hashed or not hashed.startswith("$2"):
            raise RuntimeError(
                "no bcrypt: apt-get install apache2-utils or pip install bcrypt"
            ) from None
    path.write_text(f"{user}:{hashed}\n")


class LocalRegistry:
    """docker-registry serving plain HTTP on 127.0.0.1:<free port>, storage in a temp dir."""

    def __init__(self, workdir: Path, htpasswd: Path | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        workdir.mkdir(parents=True, exist_ok=True)
        auth = ""
        if htpasswd is not None:
            auth = f"auth:\n  htpasswd:\n    realm: boxlite-test\n    path: {htpasswd}\n"
        self.config = workdir / "config.yml"
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n  secret: boxlite-test-secret\n" + auth
        )
        self.log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OTEL_SDK_DISABLED": "1"},
        )
        try:
            wait_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- images --------------------------------------------------------------------------------
def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(n).parent) for n in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@attrs.frozen
class BuiltImage:
    manifest: bytes
    manifest_type: str
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def digest(self) -> str:
        return sha(self.manifest)

    def blobs(self) -> dict[str, bytes]:
        return {sha(b): b for b in (self.config, *self.layers)}


def build_image(
    layers: list[dict[str, bytes]], *, arch: str = "amd64", docker: bool = False,
    cmd: tuple[str, ...] = ("/bin/sh",), compress: int = 6, codec: str = "gzip",
    tars: list[bytes] | None = None, damaged: dict[int, bytes] | None = None,
) -> BuiltImage:
    """An image of ``layers`` ({path: bytes} each; or ready layer ``tars``), its layers
    compressed with ``codec``: "gzip" (level ``compress``) or "zstd" (OCI media type
    tar+zstd; docker's v2 schema has no zstd type). ``damaged`` ({index: blob}) pushes those
    bytes as layer ``index`` under their own digest while the config keeps the intact
    layer's diff ID."""
    if tars is None:
        tars = [layer_tar(files) for files in layers]
    if codec == "zstd":
        blobs = [zstd_compress(t) for t in tars]
        layer_type = OCI_LAYER_ZSTD
    else:
        blobs = [gzip.compress(t, compresslevel=compress, mtime=0) for t in tars]
        layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    for i, blob in (damaged or {}).items():
        blobs[i] = blob
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
    }, sort_keys=True).encode()
    mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mtype,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": sha(b), "size": len(b)} for b in blobs],
    }, indent=2).encode()
    return BuiltImage(manifest, mtype, config, tuple(blobs))


def build_index(entries: list[tuple[BuiltImage, str]]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": img.manifest_type, "digest": img.digest, "size": len(img.manifest),
            "platform": {"os": "linux", "architecture": arch},
        } for img, arch in entries],
    }).encode()


# -- push ----------------------------------------------------------------------------------
class Pusher:
    def __init__(self, base_url: str, auth: tuple[str, str] | None = None) -> None:
        self.base = base_url
        self.session = requests.Session()
        self.session.auth = auth

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        head = self.session.head(f"{self.base}/v2/{repo}/blobs/{digest}")
        if head.status_code == 200:
            return digest
        resp = self.session.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        assert resp.status_code == 202, (resp.status_code, resp.text)
        location = resp.headers["Location"]
        if location.startswith("/"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        resp = self.session.put(
            f"{location}{sep}digest={digest}", data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert resp.status_code == 201, (resp.status_code, resp.text)
        return digest

    def manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        resp = self.session.put(
            f"{self.base}/v2/{repo}/manifests/{ref}", data=data,
            headers={"Content-Type": media_type},
        )
        assert resp.status_code == 201, (resp.status_code, resp.text)
        return resp.headers.get("Docker-Content-Digest", sha(data))

    def image(self, repo: str, ref: str, image: BuiltImage) -> str:
        for data in image.blobs().values():
            self.blob(repo, data)
        return self.manifest(repo, ref, image.manifest, image.manifest_type)

    def index(self, repo: str, tag: str, entries: list[tuple[BuiltImage, str]]) -> str:
        for img, _arch in entries:
            self.image(repo, img.digest, img)
        return self.manifest(repo, tag, build_index(entries), OCI_INDEX)


def index_rows(store: Any) -> list[Any]:
    return store.db.connection().execute("SELECT digest FROM images").fetchall()


def ref_rows(store: Any) -> list[Any]:
    return store.db.connection().execute("SELECT reference FROM image_refs").fetchall()
