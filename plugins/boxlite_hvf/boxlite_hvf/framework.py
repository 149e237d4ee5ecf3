"""The only module that touches Virtualization.framework objects.

Split in two so most of it is checked on Linux:

* :func:`build_configuration` walks the plan's ``vz`` dict and calls a :class:`VzApi` — one
  method per kind of device. It holds the ordering and the limit checks, and tests drive it
  through a recording double of the API.
* :class:`PyObjCVz` is the real :class:`VzApi`: each method builds one ``VZ*`` object with
  PyObjC. It imports ``Virtualization`` lazily, only when constructed (macOS only).

The VM itself is driven through :class:`VmControl` (start / request_stop / force_stop /
connect_vsock / state), which the runner uses; the real one runs every framework call on the
VM's own serial dispatch queue, as the framework requires.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from boxlite_core.errors import ConfigError, EngineError


class VmControl(Protocol):
    """A created VM. Every method is safe from any thread."""

    def start(self) -> None:
        """Boot; raise EngineError with the framework's message if it refuses."""

    def request_stop(self) -> bool:
        """Ask the guest to power off (ACPI-like request). False if the guest cannot be asked."""

    def force_stop(self) -> None:
        """Destroy the VM at once (macOS 12+)."""

    def state(self) -> str:
        """"stopped", "running", "paused", "error", "starting", "stopping", ..."""

    def wait_stopped(self, timeout: float | None) -> bool:
        """Block until the VM is stopped or in error; True if it is."""

    def connect_vsock(self, port: int, timeout: float) -> int:
        """Open a stream to guest vsock ``port``; return a file descriptor the caller owns.

        Raise OSError (ECONNREFUSED / ETIMEDOUT) when the guest does not answer.
        """


class VzApi(Protocol):
    """Builds framework objects from plain values; returns opaque handles."""

    def limits(self) -> Mapping[str, int]:
        """min_cpus, max_cpus, min_memory, max_memory (bytes) of this host's framework."""

    def boot_loader(self, kernel: str, initrd: str, cmdline: str) -> Any: ...

    def platform(self) -> Any: ...

    def block_device(self, path: str, read_only: bool, identifier: str) -> Any: ...

    def share(self, tag: str, path: str, read_only: bool) -> Any: ...

    def vsock_device(self) -> Any: ...

    def serial_console(self, write_fd: int) -> Any:
        """The virtio console, writing the guest's output to ``write_fd`` (the write end of
        the runner's capped console pipe; the console takes ownership of the fd)."""

    def entropy_device(self) -> Any: ...

    def machine(
        self,
        *,
        boot_loader: Any,
        platform: Any,
        cpus: int,
        memory_bytes: int,
        storage: list[Any],
        shares: list[Any],
        sockets: list[Any],
        serial: list[Any],
        entropy: list[Any],
    ) -> Any:
        """The VZVirtualMachineConfiguration, validated (raise ConfigError if invalid)."""

    def create_vm(self, configuration: Any) -> VmControl: ...


def check_limits(vz: Mapping[str, Any], limits: Mapping[str, int]) -> None:
    """CPU count and memory must sit inside the framework's host-dependent bounds."""
    cpus, memory = vz["cpus"], vz["memory_bytes"]
    if not limits["min_cpus"] <= cpus <= limits["max_cpus"]:
        raise ConfigError(
            f"hvf: cpus={cpus} is outside what Virtualization.framework allows on this host "
            f"({limits['min_cpus']}..{limits['max_cpus']}); ask for fewer CPUs"
        )
    if not limits["min_memory"] <= memory <= limits["max_memory"]:
        mib = 1024 * 1024
        raise ConfigError(
            f"hvf: memory_mib={memory // mib} is outside what Virtualization.framework allows "
            f"on this host ({limits['min_memory'] // mib}..{limits['max_memory'] // mib} MiB)"
        )


