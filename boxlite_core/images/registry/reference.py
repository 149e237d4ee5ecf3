"""Image references as registries understand them: ``[HOST[:PORT]/]NAME[:TAG][@DIGEST]``.

The grammar follows the distribution project's reference rules, because every registry and
client (docker, podman, skopeo) parses names that way: the first path component is a registry
host only if it contains a ``.`` or a ``:`` or is ``localhost``; otherwise the image lives on
Docker Hub, where a one-component name means ``library/NAME``.
"""

from __future__ import annotations

import re

import attrs

from ...errors import ConfigError
from ..reference import normalize_reference

DOCKER_HUB = "docker.io"
#: the host that really answers the distribution API for docker.io
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_BARE_ID_RE = re.compile(r"^(?:sha256:)?[0-9a-f]{4,64}$")


def canonical_host(host: str) -> str:
    """Docker Hub has several names; everything else is compared as written (lowercase)."""
    host = host.lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


@attrs.frozen
class Reference:
    """A parsed registry reference. ``digest`` wins over ``tag`` when both are given."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Where the distribution API lives (Docker Hub's name differs from its API host)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def store_name(self) -> str:
        """The name the local store indexes the image under ('busybox:latest' for Hub's).

        The store's own normalisation is reused so `store.get('busybox')` and a pull of
        `docker.io/library/busybox` meet on one row.
        """
        if self.digest:  # a pinned pull is found again by the same pinned name
            return normalize_reference(f"{self.registry}/{self.repository}@{self.digest}")
        return normalize_reference(f"{self.registry}/{self.repository}:{self.tag or 'latest'}")


def parse_reference(text: str) -> Reference:
    """Parse ``text``; ConfigError (naming the reference and the expected form) if invalid."""
    raw = text.strip()
    hint = "expected [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], e.g. 127.0.0.1:5000/busybox:1.36"
    if not raw or any(c.isspace() for c in raw):
        raise ConfigError(f"image reference {text!r} is not valid: {hint}")
    rest, _, digest = raw.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise ConfigError(
            f"image reference {text!r}: digest {digest!r} is not 'sha256:' + 64 lowercase hex"
        )
    registry = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST_RE.match(first):
            raise ConfigError(f"image reference {text!r}: {first!r} is not a valid host[:port]")
        registry = canonical_host(first)
        rest = remainder
    name, tag = rest, None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG_RE.match(tag):
            raise ConfigError(f"image reference {text!r}: tag {tag!r} is not valid")
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"image reference {text!r}: repository {name!r} is not valid "
            f"(lowercase letters, digits, '.', '_', '-' and '/'); {hint}"
        )
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if tag is None and digest == "":
        tag = "latest"
    return Reference(registry=registry, repository=name, tag=tag, digest=digest or None)


def looks_like_registry_reference(text: str) -> bool:
    """True when ``text`` could be pulled: it parses and is not a bare image id/digest.

    A short hex id the user typed for a local image must not turn into a Docker Hub lookup.
    """
    if _BARE_ID_RE.match(text.strip()):
        return False
    try:
        parse_reference(text)
    except ConfigError:
        return False
    return True
