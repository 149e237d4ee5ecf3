"""A tiny in-test registry (http.server on 127.0.0.1) for what the real one will not do:
serve a blob whose bytes do not match its digest, demand Bearer tokens, break a download
half way. Tests that use it carry ``double`` in their names.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .registry import OCI_INDEX, BuiltImage, build_index, sha


class RegistryDouble:
    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}  # "repo/ref" → (body, type)
        self.blobs: dict[str, bytes] = {}  # digest → body served (may be wrong on purpose)
        self.bearer: tuple[str, str] | None = None  # (user, password) the token service wants
        self.token = "tok-" + "x" * 16
        self.token_requests: list[dict[str, str]] = []
        self.break_once: set[str] = set()  # digests whose first GET stops half way
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                double._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_image(self, repo: str, ref: str, image: BuiltImage) -> None:
        self.manifests[f"{repo}/{image.digest}"] = (image.manifest, image.manifest_type)
        self.manifests[f"{repo}/{ref}"] = (image.manifest, image.manifest_type)
        self.blobs.update(image.blobs())

    def add_index(self, repo: str, tag: str, entries: list[tuple[BuiltImage, str]]) -> None:
        for img, _ in entries:
            self.add_image(repo, img.digest, img)
        body = build_index(entries)
        self.manifests[f"{repo}/{tag}"] = (body, OCI_INDEX)
        self.manifests[f"{repo}/{sha(body)}"] = (body, OCI_INDEX)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- serving ---------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes = b"",
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((path, h.headers.get("Range", "")))
        if path == "/token":
            return self._token(h)
        if self.bearer and h.headers.get("Authorization") != f"Bearer {self.token}":
            challenge = (f'Bearer realm="{self.url}/token",service="double",'
                         'scope="repository:library/hello:pull"')
            return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                              {"WWW-Authenticate": challenge})
        if not path.startswith("/v2/"):
            return self._send(h, 404)
        rest = path[len("/v2/"):]
        if "/manifests/" in rest:
            repo, _, ref = rest.partition("/manifests/")
            found = self.manifests.get(f"{repo}/{ref}")
            if found is None:
                return self._send(h, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            body, mtype = found
            return self._send(h, 200, body, {"Content-Type": mtype})
        if "/blobs/" in rest:
            digest = rest.partition("/blobs/")[2]
            body = self.blobs.get(digest)
            if body is None:
                return self._send(h, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            rng = h.headers.get("Range", "")
            if rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                part = body[start:]
                return self._send(h, 206, part, {
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                    "Accept-Ranges": "bytes"})
            if digest in self.break_once:
                self.break_once.discard(digest)
                h.send_response(200)
                h.send_header("Content-Length", str(len(body)))
                h.send_header("Accept-Ranges", "bytes")
                h.end_headers()
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                return None
            return self._send(h, 200, body, {"Accept-Ranges": "bytes"})
        return self._send(h, 404)

    def _token(self, h: BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qsl, urlsplit

        query = dict(parse_qsl(urlsplit(h.path).query))
        self.token_requests.append(query)
        assert self.bearer is not None
        want = "Basic " + base64.b64encode(":".join(self.bearer).encode()).decode()
        if h.headers.get("Authorization") != want:
            return self._send(h, 401, b'{"details":"bad credentials"}')
        return self._send(h, 200, json.dumps({"token": self.token}).encode(),
                          {"Content-Type": "application/json"})
