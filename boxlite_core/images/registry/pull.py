"""Pull an image from an OCI registry into the local store.

Order of work, chosen so a failure leaves no partial image: resolve the manifest (walking an
image index to this host's platform), download config and layers into the blob store (each
verified against its digest while it streams; already-present blobs are skipped), and only
then write the index row, in one transaction, through the store. Verified blobs left behind
by a failed pull are a cache for the retry; `boxlite images prune` removes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypedDict, Unpack

import attrs
import requests
import urllib3

from ...diskspace import ensure_free
from ...errors import BoxliteError, ConfigError, ImageError, NotFoundError
from ...models import JsonObject, JsonValue
from ..blobs import check_digest
from ..importers import MAX_JSON, Imported, check_layers
from ..oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    LAYER_MEDIA_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    host_arch,
)
from ..prune import gc_guard
from .client import Endpoint, RegistryClient, RegistryError
from .progress import PullProgress, QuietProgress
from .reference import Reference, looks_like_registry_reference, parse_reference
from .settings import RegistrySettings

if TYPE_CHECKING:
    from ..model import Image
    from ..store import ImageStore

MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
PARALLEL_DOWNLOADS = 3
MAX_RESUMES = 3
CHUNK = 1024 * 1024


@attrs.frozen
class Platform:
    os: str = "linux"
    architecture: str = attrs.field(factory=host_arch)
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _platform_of(entry: JsonObject) -> Platform | None:
    plat = entry.get("platform")
    if not isinstance(plat, dict):
        return None
    return Platform(
        str(plat.get("os", "")), str(plat.get("architecture", "")), str(plat.get("variant", ""))
    )


def select_manifest(index: JsonObject, want: Platform, where: str) -> JsonObject:
    """The index entry for ``want``; ImageError listing the platforms there are otherwise.

    An entry without a platform matches (OCI makes the field optional); an exact variant
    match beats none (arm64 images list v8 while hosts rarely ask for it).
    """
    entries = [e for e in index.get("manifests") or () if isinstance(e, dict)]
    if not entries:
        raise ImageError(f"{where}: the image index lists no manifests")
    matches = []
    for entry in entries:
        plat = _platform_of(entry)
        if plat is None or (plat.os == want.os and plat.architecture == want.architecture):
            matches.append(entry)
    if not matches:
        have = sorted(
            {
                str(p)
                for p in map(_platform_of, entries)
                if p is not None and p.os != "unknown"  # buildx attestations
            }
        )
        raise ImageError(
            f"{where}: no image for {want} (the index only has {', '.join(have) or 'none'}); "
            f"pull it on a matching host or pass --platform {have[0] if have else 'OS/ARCH'}"
        )

    def rank(entry: JsonObject) -> int:
        plat = _platform_of(entry)
        variant = plat.variant if plat else ""
        if want.variant:
            return 0 if variant == want.variant else 1
        return 0 if variant in ("", "v8") else 1

    return sorted(matches, key=rank)[0]


@attrs.frozen
class _Fetched:
    raw: bytes
    doc: JsonObject
    media_type: str
    digest: str


class _BlobStream(io.RawIOBase):
    """A blob body as a file: hashes and counts what passes, resumes with Range on a break.

    The hash is checked at EOF, before the blob store's own check, so the error can say
    which registry served the bad bytes.
    """

    def __init__(
        self,
        client: RegistryClient,
        ep: Endpoint,
        digest: str,
        size: int,
        on_bytes: Callable[[int], None],
        cancel: threading.Event,
    ) -> None:
        super().__init__()
        self._client, self._ep, self._digest, self._size = client, ep, digest, size
        self._on_bytes, self._cancel = on_bytes, cancel
        self._hash = hashlib.sha256()
        self._pos = 0
        self._resumes = 0
        self._resp = self._open(0)

    def _open(self, offset: int) -> requests.Response:
        resp, _ = self._client.get(f"blobs/{self._digest}", range_from=offset, endpoint=self._ep)
        if offset and resp.status_code != 206:
            resp.close()
            raise RegistryError(
                f"{self._ep} cannot resume blob {self._digest} (no Range support); retry the pull"
            )
        resp.raw.decode_content = False
        return resp

    def readable(self) -> bool:
        return True

    def _what(self) -> str:
        return f"blob {self._digest} of {self._client.ref} from {self._ep}"

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._cancel.is_set():
            raise ImageError(f"download of {self._what()} cancelled: another download failed")
        view = memoryview(buffer)
        while True:
            try:
                n = self._resp.raw.readinto(view)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                n = -1
                broken: BaseException | None = exc
            else:
                broken = None
            if n == 0 and self._pos < self._size:
                n, broken = -1, EOFError(f"body ended at {self._pos} of {self._size} bytes")
            if n >= 0:
                break
            if self._resumes >= MAX_RESUMES:
                raise RegistryError(
                    f"download of {self._what()} broke at {self._pos}/{self._size} bytes "
                    f"({broken}); retry the pull"
                )
            self._resumes += 1
            self._resp.close()
            self._resp = self._open(self._pos)
        if n == 0:
            got = "sha256:" + self._hash.hexdigest()
            if got != self._digest:
                raise ImageError(
                    f"{self._what()} does not match its digest (got {got}); the registry or "
                    "a proxy served wrong data, nothing was stored"
                )
            return 0
        self._pos += n
        if self._pos > self._size:
            raise ImageError(
                f"{self._what()} is larger than the {self._size} bytes its manifest says"
            )
        self._hash.update(view[:n])
        self._on_bytes(n)
        return n

    def close(self) -> None:
        self._resp.close()
        super().close()


class Puller:
    """One pull: a client for the reference's registry, a store to fill, a progress sink."""

    def __init__(
        self,
        store: ImageStore,
        ref: Reference,
        settings: RegistrySettings,
        *,
        platform: Platform | None = None,
        progress: PullProgress | None = None,
        session: requests.Session | None = None,
        workers: int = PARALLEL_DOWNLOADS,
    ) -> None:
        self.store = store
        self.ref = ref
        self.client = RegistryClient(ref, settings, session)
        self.platform = platform or Platform()
        self.progress = progress or QuietProgress()
        self.workers = workers

    def _fetch_manifest(self, target: str, expect: str | None) -> _Fetched:
        def attempt(ep: Endpoint) -> _Fetched:
            resp, _ = self.client.get(
                f"manifests/{target}", headers={"Accept": MANIFEST_ACCEPT}, endpoint=ep
            )
            try:
                raw = resp.raw.read(MAX_JSON + 1, decode_content=False)
            finally:
                resp.close()
            where = f"{self.ref} from {ep}"
            if len(raw) > MAX_JSON:
                raise ImageError(f"{where}: manifest is larger than {MAX_JSON} bytes")
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            if expect and digest != expect:
                raise ImageError(
                    f"{where}: manifest has digest {digest}, not the {expect} asked for; "
                    "the registry or a proxy served wrong data"
                )
            header = resp.headers.get("Docker-Content-Digest", "")
            if header.startswith("sha256:") and header != digest:
                raise ImageError(
                    f"{where}: manifest body hashes to {digest} but the registry says {header}"
                )
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise ImageError(f"{where}: manifest is not valid JSON ({exc})") from exc
            if not isinstance(doc, dict):
                raise ImageError(f"{where}: manifest is not a JSON object")
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
            media_type = str(doc.get("mediaType") or ctype)
            if media_type in SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
                raise ImageError(
                    f"{where}: Docker schema 1 manifests are not supported; push the image "
                    "again with a current docker/buildah (schema 2 or OCI)"
                )
            return _Fetched(raw, doc, media_type, digest)

        return self.client.each_endpoint(attempt)

    def resolve(self) -> _Fetched:
        """The platform manifest for this reference (walking at most 4 nested indexes)."""
        fetched = self._fetch_manifest(self.ref.target, self.ref.digest)
        for _ in range(4):
            doc = fetched.doc
            if fetched.media_type in INDEX_TYPES or (
                "manifests" in doc and "layers" not in doc
            ):
                entry = select_manifest(doc, self.platform, str(self.ref))
                digest = check_digest(entry.get("digest"))
                fetched = self._fetch_manifest(digest, digest)
                continue
            if fetched.media_type and fetched.media_type not in MANIFEST_TYPES:
                raise ImageError(
                    f"{self.ref}: manifest media type {fetched.media_type!r} is not an image "
                    "(expected an OCI or Docker v2 image manifest)"
                )
            return fetched
        raise ImageError(f"{self.ref}: image indexes nest too deeply")

    def _descriptor(self, desc: JsonValue, what: str) -> tuple[str, str, int]:
        if not isinstance(desc, dict):
            raise ImageError(f"{self.ref}: {what} descriptor is not an object")
        try:
            digest = check_digest(desc.get("digest"))
            size = int(desc.get("size", -1))
        except (TypeError, ValueError) as exc:
            raise ImageError(f"{self.ref}: bad {what} descriptor ({exc})") from exc
        if size < 0:
            raise ImageError(f"{self.ref}: {what} descriptor has no size")
        return digest, str(desc.get("mediaType", "")), size

    def _download(self, digest: str, size: int, label: str, cancel: threading.Event) -> None:
        key = digest
        if self.store.blobs.exists(digest):
            self.progress.done(key, "already present")
            return
        self.progress.start(key, label, size)

        def attempt(ep: Endpoint) -> None:
            stream = _BlobStream(
                self.client, ep, digest, size, lambda n: self.progress.advance(key, n), cancel
            )
            try:
                reader = io.BufferedReader(stream, CHUNK)
                self.store.blobs.put_stream(reader, expected_digest=digest, size_hint=size)
            finally:
                stream.close()

        self.client.each_endpoint(attempt)
        self.progress.done(key, "done")

    def run(self) -> Image:
        with gc_guard(self.store, shared=True):
            fetched = self.resolve()
            manifest = fetched.doc
            cfg_digest, _cfg_type, cfg_size = self._descriptor(manifest.get("config"), "config")
            if cfg_size > MAX_JSON:
                raise ImageError(f"{self.ref}: config is larger than {MAX_JSON} bytes")
            layers = manifest.get("layers")
            if not isinstance(layers, list):
                raise ImageError(f"{self.ref}: manifest {fetched.digest} has no layers list")
            jobs = [(cfg_digest, cfg_size, "config")]
            for i, layer in enumerate(layers):
                digest, media_type, size = self._descriptor(layer, f"layer {i}")
                if media_type not in LAYER_MEDIA_TYPES:
                    raise ImageError(
                        f"{self.ref}: layer {i} has unsupported media type {media_type!r}"
                    )
                jobs.append((digest, size, f"layer {digest[7:19]}"))
            layer_digests = [digest for digest, _size, _label in jobs[1:]]
            self._download_all(jobs)
            config_raw = self.store.blobs.read_bytes(cfg_digest)
            try:
                config = json.loads(config_raw)
            except ValueError as exc:
                raise ImageError(f"{self.ref}: config {cfg_digest} is not JSON ({exc})") from exc
            if not isinstance(config, dict):
                raise ImageError(f"{self.ref}: config {cfg_digest} is not a JSON object")
            self._check_config_platform(config)
            # a layer that does not decode fails the pull here, not a box's start later
            check_layers(self.store.blobs, layer_digests, config, str(self.ref))
            self.store.blobs.put_bytes(fetched.raw, expected_digest=fetched.digest)
            imported = Imported(
                fetched.digest, manifest, fetched.raw, cfg_digest, config, config_raw,
                (str(self.ref),),
            )
            return _add_imported(self.store, imported, self.ref.store_name)

    def _check_config_platform(self, config: JsonObject) -> None:
        arch, os_name = config.get("architecture"), config.get("os")
        wrong_arch = bool(arch) and arch != self.platform.architecture
        if wrong_arch or (bool(os_name) and os_name != self.platform.os):
            raise ImageError(
                f"{self.ref} is a {os_name}/{arch} image, not {self.platform}; "
                f"pull a {self.platform} tag of it or pass --platform {os_name}/{arch}"
            )

    def _download_all(self, jobs: list[tuple[str, int, str]]) -> None:
        cancel = threading.Event()
        unique = list({digest: (digest, size, label) for digest, size, label in jobs}.values())
        missing = sum(s for d, s, _ in unique if not self.store.blobs.exists(d))
        # all layers download at once: check their sum, not each one alone
        ensure_free(self.store.blobs.tmp, missing, f"pulling {self.ref}")
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pull") as pool:
            futures = [pool.submit(self._download, d, s, label, cancel) for d, s, label in unique]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                cancel.set()
                for f in pending:
                    f.cancel()
                wait(pending)
                exc = failed[0].exception()
                assert exc is not None
                raise exc


