"""``python -m boxlite_hvf.runner``: the process that *is* the VM, as qemu-system is for QEMU.

Why a child process: Virtualization.framework ties a VM to the process that created it
(the VM's XPC service is torn down when its client exits), so the VM must live in a process
whose life we control — not in the host program, whose crash or exit would take every box
with it, and not in a daemon. Input: the launch config as JSON on stdin
(``{"vz": {...}, "watch_parent": bool, "parent_pid": int, "stop_timeout": float}``).

What it does: builds the configuration through the framework layer, starts the VM on its own
serial dispatch queue, listens on the box's agent unix socket (mode 0600) and bridges every
host connection to a fresh guest vsock stream, and exits when the VM stops.

Exit codes: 0 the guest powered off or was stopped on request; 1 the VM ended in error; 2 the
configuration was refused (nothing booted). The reason is the last line of stderr, which the
backend sends to ``BOXDIR/hvf/runner.log``.

Parent policy (decided): a box outlives the program that started it — that is what
``attach()`` is for — so by default the runner does not watch its parent and runs in its own
session (Ctrl-C in the host's terminal does not reach it). With ``watch_parent`` (hint
``hvf_watch_parent``, for ephemeral boxes and tests) it polls its parent pid every 0.5 s and,
when the parent is gone, stops the VM as if it had been sent SIGTERM. Either way no VM is ever
left without a runner: SIGKILL of the runner destroys its VM with it.

SIGTERM/SIGINT: ask the guest to power off, wait ``stop_timeout``, then force-stop.

``BOXLITE_HVF_API_FACTORY=module:callable`` replaces the framework layer; it exists for the
test double that exercises this process on Linux, and is never set in production.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from boxlite_core.errors import BoxliteError
from boxlite_core.vmm.cappedio import CappedOutput, CappedPipe

from .framework import VmControl, VzApi, build_configuration

API_FACTORY_ENV = "BOXLITE_HVF_API_FACTORY"
CHUNK = 256 * 1024
#: how long one host connection waits for the guest agent's vsock port to answer
CONNECT_DEADLINE = 3.0
POLL = 0.5
#: console cap when a config names none (plans always do: VmSpec.console_log_max_bytes)
DEFAULT_CONSOLE_MAX_BYTES = 4 * 1024 * 1024


def log(message: str) -> None:
    print(f"hvf-runner[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def load_api() -> VzApi:
    spec = os.environ.get(API_FACTORY_ENV)
    if not spec:
        from .framework import PyObjCVz

        return PyObjCVz()
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)()


# -- the agent bridge ----------------------------------------------------------------------


def listen_unix(path: Path) -> socket.socket:
    """The box's agent socket, mode 0600 from birth (umask), replacing a stale one."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def relay(a: int, b: int) -> None:
    """Copy bytes both ways until both directions have seen EOF (half-close aware)."""
    open_dirs = {a: b, b: a}  # reader → writer
    while open_dirs:
        try:
            ready, _, _ = select.select(list(open_dirs), [], [])
        except InterruptedError:
            continue
        for src in ready:
            dst = open_dirs[src]
            try:
                data = os.read(src, CHUNK)
            except OSError:
                data = b""
            if not data:
                del open_dirs[src]
                _shutdown_write(dst)
                continue
            try:
                _write_all(dst, data)
            except OSError:
                return


