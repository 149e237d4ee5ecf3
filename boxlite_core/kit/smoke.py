"""Boot a kit by itself (no runtime, no agent connection): for the bench and the VM tests.

This is also the reference argv for a backend: machine + -global flags from the kit, the
guest root as a read-only virtio-blk with serial `bxguest`, the agent's virtio-serial port,
serial console on stdio, no network, -no-reboot so a guest panic ends QEMU.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from pathlib import Path

import attrs

from .. import tools
from .initramfs import ROOT_SERIAL
from .model import GuestKit

QEMU_BINARY = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}


def smoke_argv(kit: GuestKit, *, accel: str = "tcg", memory_mib: int = 512, cpus: int = 1,
               extra_cmdline: str = "", agent_socket: Path | None = None) -> list[str]:
    qemu = tools.require_tool(QEMU_BINARY[kit.arch])
    dev = {"mmio": "device", "pci": "pci"}[kit.virtio_transport]
    argv = [qemu, "-accel", accel, "-machine", kit.machine, "-m", str(memory_mib),
            "-smp", str(cpus), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio", "-nic", "none"]
    for g in kit.qemu_globals:
        argv += ["-global", g]
    argv += ["-kernel", str(kit.kernel), "-initrd", str(kit.initrd),
             "-append", f"{kit.cmdline} {extra_cmdline}".strip(),
             "-drive", f"file={kit.root_image},if=none,id=guestroot,format=raw,readonly=on",
             "-device", f"virtio-blk-{dev},drive=guestroot,serial={ROOT_SERIAL}"]
    if agent_socket is not None:
        argv += ["-device", f"virtio-serial-{dev}",
                 "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=off",
                 "-device", "virtserialport,chardev=agent,name=org.boxlite.agent"]
    return argv


@attrs.frozen
class BootResult:
    seconds_to_marker: float | None   # None when the marker never appeared
    seconds_total: float
    console: str
    returncode: int | None


def boot_until(argv: list[str], marker: str, timeout: float = 120.0,
               kill_after_marker: bool = False) -> BootResult:
    """Launch QEMU and time launch → the first console line containing `marker`.

    Without `kill_after_marker` it then waits for QEMU to exit (bench mode powers off).
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    found: float | None = None
    try:
        while time.monotonic() - start < timeout:
            if not sel.select(timeout=0.05):
                if proc.poll() is not None:
                    break
                continue
            chunk = proc.stdout.read()
            if not chunk:
                if proc.poll() is not None:
                    break
                continue
            buf += chunk
            if found is None and marker.encode() in buf:
                found = time.monotonic() - start
                if kill_after_marker:
                    break
        if proc.poll() is None:
            if found is not None and not kill_after_marker:
                try:
                    proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        rest = proc.stdout.read() if proc.stdout else b""
        buf += rest or b""
    finally:
        sel.close()
        proc.stdout.close()
    return BootResult(found, time.monotonic() - start, buf.decode(errors="replace"),
                      proc.returncode)