def _add_imported(store: ImageStore, imported: Imported, reference: str) -> Image:
    """Write the index row through the store (blobs are all present and verified)."""
    return store.add_imported(imported, reference)


class PullOptions(TypedDict, total=False):
    """The keyword options of :func:`pull_image`, as :func:`ensure_image` passes them on."""

    settings: RegistrySettings | None
    platform: Platform | str | None
    progress: PullProgress | None
    session: requests.Session | None
    insecure: bool


def pull_image(
    store: ImageStore,
    ref: str | Reference,
    *,
    settings: RegistrySettings | None = None,
    platform: Platform | str | None = None,
    progress: PullProgress | None = None,
    session: requests.Session | None = None,
    insecure: bool = False,
) -> Image:
    """Pull ``ref`` into ``store`` and return the stored image.

    ``insecure`` lets this one pull talk plain HTTP to the reference's registry (the CLI's
    ``--insecure``); otherwise settings (env, registries.toml) decide.
    """
    reference = parse_reference(ref) if isinstance(ref, str) else ref
    if settings is None:
        settings = RegistrySettings.load(store.home)
    if insecure:
        settings = attrs.evolve(settings, insecure=settings.insecure | {reference.registry})
    plat = Platform.parse(platform) if isinstance(platform, str) else platform
    return Puller(
        store, reference, settings, platform=plat, progress=progress, session=session
    ).run()


#: the name callers use; ``pull_image`` exists so ``ensure_image(pull=…)`` can reach it
pull = pull_image


def ensure_image(
    store: ImageStore,
    ref: str,
    pull: bool = True,
    **pull_options: Unpack[PullOptions],
) -> Image:
    """``store.get(ref)``, pulling the image first when it is missing and ``ref`` is pullable.

    For the runtime's create path: a local image or built-in never touches the network.
    ``BOXLITE_PULL=never`` turns the implicit pull off (air-gapped hosts, strict audits).
    A failed implicit pull is reported as "not found" naming both the local miss and the
    pull's reason, because the user typed a name, not a registry operation.
    """
    try:
        return store.get(ref)
    except NotFoundError:
        if not pull or os.environ.get("BOXLITE_PULL", "missing") == "never":
            raise
        if not looks_like_registry_reference(ref):
            raise
    try:
        return pull_image(store, ref, **pull_options)
    except BoxliteError as exc:
        raise NotFoundError(
            f"image {ref!r} is not in the local store and pulling it failed: {exc}"
        ) from exc
