"""Test doubles of the hvf framework layer (Virtualization.framework cannot run on Linux).

* :class:`RecordingVzDouble` — a VzApi that records every call and returns tokens, so a test
  can assert exactly which framework objects a plan turns into.
* :class:`GuestVmDouble` — a VmControl whose "guest" answers vsock connects with an echo
  server (upper-casing what it gets), for driving the real runner process end to end.
  Its behaviour is set through BOXLITE_HVF_DOUBLE (comma-separated words):
  ``refuse=N`` (first N vsock connects are refused, as while the guest boots),
  ``ignore-stop`` (the guest ignores power-off requests: the runner must force it),
  ``poweroff-after=S`` (the guest powers itself off S seconds after start),
  ``fail-start`` (the framework refuses to start the VM),
  ``console=N`` (the guest writes N bytes of numbered lines, then ``console end``, to its
  virtio console at start, through the fd the runner gave ``serial_console``, blocking as
  the framework's writes do).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from boxlite_core.errors import ConfigError, EngineError

MIB = 1024 * 1024


class RecordingVzDouble:
    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.console_fd: int | None = None
        self._limits = limits or {
            "min_cpus": 1,
            "max_cpus": 8,
            "min_memory": 128 * MIB,
            "max_memory": 16384 * MIB,
        }

    def _rec(self, name: str, *args: Any) -> str:
        self.calls.append((name, args))
        return f"{name}#{len(self.calls) - 1}"

    def limits(self):
        return self._limits

    def boot_loader(self, kernel, initrd, cmdline):
        return self._rec("boot_loader", kernel, initrd, cmdline)

    def platform(self):
        return self._rec("platform")

    def block_device(self, path, read_only, identifier):
        return self._rec("block_device", path, read_only, identifier)

    def share(self, tag, path, read_only):
        return self._rec("share", tag, path, read_only)

    def vsock_device(self):
        return self._rec("vsock_device")

    def serial_console(self, write_fd):
        if isinstance(write_fd, str):  # a framework layer handing over a path (before the
            # capped pipe) got an O_APPEND file, as PyObjCVz opened it: keep that behaviour
            self.console_fd = os.open(write_fd, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        else:
            self.console_fd = write_fd
        return self._rec("serial_console", write_fd)

    def entropy_device(self):
        return self._rec("entropy_device")

    def machine(self, **kwargs):
        self.calls.append(("machine", kwargs))
        return kwargs

    def create_vm(self, configuration):
        return GuestVmDouble(configuration, self.console_fd)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def _options() -> dict[str, str]:
    out = {}
    for word in os.environ.get("BOXLITE_HVF_DOUBLE", "").split(","):
        if word:
            key, _, value = word.partition("=")
            out[key] = value
    return out


class GuestVmDouble:
    def __init__(self, configuration: Any, console_fd: int | None = None) -> None:
        self.configuration = configuration
        self.console_fd = console_fd
        self.opts = _options()
        self._state = "stopped"
        self._lock = threading.Lock()
        self._refuse = int(self.opts.get("refuse", "0"))

    def start(self) -> None:
        if "fail-start" in self.opts:
            raise EngineError("hvf: the VM did not start: double says no")
        self._state = "running"
        if "console" in self.opts and self.console_fd is not None:
            threading.Thread(target=self._flood_console, args=(int(self.opts["console"]),),
                             daemon=True).start()
        if "poweroff-after" in self.opts:
            threading.Timer(float(self.opts["poweroff-after"]), self._poweroff).start()

    def _flood_console(self, total: int) -> None:
        assert self.console_fd is not None
        sent, i = 0, 0
        while sent < total:
            line = f"console line {i:09d}: the guest keeps writing\n".encode()
            os.write(self.console_fd, line)  # blocking, as the framework's writes are
            sent, i = sent + len(line), i + 1
        os.write(self.console_fd, b"console end\n")

    def _poweroff(self) -> None:
        self._state = "stopped"

    def request_stop(self) -> bool:
        if "ignore-stop" not in self.opts:
            threading.Timer(0.2, self._poweroff).start()
        return True

    def force_stop(self) -> None:
        self._state = "stopped"

    def state(self) -> str:
        return self._state

    def wait_stopped(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state != "stopped":
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def connect_vsock(self, port: int, timeout: float) -> int:
        with self._lock:
            if self._refuse > 0:
                self._refuse -= 1
                raise ConnectionRefusedError(f"guest vsock port {port}: not listening yet")
        host, guest = socket.socketpair()
        threading.Thread(target=self._echo, args=(guest, port), daemon=True).start()
        fd = os.dup(host.fileno())
        host.close()
        return fd

    @staticmethod
    def _echo(sock: socket.socket, port: int) -> None:
        with sock:
            sock.sendall(f"port {port}\n".encode())
            while data := sock.recv(65536):
                sock.sendall(data.upper())


class RefusingVzDouble(RecordingVzDouble):
    """A framework that rejects every configuration, as validateWithError_ would."""

    def machine(self, **kwargs):
        raise ConfigError("hvf: the VM configuration does not validate: double says no")


def recording() -> RecordingVzDouble:
    return RecordingVzDouble()


def refusing() -> RefusingVzDouble:
    return RefusingVzDouble()