def build_configuration(api: VzApi, vz: Mapping[str, Any], console_fd: int) -> Any:
    """Turn a plan's ``vz`` dict into a validated machine configuration through ``api``.

    ``console_fd``: where the guest console goes — the write end of the pipe the runner
    drains into ``vz["serial_console"]["log"]`` under its cap, never the log file itself
    (a root guest writes its console as fast as it likes).

    Disks must already be raw (the launcher converts qcow2 first): a pending conversion whose
    target is missing is a bug in the caller, reported here rather than as a framework error.
    """
    check_limits(vz, api.limits())
    boot = vz["boot_loader"]
    storage = []
    for disk in vz["block_devices"]:
        if disk["convert"] is not None and not os.path.exists(disk["path"]):
            raise EngineError(
                f"hvf: disk {disk['convert']['source']} needs converting to raw at "
                f"{disk['path']} before boot (qemu-img convert -O raw); it has not been"
            )
        storage.append(api.block_device(disk["path"], disk["read_only"], disk["identifier"]))
    return api.machine(
        boot_loader=api.boot_loader(boot["kernel"], boot["initrd"], boot["cmdline"]),
        platform=api.platform(),
        cpus=vz["cpus"],
        memory_bytes=vz["memory_bytes"],
        storage=storage,
        shares=[api.share(s["tag"], s["path"], s["read_only"]) for s in vz["shares"]],
        sockets=[api.vsock_device()],
        serial=[api.serial_console(console_fd)],
        entropy=[api.entropy_device()] if vz.get("entropy") else [],
    )


# --------------------------------------------------------------------------------------------
# The real thing (macOS only). Nothing below runs on import.


def _check(result: Any, what: str) -> Any:
    """PyObjC returns (value, NSError) for ``...error:`` selectors; raise on error."""
    value, error = result
    if error is not None:
        raise ConfigError(f"hvf: {what}: {error.localizedDescription()}")
    return value


class PyObjCVz:
    """:class:`VzApi` over PyObjC's ``Virtualization`` module."""

    def __init__(self) -> None:
        try:
            import Foundation
            import Virtualization
        except ImportError as exc:
            raise EngineError(
                "hvf: PyObjC's Virtualization module is not importable "
                f"({exc}); pip install 'pyobjc-framework-Virtualization>=10' on macOS 12.3+"
            ) from exc
        self.vz = Virtualization
        self.fd = Foundation
        self._log_handles: list[Any] = []  # the console file must outlive configuration

    def _url(self, path: str) -> Any:
        return self.fd.NSURL.fileURLWithPath_(path)

    def limits(self) -> Mapping[str, int]:
        cfg = self.vz.VZVirtualMachineConfiguration
        return {
            "min_cpus": int(cfg.minimumAllowedCPUCount()),
            "max_cpus": int(cfg.maximumAllowedCPUCount()),
            "min_memory": int(cfg.minimumAllowedMemorySize()),
            "max_memory": int(cfg.maximumAllowedMemorySize()),
        }

    def boot_loader(self, kernel: str, initrd: str, cmdline: str) -> Any:
        loader = self.vz.VZLinuxBootLoader.alloc().initWithKernelURL_(self._url(kernel))
        loader.setInitialRamdiskURL_(self._url(initrd))
        loader.setCommandLine_(cmdline)
        return loader

    def platform(self) -> Any:
        return self.vz.VZGenericPlatformConfiguration.alloc().init()

    def block_device(self, path: str, read_only: bool, identifier: str) -> Any:
        attachment = _check(
            self.vz.VZDiskImageStorageDeviceAttachment.alloc().initWithURL_readOnly_error_(
                self._url(path), read_only, None
            ),
            f"disk image {path}",
        )
        device = self.vz.VZVirtioBlockDeviceConfiguration.alloc().initWithAttachment_(attachment)
        if identifier:
            # an invalid identifier is a fatal error inside the framework: validate first
            _check(
                self.vz.VZVirtioBlockDeviceConfiguration.validateBlockDeviceIdentifier_error_(
                    identifier, None
                ),
                f"block device identifier {identifier!r}",
            )
            device.setBlockDeviceIdentifier_(identifier)
        return device

    def share(self, tag: str, path: str, read_only: bool) -> Any:
        _check(
            self.vz.VZVirtioFileSystemDeviceConfiguration.validateTag_error_(tag, None),
            f"virtiofs tag {tag!r}",
        )
        directory = self.vz.VZSharedDirectory.alloc().initWithURL_readOnly_(
            self._url(path), read_only
        )
        device = self.vz.VZVirtioFileSystemDeviceConfiguration.alloc().initWithTag_(tag)
        device.setShare_(self.vz.VZSingleDirectoryShare.alloc().initWithDirectory_(directory))
        return device

    def vsock_device(self) -> Any:
        return self.vz.VZVirtioSocketDeviceConfiguration.alloc().init()

    def serial_console(self, write_fd: int) -> Any:
        # UNTESTED here (macOS only): the framework writes the console to a pipe's write end
        # exactly as it did to the O_APPEND file; the runner's thread drains the read end.
        handle = self.fd.NSFileHandle.alloc().initWithFileDescriptor_closeOnDealloc_(
            write_fd, True
        )
        self._log_handles.append(handle)
        attachment = (
            self.vz.VZFileHandleSerialPortAttachment.alloc()
            .initWithFileHandleForReading_fileHandleForWriting_(None, handle)
        )
        port = self.vz.VZVirtioConsoleDeviceSerialPortConfiguration.alloc().init()
        port.setAttachment_(attachment)
        return port

    def entropy_device(self) -> Any:
        return self.vz.VZVirtioEntropyDeviceConfiguration.alloc().init()

    def machine(self, *, boot_loader: Any, platform: Any, cpus: int, memory_bytes: int,
                storage: list[Any], shares: list[Any], sockets: list[Any], serial: list[Any],
                entropy: list[Any]) -> Any:
        cfg = self.vz.VZVirtualMachineConfiguration.alloc().init()
        cfg.setBootLoader_(boot_loader)
        cfg.setPlatform_(platform)
        cfg.setCPUCount_(cpus)
        cfg.setMemorySize_(memory_bytes)
        cfg.setStorageDevices_(storage)
        cfg.setDirectorySharingDevices_(shares)
        cfg.setSocketDevices_(sockets)
        cfg.setSerialPorts_(serial)
        cfg.setEntropyDevices_(entropy)
        _check(cfg.validateWithError_(None), "the VM configuration does not validate")
        return cfg

    def create_vm(self, configuration: Any) -> VmControl:
        return PyObjCVm(self.vz, configuration)