def _shutdown_write(fd: int) -> None:
    """Pass EOF on: the peer reading ``fd`` sees end of stream, replies can still flow."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def connect_guest(vm: VmControl, port: int, deadline: float) -> int:
    """Dial the guest agent; retry while it is still booting, until ``deadline``."""
    delay = 0.05
    while True:
        try:
            return vm.connect_vsock(port, timeout=max(0.1, deadline - time.monotonic()))
        except (OSError, TimeoutError):
            if time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def serve_connection(client: socket.socket, vm: VmControl, port: int) -> None:
    try:
        fd = connect_guest(vm, port, time.monotonic() + CONNECT_DEADLINE)
    except (OSError, TimeoutError) as exc:
        log(f"agent connection dropped: {exc}")
        client.close()
        return
    try:
        relay(client.fileno(), fd)
    finally:
        os.close(fd)
        client.close()


def accept_loop(listener: socket.socket, vm: VmControl, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EINVAL):  # listener closed: we are exiting
                return
            continue
        threading.Thread(
            target=serve_connection, args=(client, vm, port), daemon=True, name="hvf-bridge"
        ).start()


# -- life cycle ----------------------------------------------------------------------------


def graceful_stop(vm: VmControl, timeout: float) -> None:
    asked = False
    try:
        asked = vm.request_stop()
    except Exception as exc:
        log(f"stop request failed: {exc}")
    if asked and vm.wait_stopped(timeout):
        return
    log("guest did not power off in time; forcing the VM off" if asked
        else "guest cannot be asked to stop; forcing the VM off")
    vm.force_stop()


def run(config: Mapping[str, Any]) -> int:
    """Run the VM of ``config`` until it stops; the exit code (see the module docstring).

    Guest-fed output is capped here, in the process that is the VM (so it lives exactly as
    long as the VM, and ``attach`` needs nothing more): the guest console goes to a pipe a
    thread drains into ``vz["serial_console"]["log"]`` (≤ ``max_bytes`` per file, rotated
    to ``.1``, ``.2``), and with ``config["runner_log"]`` our own stdout/stderr go to that
    file under the same cap, continued across boots."""
    vz = config["vz"]
    serial = vz["serial_console"]
    cap = int(serial.get("max_bytes") or DEFAULT_CONSOLE_MAX_BYTES)
    output: CappedOutput | None = None
    if config.get("runner_log"):
        try:
            output = CappedOutput(Path(config["runner_log"]), cap, int(serial.get("backups", 2)))
        except OSError as exc:  # keep the inherited (uncapped) log rather than not boot
            log(f"runner log not capped: {exc}")
    try:
        try:
            console = CappedPipe(Path(serial["log"]), cap, int(serial.get("backups", 2)))
        except (OSError, ValueError) as exc:
            log(f"configuration refused: cannot write the console log {serial['log']}: {exc}")
            return 2
        try:
            return _run(config, console.write_fd)
        finally:
            console.close()
    finally:
        if output is not None:
            output.close()


def _run(config: Mapping[str, Any], console_fd: int) -> int:
    vz = config["vz"]
    stop_timeout = float(config.get("stop_timeout", 10.0))
    watch_parent = bool(config.get("watch_parent", False))
    parent = int(config.get("parent_pid") or os.getppid())

    stop_asked = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop_asked.set())

    api = load_api()
    try:
        configuration = build_configuration(api, vz, console_fd)
        vm = api.create_vm(configuration)
    except BoxliteError as exc:
        log(f"configuration refused: {exc}")
        return 2

    socket_path = Path(vz["vsock"]["bridge_socket"])
    listener = listen_unix(socket_path)
    threading.Thread(
        target=accept_loop, args=(listener, vm, vz["vsock"]["agent_port"]), daemon=True,
        name="hvf-accept",
    ).start()
    try:
        try:
            vm.start()
        except BoxliteError as exc:
            log(str(exc))
            return 1
        log(f"vm running ({vz['cpus']} cpus, {vz['memory_bytes'] // 2**20} MiB, "
            f"agent on vsock port {vz['vsock']['agent_port']})")
        while not vm.wait_stopped(POLL):
            if watch_parent and os.getppid() != parent:
                log(f"parent {parent} is gone and watch_parent is set: stopping the VM")
                stop_asked.set()
            if stop_asked.is_set():
                graceful_stop(vm, stop_timeout)
                vm.wait_stopped(stop_timeout)
                break
        state = vm.state()
    finally:
        listener.close()
        try:
            socket_path.unlink()
        except FileNotFoundError:
            pass
    log(f"vm {state}; exiting")
    return 1 if state == "error" else 0


def main() -> int:
    try:
        config = json.load(sys.stdin)
    except ValueError as exc:
        log(f"bad config on stdin: {exc}")
        return 2
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
