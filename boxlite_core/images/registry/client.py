"""A small OCI distribution API client (GET manifests and blobs) over ``requests``.

Why ``requests``: it is already installed wherever boxlite runs, it streams bodies without
buffering, keeps connections alive across a pull's many blob requests, strips the
Authorization header on a redirect to another host (registries redirect blobs to object
storage), and has been stable for a decade. httpx would add HTTP/2, which pulls don't need.

Endpoints: a registry's mirrors (in order) and then the registry itself. A request that fails
on a mirror (unreachable, 5xx, 404, refused credentials) moves on to the next endpoint; only
the last endpoint's failure reaches the caller, so a dead mirror never breaks a pull.

Auth: on 401 the ``WWW-Authenticate`` challenge decides. ``Bearer realm,service,scope`` →
fetch a token from the realm (with basic credentials if we know some, anonymously otherwise)
and retry; ``Basic`` → retry with credentials. Tokens are cached per endpoint and repository.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import TypeVar

import attrs
import requests

from ...errors import ImageError
from ...models import JsonValue
from .reference import Reference
from .settings import Credentials, RegistrySettings, hub_credentials_hint

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = "boxlite/0.1 (+requests)"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


@attrs.frozen
class Endpoint:
    base_url: str  # e.g. https://registry-1.docker.io (no trailing slash)
    host: str  # for credentials and messages
    is_mirror: bool = False

    def __str__(self) -> str:
        return f"mirror {self.base_url}" if self.is_mirror else self.host


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="x",service="y"' → ('bearer', {'realm': 'x', 'service': 'y'})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM_RE.finditer(rest)}
    return scheme.lower(), params


class RegistryError(ImageError):
    """A registry answered with an error; ``status`` is the HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class RegistryClient:
    """Talks to one registry (and its mirrors) for one reference's repository."""

    def __init__(
        self,
        ref: Reference,
        settings: RegistrySettings,
        session: requests.Session | None = None,
    ) -> None:
        self.ref = ref
        self.settings = settings
        self.session = session or _new_session()
        self._tokens: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self.endpoints = [
            Endpoint(url, url.split("://", 1)[1].split("/", 1)[0], is_mirror=True)
            for url in settings.mirrors_for(ref.registry)
        ]
        scheme = "http" if settings.is_insecure(ref.registry) else "https"
        self.endpoints.append(Endpoint(f"{scheme}://{ref.api_host}", ref.registry))
        self._preferred = 0

    # -- public -----------------------------------------------------------------------------
    def get(
        self, path: str, *, headers: dict[str, str] | None = None, range_from: int = 0,
        endpoint: Endpoint | None = None,
    ) -> tuple[requests.Response, Endpoint]:
        """GET ``/v2/<repo>/<path>`` on the first endpoint that answers 200/206.

        With ``endpoint`` only that one is tried (a resumed blob stays where it started).
        """
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        if range_from:
            hdrs["Range"] = f"bytes={range_from}-"
        order = [endpoint] if endpoint else self._endpoint_order()
        last: RegistryError | None = None
        for i, ep in enumerate(order):
            try:
                resp = self._send(ep, path, hdrs)
            except RegistryError as exc:
                if i == len(order) - 1:
                    raise
                log.info("%s failed (%s); trying the next endpoint", ep, exc)
                last = exc
                continue
            if i:
                self._prefer(ep)
            return resp, ep
        assert last is not None
        raise last

    def each_endpoint(self, fn: Callable[[Endpoint], T]) -> T:
        """Run ``fn(endpoint)`` on each endpoint in turn until one succeeds (blob downloads:
        a mirror that serves corrupt bytes is skipped like one that is down)."""
        order = self._endpoint_order()
        for i, ep in enumerate(order):
            try:
                result = fn(ep)
            except ImageError as exc:
                if i == len(order) - 1:
                    raise
                log.info("%s failed (%s); trying the next endpoint", ep, exc)
                continue
            if i:  # a dead mirror is not tried first for every later blob
                self._prefer(ep)
            return result
        raise AssertionError("unreachable")

    # -- plumbing ---------------------------------------------------------------------------
    def _endpoint_order(self) -> list[Endpoint]:
        return self.endpoints[self._preferred :] + self.endpoints[: self._preferred]

    def _prefer(self, ep: Endpoint) -> None:
        with self._lock:
            self._preferred = self.endpoints.index(ep)

    def _url(self, ep: Endpoint, path: str) -> str:
        return f"{ep.base_url}/v2/{self.ref.repository}/{path}"

    def _request(self, url: str, headers: dict[str, str], ep: Endpoint) -> requests.Response:
        try:
            return self.session.get(
                url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
            )
        except requests.exceptions.SSLError as exc:
            hint = ""
            if not ep.is_mirror:
                hint = (
                    f"; if {ep.host} speaks plain HTTP, pass --insecure or add it to "
                    f"BOXLITE_INSECURE_REGISTRIES"
                )
            raise RegistryError(f"TLS failed talking to {ep} ({_short(exc)}){hint}") from exc
        except requests.exceptions.RequestException as exc:
            raise RegistryError(
                f"cannot reach registry {ep} at {url} ({_short(exc)}); check the host and port"
                + (" or the mirror setting" if ep.is_mirror else "")
            ) from exc

    def _send(self, ep: Endpoint, path: str, headers: dict[str, str]) -> requests.Response:
        url = self._url(ep, path)
        auth = self._tokens.get((ep.base_url, self.ref.repository))
        resp = self._request(url, {**headers, **({"Authorization": auth} if auth else {})}, ep)
        if resp.status_code == 401:
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            auth = self._authorize(ep, challenge)
            resp = self._request(url, {**headers, "Authorization": auth}, ep)
            if resp.status_code == 401:
                resp.close()
                creds = self.settings.credentials_for(ep.host)
                raise RegistryError(
                    f"401 from {ep} for {self.ref.repository}: the credentials "
                    f"(user {creds.username if creds else '?'}, from "
                    f"{creds.source if creds else '?'}) were not accepted; "
                    f"{hub_credentials_hint(ep.host)}",
                    401,
                )
        if resp.status_code in (200, 206):
            return resp
        body = _error_text(resp)
        resp.close()
        status = resp.status_code
        what = f"{self.ref.repository}/{path}"
        if status == 404:
            raise RegistryError(
                f"{ep} has no {what} (404 {body}); check the image name and tag", status
            )
        if status == 403:
            raise RegistryError(
                f"403 from {ep} for {self.ref.repository}: access denied ({body}); "
                "check that your account may pull it",
                status,
            )
        if status == 429:
            raise RegistryError(
                f"{ep} rate-limited the pull of {self.ref} (429); wait, log in, or use a mirror",
                status,
            )
        raise RegistryError(f"{ep} answered {status} for {what} ({body})", status)

    def _authorize(self, ep: Endpoint, challenge: str) -> str:
        scheme, params = parse_challenge(challenge)
        creds = self.settings.credentials_for(ep.host)
        if scheme == "basic":
            if creds is None:
                raise RegistryError(
                    f"401 from {ep} for {self.ref.repository}: no credentials; "
                    f"{hub_credentials_hint(ep.host)}",
                    401,
                )
            header = requests.auth._basic_auth_str(creds.username, creds.password)
        elif scheme == "bearer" and params.get("realm"):
            header = "Bearer " + self._fetch_token(ep, params, creds)
        else:
            raise RegistryError(
                f"401 from {ep} for {self.ref.repository} with an auth scheme boxlite does not "
                f"speak ({challenge or 'no WWW-Authenticate header'})",
                401,
            )
        with self._lock:
            self._tokens[(ep.base_url, self.ref.repository)] = header
        return header

    def _fetch_token(self, ep: Endpoint, params: dict[str, str], creds: Credentials | None) -> str:
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        auth = (creds.username, creds.password) if creds else None
        try:
            resp = self.session.get(
                params["realm"], params=query, auth=auth, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
            )
        except requests.exceptions.RequestException as exc:
            raise RegistryError(
                f"cannot reach the token service {params['realm']} of {ep} ({_short(exc)})"
            ) from exc
        if resp.status_code in (401, 403):
            if creds is None:
                raise RegistryError(
                    f"401 from {ep} for {self.ref.repository}: no credentials and anonymous "
                    f"access is refused; {hub_credentials_hint(ep.host)}",
                    401,
                )
            raise RegistryError(
                f"{resp.status_code} from the token service of {ep}: the credentials of user "
                f"{creds.username} (from {creds.source}) were rejected; "
                f"{hub_credentials_hint(ep.host)}",
                resp.status_code,
            )
        if resp.status_code != 200:
            raise RegistryError(
                f"token service of {ep} answered {resp.status_code} ({_error_text(resp)})",
                resp.status_code,
            )
        try:
            data = resp.json()
            token = data.get("token") or data.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service of {ep} returned no token")
        return token


def _new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    # trust_env stays on: HTTPS_PROXY/NO_PROXY are honoured like every other HTTP tool
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8, max_retries=1)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:197] + "..."


def _error_text(resp: requests.Response) -> str:
    """The registry's own error code/message (JSON ``errors``), else the reason phrase."""
    try:
        data: JsonValue = resp.json()
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors:
            return "; ".join(
                f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors[:3]
            )
    except ValueError:
        pass
    return resp.reason or ""