_STATES = {0: "stopped", 1: "running", 2: "paused", 3: "error", 4: "starting", 5: "pausing",
           6: "resuming", 7: "stopping", 8: "saving", 9: "restoring"}


class PyObjCVm:
    """A VZVirtualMachine on its own serial dispatch queue.

    The framework requires every call on a VM to happen on the queue it was created with; the
    runner's threads (signal handling, the vsock bridge) therefore go through :meth:`_on_queue`,
    which runs a function there and waits for its completion handler.
    """

    def __init__(self, vz: Any, configuration: Any) -> None:
        import dispatch

        self.vz = vz
        self._dispatch = dispatch
        self.queue = dispatch.dispatch_queue_create(b"org.boxlite.hvf.vm", None)
        self._stopped = threading.Event()
        holder: dict[str, Any] = {}

        def create() -> None:
            holder["vm"] = vz.VZVirtualMachine.alloc().initWithConfiguration_queue_(
                configuration, self.queue
            )

        dispatch.dispatch_sync(self.queue, create)
        self.vm = holder["vm"]

    def _on_queue(self, fn: Callable[[Callable[..., None]], None], timeout: float) -> tuple:
        done = threading.Event()
        out: list[Any] = []

        def finish(*args: Any) -> None:
            out.extend(args)
            done.set()

        self._dispatch.dispatch_async(self.queue, lambda: fn(finish))
        if not done.wait(timeout):
            raise TimeoutError("Virtualization.framework did not answer in time")
        return tuple(out)

    def start(self) -> None:
        (error,) = self._on_queue(lambda fin: self.vm.startWithCompletionHandler_(fin), 60)
        if error is not None:
            raise EngineError(f"hvf: the VM did not start: {error.localizedDescription()}")

    def request_stop(self) -> bool:
        def ask(fin: Callable[..., None]) -> None:
            if not self.vm.canRequestStop():
                fin(False)
                return
            ok, _err = self.vm.requestStopWithError_(None)
            fin(bool(ok))

        (ok,) = self._on_queue(ask, 10)
        return ok

    def force_stop(self) -> None:
        def stop(fin: Callable[..., None]) -> None:
            if self.vm.canStop():
                self.vm.stopWithCompletionHandler_(fin)
            else:
                fin(None)

        self._on_queue(stop, 30)

    def state(self) -> str:
        (value,) = self._on_queue(lambda fin: fin(int(self.vm.state())), 10)
        return _STATES.get(value, f"unknown({value})")

    def wait_stopped(self, timeout: float | None) -> bool:
        # Polling the state is simpler and as cheap as a KVO delegate at 0.2 s granularity.
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.state() in ("stopped", "error"):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def connect_vsock(self, port: int, timeout: float) -> int:
        def connect(fin: Callable[..., None]) -> None:
            device = self.vm.socketDevices()[0]
            device.connectToPort_completionHandler_(port, fin)

        try:
            connection, error = self._on_queue(connect, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"guest vsock port {port} did not answer") from exc
        if error is not None or connection is None:
            why = error.localizedDescription() if error is not None else "no connection"
            raise ConnectionRefusedError(f"guest vsock port {port}: {why}")
        # the connection object owns its fd and closes it when collected: keep our own copy
        fd = os.dup(connection.fileDescriptor())
        connection.close()
        return fd
