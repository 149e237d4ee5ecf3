"""Connections to a libvirt daemon, every call bounded in time.

Why its own module: the backend, the remote storage pool and the stream bridge all open
connections and call into libvirt-python, whose calls block in C with no timeout; one
:func:`bounded` and one error vocabulary (:class:`LibvirtTimeout`, the fixes) serve them all.
Imports without libvirt-python (``import libvirt`` happens in :func:`import_libvirt`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from boxlite_core import envvars
from boxlite_core.errors import EngineError
from boxlite_core.vmm.kvm_access import KVM_DEV, KVM_FIX, QEMU_CONF, kvm_access_problem

if TYPE_CHECKING:
    import libvirt

ENV_URI = "BOXLITE_LIBVIRT_URI"
INSTALL_FIX = "pip install 'boxlite-qemu[libvirt]' (needs libvirt-dev and pkg-config to build)"
DAEMON_FIX = (
    "start libvirtd (virtlogd -d && libvirtd -d, or systemctl start libvirtd); "
    "if it is not installed: apt-get install libvirt-daemon-system"
)
#: bound on every call into libvirt (seconds); libvirt-python blocks in C with no timeout
ENV_TIMEOUT = "BOXLITE_LIBVIRT_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
#: close() may wait on a stuck daemon too; it is best effort
CLOSE_TIMEOUT = 5.0

T = TypeVar("T")


def default_uri(env: dict[str, str] | None = None) -> str:
    """BOXLITE_LIBVIRT_URI, else the system daemon as root and the session daemon otherwise."""
    env = dict(os.environ) if env is None else env
    uri = env.get(ENV_URI, "").strip()
    if uri:
        return uri
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def is_local(uri: str) -> bool:
    """True when the daemon runs on this host (no hostname in the URI)."""
    parts = urlsplit(uri)
    return not parts.hostname and "+ssh" not in parts.scheme and "+tcp" not in parts.scheme \
        and "+tls" not in parts.scheme


def is_session(uri: str) -> bool:
    return urlsplit(uri).path.rstrip("/") == "/session"


class LibvirtTimeout(EngineError):
    """A call into libvirt did not return within its bound (the daemon is stuck or slow)."""


def call_timeout(env: dict[str, str] | None = None) -> float:
    """``BOXLITE_LIBVIRT_TIMEOUT`` (seconds, > 0) or 60: the bound of each libvirt call."""
    return envvars.seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT, env)


def _stall_hint(uri: str) -> str:
    hint = (f"the daemon is stuck or overloaded: check `virsh -c {uri} list` and libvirtd's "
            f"log; on a slow host raise {ENV_TIMEOUT} (seconds)")
    if is_local(uri) and not is_session(uri):
        problem = kvm_access_problem(KVM_DEV, QEMU_CONF)
        if problem:
            hint = f"likely cause: {problem}; fix: {KVM_FIX}; else {hint}"
    return hint


def bounded(what: str, uri: str, fn: Callable[..., T], *args: Any,
            timeout: float | None = None,
            on_abandoned: Callable[[T], None] | None = None) -> T:
    """Run one libvirt-python call in a worker thread and wait at most ``timeout`` seconds
    (default :func:`call_timeout`); LibvirtTimeout naming ``what`` and ``uri`` otherwise.

    Why a thread: libvirt-python calls block in C (a daemon that accepts and never answers
    stalls them forever, and keepalive needs an event loop boxlite does not own). A call
    that times out is abandoned on its daemon thread; if it returns later anyway, its result
    goes to ``on_abandoned`` (createXML: destroy the domain nobody will track) and is
    otherwise dropped. The call's own exceptions (libvirt.libvirtError) are re-raised.
    """
    bound = call_timeout() if timeout is None else timeout
    box: dict[str, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def runner() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc
        finally:
            with lock:
                done.set()
                late = box.get("abandoned", False)
        if late and on_abandoned is not None and "result" in box:
            with contextlib.suppress(Exception):
                on_abandoned(box["result"])

    threading.Thread(target=runner, name=f"libvirt {what}", daemon=True).start()
    finished = done.wait(bound)
    if not finished:
        with lock:
            finished = done.is_set()
            box["abandoned"] = not finished
    if not finished:
        raise LibvirtTimeout(f"libvirt {what} on {uri} did not answer in {bound:g} s; "
                             f"{_stall_hint(uri)}")
    if "error" in box:
        raise box["error"]
    return box["result"]


def close_connection(uri: str, conn: libvirt.virConnect) -> None:
    with contextlib.suppress(Exception):
        bounded("virConnectClose", uri, conn.close, timeout=CLOSE_TIMEOUT)


def import_libvirt() -> ModuleType:
    import libvirt

    # libvirt prints every error to stderr by default ("Domain not found" on each poll)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def open_connection(uri: str) -> libvirt.virConnect:
    libvirt = import_libvirt()
    try:
        return bounded("virConnectOpen", uri, libvirt.open, uri)
    except libvirt.libvirtError as exc:
        raise EngineError(f"cannot connect to libvirt at {uri}: {exc}; {DAEMON_FIX}") from exc
