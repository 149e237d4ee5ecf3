"""Where and how to reach registries: mirrors, plain-HTTP registries, credentials.

Sources, most specific first: explicit arguments (the CLI's ``--insecure``), environment
variables, then the runtime home's ``registries.toml``. Credentials come from explicit
arguments, else docker's own ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``), so a
user who ran ``docker login`` needs nothing else.

Plain HTTP is never a fallback: a registry is spoken to over HTTP only when it is named as
insecure, because a silent downgrade would let anyone on the path swap the image.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from ...errors import ConfigError
from ...models import JsonValue
from .reference import DOCKER_HUB, canonical_host

ENV_MIRRORS = "BOXLITE_REGISTRY_MIRRORS"
ENV_INSECURE = "BOXLITE_INSECURE_REGISTRIES"
ENV_CONFIG = "BOXLITE_REGISTRIES_CONFIG"
CONFIG_NAME = "registries.toml"


@attrs.frozen
class Credentials:
    username: str
    password: str
    #: where they came from, for error messages (never the secret itself)
    source: str = "explicit"


def _host_of(url_or_host: str) -> str:
    """'https://index.docker.io/v1/' → 'docker.io'; '127.0.0.1:5000' stays as it is."""
    text = url_or_host.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    return canonical_host(text.split("/", 1)[0])


def _mirror_url(url: str, where: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{where}: mirror {url!r} must be a URL starting with http:// or https://"
        )
    return url


@attrs.frozen
class RegistrySettings:
    """Immutable so one pull sees one consistent view even if the environment changes."""

    #: registry host → mirror base URLs, tried in order before the registry itself
    mirrors: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    #: hosts spoken to over plain HTTP
    insecure: frozenset[str] = frozenset()
    #: registry host → credentials given explicitly (win over docker's config.json)
    credentials: Mapping[str, Credentials] = attrs.field(factory=dict)
    #: docker's config.json to read credentials from (None: $DOCKER_CONFIG or ~/.docker)
    docker_config: Path | None = None

    @classmethod
    def load(
        cls,
        home: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        insecure: Iterable[str] = (),
        credentials: Mapping[str, Credentials] | None = None,
    ) -> RegistrySettings:
        """Settings from ``home``'s registries.toml, the environment, and explicit values."""
        env = os.environ if env is None else env
        mirrors: dict[str, list[str]] = {}
        insecure_hosts = {_host_of(h) for h in insecure if h.strip()}
        creds = dict(credentials or {})
        path = Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else None
        if path is None and home is not None:
            path = Path(home) / CONFIG_NAME
        if path is not None and path.is_file():
            file_mirrors, file_insecure, file_creds = _read_toml(path)
            for host, urls in file_mirrors.items():
                mirrors.setdefault(host, []).extend(urls)
            insecure_hosts |= file_insecure
            for host, cred in file_creds.items():
                creds.setdefault(host, cred)
        for item in (env.get(ENV_MIRRORS) or "").split(","):
            if not item.strip():
                continue
            host, sep, url = item.partition("=")
            if not sep or not host.strip():
                raise ConfigError(
                    f"{ENV_MIRRORS}: {item!r} is not HOST=URL "
                    "(e.g. docker.io=http://127.0.0.1:5001)"
                )
            # env mirrors go first: the environment is the more specific, later choice
            mirrors.setdefault(_host_of(host), [])
            mirrors[_host_of(host)].insert(0, _mirror_url(url, ENV_MIRRORS))
        insecure_hosts |= {
            _host_of(h) for h in (env.get(ENV_INSECURE) or "").split(",") if h.strip()
        }
        docker_dir = env.get("DOCKER_CONFIG")
        docker_cfg = Path(docker_dir) / "config.json" if docker_dir else None
        return cls(
            mirrors={h: tuple(u) for h, u in mirrors.items()},
            insecure=frozenset(insecure_hosts),
            credentials=creds,
            docker_config=docker_cfg,
        )

    def is_insecure(self, host: str) -> bool:
        return canonical_host(host) in self.insecure

    def mirrors_for(self, registry: str) -> tuple[str, ...]:
        return tuple(self.mirrors.get(canonical_host(registry), ()))

    def credentials_for(self, host: str) -> Credentials | None:
        """Explicit credentials for ``host``, else docker's config.json ``auths`` entry."""
        host = _host_of(host)
        if host in self.credentials:
            return self.credentials[host]
        return _docker_config_credentials(self.docker_config_path(), host)

    def docker_config_path(self) -> Path:
        if self.docker_config is not None:
            return self.docker_config
        return Path("~/.docker/config.json").expanduser()


def _read_toml(path: Path) -> tuple[dict[str, list[str]], set[str], dict[str, Credentials]]:
    """registries.toml::

        insecure = ["127.0.0.1:5000"]
        [mirrors]
        "docker.io" = ["http://127.0.0.1:5001"]
        [auth."127.0.0.1:5000"]
        username = "u"
        password = "p"
    """
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read registry settings ({exc})") from exc
    mirrors: dict[str, list[str]] = {}
    raw_mirrors = data.get("mirrors", {})
    if not isinstance(raw_mirrors, dict):
        raise ConfigError(f"{path}: [mirrors] must be a table of HOST = [URL, …]")
    for host, urls in raw_mirrors.items():
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ConfigError(f"{path}: mirrors.{host} must be a list of URLs")
        mirrors[_host_of(host)] = [_mirror_url(u, str(path)) for u in urls]
    insecure = data.get("insecure", [])
    if not isinstance(insecure, list) or not all(isinstance(h, str) for h in insecure):
        raise ConfigError(f"{path}: insecure must be a list of HOST[:PORT]")
    creds: dict[str, Credentials] = {}
    for host, entry in (data.get("auth") or {}).items():
        if not isinstance(entry, dict) or not {"username", "password"} <= entry.keys():
            raise ConfigError(f"{path}: auth.{host} needs username and password")
        creds[_host_of(host)] = Credentials(
            str(entry["username"]), str(entry["password"]), source=str(path)
        )
    return mirrors, {_host_of(h) for h in insecure}, creds


def _docker_config_credentials(path: Path, host: str) -> Credentials | None:
    try:
        data: JsonValue = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read docker credentials ({exc})") from exc
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _host_of(key) != host or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(
                    f"{path}: auths[{key!r}].auth is not base64 'user:password'; "
                    f"run `docker login {host}` again"
                ) from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ConfigError(f"{path}: auths[{key!r}].auth lacks ':'; run `docker login`")
            return Credentials(user, password, source=str(path))
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]), source=str(path))
    return None


def hub_credentials_hint(host: str) -> str:
    """How to log in, phrased for the registry at hand."""
    target = "" if host == DOCKER_HUB else f" {host}"
    return (
        f"run `docker login{target}`, or set DOCKER_CONFIG to a directory whose config.json "
        f"has an auths entry for {host}"
    )
